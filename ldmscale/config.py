"""Typed configuration: dataclass defaults, YAML overrides, `section.key=value` CLI overrides.

Every check that can fail without a process group runs here, in `validate`, so a bad launch on
64 nodes dies in seconds on rank 0's terminal rather than after the NCCL rendezvous.
"""

from __future__ import annotations

import dataclasses
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from ldmscale.redact import redact


class ConfigError(ValueError):
    """A configuration problem, with the key at fault and what is allowed."""


# Sampler names, in one place: the config's choice, ldmscale-sample's --sampler, ldmscale.samplers' table.
SamplerName = Literal["ddim", "dpmsolver++", "euler", "ddpm"]
SAMPLERS: tuple[str, ...] = typing.get_args(SamplerName)


def _positive(key: str, value: float, allow_zero: bool = False) -> None:
    if value < 0 or (value == 0 and not allow_zero):
        raise ConfigError(f"{key}={value!r} must be {'>= 0' if allow_zero else '> 0'}")


def _probability(key: str, value: float) -> None:
    if not 0.0 <= value < 1.0:
        raise ConfigError(f"{key}={value} must be in [0, 1)")


@dataclass
class FilterConfig:
    """LAION metadata filters. A field missing from a sample's json never passes a filter set on it."""

    min_width: int = 0  # on original_width (the image before img2dataset resized it)
    min_height: int = 0
    min_aspect: float = 0.0  # width / height
    max_aspect: float = 0.0  # 0 = no limit
    min_similarity: float = 0.0  # LAION's CLIP image-text similarity
    allowed_nsfw: list[str] = field(default_factory=list)  # e.g. ["UNLIKELY"]; empty = keep all
    max_pwatermark: float = 1.0  # LAION-5B / aesthetic subsets only
    max_punsafe: float = 1.0
    min_caption_chars: int = 1
    max_caption_chars: int = 0  # 0 = no limit


@dataclass
class DataConfig:
    shards: list[str] = field(default_factory=list)  # URLs, brace patterns, globs, dirs, prefixes ending "/"
    val_shards: list[str] = field(default_factory=list)  # held-out shards for train.eval_every (same forms as shards)
    # images: JPEG shards, VAE-encoded every step | latents: shards written once by ldmscale-encode (posterior
    # moments), checked against this config through their manifest.json
    format: Literal["images", "latents"] = "images"
    storage_options: dict[str, Any] = field(default_factory=dict)  # fsspec options (endpoint_url, key, ...)
    resolution: int = 256  # square training size in pixels; a multiple of 8
    center_crop: bool = True  # else the top-left square
    random_flip: bool = False
    num_workers: int = 2  # DataLoader workers per rank (0 = decode in the training process)
    shuffle_buffer: int = 1000  # samples held by each worker's shuffle buffer
    samples_per_epoch: int = 0  # 0 = the shards' *_stats.json `successes` x the filters' measured pass rate
    caption_dropout: float = 0.1  # probability a caption is replaced by "" (classifier-free guidance)
    # loader worker processes: auto = spawn on CUDA (fork after CUDA init is unsafe), fork on CPU (faster start)
    start_method: Literal["auto", "fork", "spawn"] = "auto"
    # share of a worker's shards that may fail twice in an epoch (retried once, later) before the run stops
    max_failed_shards: float = 0.1
    max_member_bytes: int = 64 * 2**20  # tar members above this are skipped unread (`too_large`); 0 = no cap
    filters: FilterConfig = field(default_factory=FilterConfig)

    def check(self) -> None:
        _positive("data.resolution", self.resolution)
        if self.resolution % 8:
            raise ConfigError(f"data.resolution={self.resolution} must be a multiple of 8")
        _positive("data.num_workers", self.num_workers, allow_zero=True)
        _positive("data.shuffle_buffer", self.shuffle_buffer, allow_zero=True)
        _probability("data.caption_dropout", self.caption_dropout)
        _probability("data.max_failed_shards", self.max_failed_shards)
        _positive("data.max_member_bytes", self.max_member_bytes, allow_zero=True)
        if not self.shards:
            raise ConfigError(
                "data.shards is empty; give shard URLs, e.g. data.shards='[s3://bucket/{00000..00099}.tar]'"
            )


@dataclass
class ModelConfig:
    pretrained: str = ""  # a diffusers pipeline folder or hub id holding vae/ text_encoder/ tokenizer/ (unet/)
    vae: str = ""  # overrides <pretrained>/vae
    text_encoder: str = ""  # overrides <pretrained>/text_encoder
    tokenizer: str = ""  # overrides <pretrained>/tokenizer
    unet: str = "tiny"  # a preset name (see models.UNET_PRESETS) or a folder/hub id to fine-tune from
    vae_preset: str = "tiny"  # autoencoder stage: the architecture to train when model.vae is empty
    prediction_type: Literal["epsilon", "v_prediction"] = "epsilon"  # what the U-Net predicts
    num_train_timesteps: int = 1000
    beta_schedule: Literal["scaled_linear", "linear", "squaredcos_cap_v2"] = "scaled_linear"  # DDPMScheduler's
    snr_gamma: float = 0.0  # >0 enables min-SNR-gamma loss weighting
    noise_offset: float = 0.0  # per-channel offset noise (brighter/darker images); 0 = off
    gradient_checkpointing: bool = False  # recompute activations in backward: memory for compute
    attention: Literal["sdpa", "default"] = "sdpa"  # torch's scaled_dot_product_attention | the math path
    # torch.compile of the trained network (nn.Module.compile: in place, parameter names unchanged); the first
    # steps pay the compilation. backend: inductor on GPUs; aot_eager traces without code generation (tests)
    compile: bool = False
    compile_mode: Literal["default", "reduce-overhead", "max-autotune"] = "default"
    compile_backend: Literal["inductor", "aot_eager", "eager"] = "inductor"
    channels_last: bool = False  # NHWC activations into the U-Net: faster convolutions on tensor cores

    def check(self) -> None:
        _positive("model.num_train_timesteps", self.num_train_timesteps)
        _positive("model.snr_gamma", self.snr_gamma, allow_zero=True)
        _positive("model.noise_offset", self.noise_offset, allow_zero=True)


@dataclass
class AutoencoderConfig:
    kl_weight: float = 1e-6  # the LDM paper's KL-regularised autoencoder
    l1_weight: float = 1.0
    l2_weight: float = 0.0
    scaling_samples: int = 512  # images encoded to measure the latent scaling factor (1 / std)

    def check(self) -> None:
        for key in ("kl_weight", "l1_weight", "l2_weight"):
            _positive(f"autoencoder.{key}", getattr(self, key), allow_zero=True)
        _positive("autoencoder.scaling_samples", self.scaling_samples)


@dataclass
class StyleConfig:
    """Style conditioning (step 2 of a two-step run): a KL-regularised style encoder whose tokens reach the
    U-Net through a separate, zero-initialised cross-attention path (ldmscale/style/attention.py)."""

    enabled: bool = False
    backbone: Literal["conv", "clip"] = "conv"  # conv: small net trained from scratch; clip: frozen CLIP + head
    vision_model: str = ""  # backbone=clip: a CLIPVisionModel folder or hub id (from_pretrained)
    conv_channels: list[int] = field(default_factory=lambda: [32, 64, 128])  # backbone=conv: stride-2 stages
    num_tokens: int = 4  # K style tokens in the U-Net's cross-attention space
    # the encoder's head also sees the reference's per-channel colour mean, std and quantiles (style/encoder.py);
    # measured better on both style benchmarks (README "Continuous styles")
    colour_stats: bool = True
    # weight of KL(q(s|ref) || N(0, I)), KL in nats per sample while the denoising loss is a per-element mean:
    # 1e-3 collapsed the posterior in the style demo (KL 0.009 nats, style followed at chance), 1e-5 did not
    beta: float = 1e-5
    beta_warmup_steps: int = 0  # beta rises linearly from 0 to `beta` over these steps (0 = constant)
    # augment: another view of the same image | metadata: another image of the same style (json field)
    reference: Literal["augment", "metadata"] = "augment"
    metadata_key: str = "style"  # reference=metadata: the json field naming a sample's style
    pair_window: int = 64  # reference=metadata: partners are drawn from the last N samples of the same style
    crop_scale: tuple[float, float] = (0.5, 1.0)  # reference=augment: crop area range of the view
    shuffle_grid: int = 4  # reference=augment: the view's tiles are permuted on a g x g grid (1 = off)
    dropout: float = 0.1  # probability the style tokens are zeroed (classifier-free guidance on style)
    init_from: str = ""  # step-1 run dir, checkpoints/ folder or step_* folder: U-Net weights to start from
    init_weights: Literal["ema", "raw"] = "ema"  # which step-1 weights
    guidance_scale: float = 3.0  # in-training sample grids and the CLI default

    def check(self) -> None:
        if not self.enabled:
            return
        _positive("style.num_tokens", self.num_tokens)
        _positive("style.beta", self.beta, allow_zero=True)
        _positive("style.beta_warmup_steps", self.beta_warmup_steps, allow_zero=True)
        _positive("style.pair_window", self.pair_window)
        _positive("style.shuffle_grid", self.shuffle_grid)
        _probability("style.dropout", self.dropout)
        lo, hi = self.crop_scale
        if not 0.0 < lo <= hi <= 1.0:
            raise ConfigError(f"style.crop_scale={list(self.crop_scale)} must satisfy 0 < low <= high <= 1")
        if self.backbone == "clip" and not self.vision_model:
            raise ConfigError("style.backbone=clip needs style.vision_model (a CLIPVisionModel folder or hub id)")
        if self.backbone == "conv" and (not self.conv_channels or any(c <= 0 for c in self.conv_channels)):
            raise ConfigError(f"style.conv_channels={self.conv_channels} must be a non-empty list of positive widths")
        if self.reference == "metadata" and not self.metadata_key:
            raise ConfigError("style.reference=metadata needs style.metadata_key (the json field naming the style)")


@dataclass
class OptimConfig:
    name: Literal["adamw", "adam", "sgd"] = "adamw"  # DeepSpeed optimizers; offload uses DeepSpeedCPUAdam
    lr: float = 1e-4
    weight_decay: float = 0.01
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    warmup_steps: int = 500  # linear warm-up of the LR, then cosine (DeepSpeed's WarmupCosineLR); 0 = none
    min_lr_ratio: float = 0.1  # cosine decays to lr * min_lr_ratio at max_steps
    grad_clip: float = 1.0  # global gradient-norm clip; 0 = off
    # on CUDA, DeepSpeed's FusedAdam (multi-tensor kernel, JIT-built once per TORCH_EXTENSIONS_DIR); false or on
    # CPU: torch's AdamW. Offload always uses DeepSpeedCPUAdam.
    fused_adam: bool = True

    def check(self) -> None:
        _positive("optim.lr", self.lr)
        _positive("optim.weight_decay", self.weight_decay, allow_zero=True)
        _positive("optim.grad_clip", self.grad_clip, allow_zero=True)
        _positive("optim.warmup_steps", self.warmup_steps, allow_zero=True)


@dataclass
class DeepSpeedConfig:
    zero_stage: Literal[0, 1, 2, 3] = 2  # 0: DDP-like; 1: optimizer; 2: + gradients; 3: + parameters sharded
    precision: Literal["fp32", "bf16", "fp16"] = "bf16"  # fp16 needs a GPU
    offload_optimizer: bool = False  # ZeRO-Offload: optimizer states and step on the CPU (stages 1-3)
    offload_param: bool = False  # ZeRO-3 only: parameters on the CPU between uses
    extra: dict[str, Any] = field(default_factory=dict)  # merged last into the DeepSpeed config

    def check(self) -> None:
        if self.offload_param and self.zero_stage != 3:
            raise ConfigError("deepspeed.offload_param=true needs deepspeed.zero_stage=3")
        if self.offload_optimizer and self.zero_stage == 0:
            raise ConfigError("deepspeed.offload_optimizer=true needs deepspeed.zero_stage 1, 2 or 3")


@dataclass
class TrainConfig:
    stage: Literal["diffusion", "autoencoder"] = "diffusion"  # what this run trains (ldmscale.stages)
    out_dir: str = "runs/default"
    seed: int = 0
    max_steps: int = 1000
    global_batch_size: int = 256
    micro_batch_size: int = 32  # per rank; accumulation = global / (ranks * micro)
    ema_decay: float = 0.9999  # 0 disables EMA
    ema_start_step: int = 0
    ema_warmup: bool = True  # decay min(ema_decay, (1+n)/(10+n)) after n updates, so random init fades fast
    ckpt_every: int = 1000
    keep_last: int = 3
    log_every: int = 10
    sample_every: int = 0  # 0 = only at the end
    eval_every: int = 0  # validation loss on data.val_shards every N steps and at the end; 0 = off
    eval_samples: int = 256  # the fixed held-out samples it averages (the first N of data.val_shards)
    log_sample_keys: bool = False  # write every rank's sample keys per step (resume audits, tests)
    peak_tflops: float = 0.0  # per device, for MFU; 0 = look up the GPU, none on CPU
    cudnn_benchmark: bool = True  # CUDA: let cuDNN pick the fastest convolution kernels for the fixed shapes

    def check(self) -> None:
        for key in ("max_steps", "global_batch_size", "micro_batch_size", "log_every", "keep_last", "ckpt_every"):
            _positive(f"train.{key}", getattr(self, key))
        _positive("train.sample_every", self.sample_every, allow_zero=True)
        _positive("train.eval_every", self.eval_every, allow_zero=True)
        _positive("train.eval_samples", self.eval_samples)
        _probability("train.ema_decay", self.ema_decay)


@dataclass
class SampleConfig:
    prompts: list[str] = field(default_factory=lambda: ["a photograph of an astronaut riding a horse"])
    num_steps: int = 50
    guidance_scale: float = 7.5
    sampler: SamplerName = "ddim"
    images_per_prompt: int = 1

    def check(self) -> None:
        _positive("sample.num_steps", self.num_steps)
        _positive("sample.images_per_prompt", self.images_per_prompt)


@dataclass
class WandbConfig:
    mode: Literal["online", "offline", "disabled"] = "disabled"
    project: str = "ldmscale"
    entity: str = ""
    name: str = ""
    tags: list[str] = field(default_factory=list)


@dataclass
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    autoencoder: AutoencoderConfig = field(default_factory=AutoencoderConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    deepspeed: DeepSpeedConfig = field(default_factory=DeepSpeedConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    sample: SampleConfig = field(default_factory=SampleConfig)
    style: StyleConfig = field(default_factory=StyleConfig)
    wandb: WandbConfig = field(default_factory=WandbConfig)

    def check(self) -> None:
        """Every range check that needs neither the world size, the device nor the filesystem."""
        for f in dataclasses.fields(self):
            section = getattr(self, f.name)
            if hasattr(section, "check"):
                section.check()
        if self.data.format == "latents" and self.train.stage != "diffusion":
            raise ConfigError("data.format=latents feeds the diffusion stage; the autoencoder stage trains on images "
                              "(data.format=images)")
        if self.data.format == "latents" and self.train.eval_every:
            raise ConfigError("train.eval_every encodes data.val_shards (images) with the VAE encoder, which "
                              "data.format=latents does not load: set train.eval_every=0 or train from images")
        if self.data.format == "latents" and self.style.enabled:
            raise ConfigError("style.enabled=true needs each sample's reference image, which latent shards do not "
                              "carry: train style step 2 from the image shards (data.format=images, data.shards=...)")


# ---------------------------------------------------------------- building from dicts


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Convert a YAML/CLI value to the annotated type, or fail naming the key."""
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping of {tp.__name__} fields, got {value!r}")
        return _from_dict(tp, value, key + ".")
    if origin is Literal:
        allowed = list(typing.get_args(tp))
        if value not in allowed or isinstance(value, bool) != any(isinstance(a, bool) for a in allowed):
            raise ConfigError(f"{key}={value!r} is not allowed; choose one of {allowed}")
        return value
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if value is None:
            return None
        return _coerce(value, args[0], key)
    if origin is list:
        (item,) = typing.get_args(tp)
        if isinstance(value, str | int | float):
            value = [value]
        if not isinstance(value, list | tuple):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        return [_coerce(v, item, f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is tuple:
        items = typing.get_args(tp)
        if not isinstance(value, list | tuple) or len(value) != len(items):
            raise ConfigError(f"{key}: expected a list of {len(items)} values, got {value!r}")
        return tuple(_coerce(v, t, f"{key}[{i}]") for i, (v, t) in enumerate(zip(value, items)))
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        return dict(value)
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{key}: expected true or false, got {value!r}")
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            if isinstance(value, float) and value.is_integer():
                return int(value)
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, str):  # YAML 1.1 reads "3e-4" (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str | int | float) or isinstance(value, bool):
            raise ConfigError(f"{key}: expected a string, got {value!r}")
        return str(value)
    return value


def _from_dict(cls: type, data: dict[str, Any], prefix: str = "") -> Any:
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ConfigError(
            f"unknown config key {prefix}{unknown[0]}; allowed keys in {prefix or 'the top level'}: "
            + ", ".join(sorted(names))
        )
    kwargs = {k: _coerce(v, hints[k], prefix + k) for k, v in data.items()}
    base = cls()
    for k, v in kwargs.items():
        if dataclasses.is_dataclass(v):
            # merge nested sections field by field so a partial YAML section keeps the other defaults
            sub = getattr(base, k)
            for f in dataclasses.fields(v):
                if f.name in data[k]:
                    setattr(sub, f.name, getattr(v, f.name))
            v = sub
        setattr(base, k, v)
    return base


def _deep_merge(into: dict[str, Any], other: dict[str, Any]) -> dict[str, Any]:
    for k, v in other.items():
        if isinstance(v, dict) and isinstance(into.get(k), dict):
            _deep_merge(into[k], v)
        else:
            into[k] = v
    return into


def parse_override(item: str) -> dict[str, Any]:
    """`a.b.c=value` -> {"a": {"b": {"c": value}}}; the value is parsed as YAML (numbers, lists, bools)."""
    if "=" not in item:
        raise ConfigError(f"override {item!r} is not of the form section.key=value")
    path, raw = item.split("=", 1)
    try:
        value = yaml.safe_load(raw) if raw != "" else ""
    except yaml.YAMLError as e:
        raise ConfigError(
            f"override {item!r}: the value is not valid YAML ({str(e).splitlines()[0]}); quote strings that "
            f"hold braces or colons inside a list, e.g. 'data.shards=[\"s3://b/{{00000..00099}}.tar\"]'"
        ) from None
    out: dict[str, Any] = {}
    node = out
    parts = path.strip().split(".")
    for p in parts[:-1]:
        node = node.setdefault(p, {})
    node[parts[-1]] = value
    return out


def load_config(path: str | os.PathLike[str] | None = None, overrides: list[str] | None = None) -> Config:
    """Defaults <- YAML file (which may `include:` other YAML files) <- `key=value` overrides; then validate."""
    raw: dict[str, Any] = {}
    if path:
        raw = _read_yaml(Path(path))
    for item in overrides or []:
        _deep_merge(raw, parse_override(item))
    cfg = _from_dict(Config, raw)
    validate(cfg)
    return cfg


def _read_yaml(path: Path) -> dict[str, Any]:
    if not path.exists():
        raise ConfigError(f"config file {path} does not exist; configs/ has the shipped ones")
    data = yaml.safe_load(path.read_text()) or {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of sections")
    merged: dict[str, Any] = {}
    for inc in data.pop("include", []) or []:
        _deep_merge(merged, _read_yaml((path.parent / inc).resolve()))
    return _deep_merge(merged, data)


def to_dict(cfg: Config) -> dict[str, Any]:
    def conv(x: Any) -> Any:
        if isinstance(x, tuple):
            return list(x)
        if isinstance(x, dict):
            return {k: conv(v) for k, v in x.items()}
        if isinstance(x, list):
            return [conv(v) for v in x]
        return x

    return conv(dataclasses.asdict(cfg))


def public_dict(cfg: Config) -> dict[str, Any]:
    """The config as saved and logged (config.yaml, checkpoints, W&B): storage credentials masked."""
    d = to_dict(cfg)
    d["data"]["storage_options"] = redact(d["data"]["storage_options"])
    return d


def dump_config(cfg: Config) -> str:
    return yaml.safe_dump(public_dict(cfg), sort_keys=False)


# Fields added with a default that changes what a saved run meant: a config saved before the field existed gets
# the value its run actually used, not today's default (else its checkpoint no longer loads).
ADDED_FIELDS_OLD_VALUES: dict[tuple[str, str], Any] = {
    ("style", "colour_stats"): False,  # the style encoder's colour-statistics input (new default: on)
}


def config_from_yaml_text(text: str) -> Config:
    """Rebuild a saved config (no validation of paths: a checkpoint may have moved machines)."""
    raw = yaml.safe_load(text) or {}
    for (section, key), old in ADDED_FIELDS_OLD_VALUES.items():
        if isinstance(raw.get(section), dict) and key not in raw[section]:
            raw[section][key] = old
    return _from_dict(Config, raw)


# ---------------------------------------------------------------- validation


def _looks_local(ref: str) -> bool:
    return ref.startswith(("/", "./", "../", "~")) or os.path.sep in ref and ref.count("/") != 1


def check_model_ref(key: str, ref: str, need: str = "") -> None:
    """A local folder must exist (and hold `need`); a hub id needs a network the user has."""
    if not ref:
        return
    p = Path(os.path.expanduser(ref))
    if p.exists():
        if need and not (p / need).exists():
            raise ConfigError(f"{key}={ref!r}: the folder has no {need}; point it at a diffusers/transformers folder")
        return
    if _looks_local(ref):
        raise ConfigError(
            f"{key}={ref!r}: no such folder. Write one with tools/make_offline_models.py or give a hub id"
        )
    if os.environ.get("HF_HUB_OFFLINE") == "1":
        raise ConfigError(f"{key}={ref!r} is not a local folder and HF_HUB_OFFLINE=1 forbids the hub")


def world_size_from_env() -> int:
    for var in ("WORLD_SIZE", "SLURM_NTASKS"):
        if os.environ.get(var):
            return int(os.environ[var])
    return 1


def validate(cfg: Config, world_size: int | None = None, device_type: str | None = None) -> None:
    """What needs the world: the number of ranks, the device, the model folders. Runs before any process
    group (from the environment's WORLD_SIZE) and again once the group is up."""
    from ldmscale.models import UNET_PRESETS, VAE_PRESETS  # local: keep config import light

    cfg.check()
    world = world_size or world_size_from_env()
    t, m, ds = cfg.train, cfg.model, cfg.deepspeed
    if device_type is None:
        import torch

        device_type = "cuda" if torch.cuda.is_available() else "cpu"
    if ds.precision == "fp16" and device_type == "cpu":
        raise ConfigError("deepspeed.precision=fp16 is not supported on CPU; use bf16 or fp32")
    per_step = world * t.micro_batch_size
    if t.global_batch_size % per_step:
        raise ConfigError(
            f"train.global_batch_size={t.global_batch_size} is not divisible by ranks ({world}) x "
            f"train.micro_batch_size ({t.micro_batch_size}) = {per_step}; make it a multiple of {per_step}"
        )
    if m.unet not in UNET_PRESETS:
        if "/" not in m.unet and not Path(os.path.expanduser(m.unet)).exists():  # hub ids are org/name
            raise ConfigError(f"model.unet={m.unet!r} is no preset ({', '.join(UNET_PRESETS)}), folder or hub id "
                              f"(org/name)")
        check_model_ref("model.unet", m.unet, need="config.json")
    if t.eval_every and t.stage != "diffusion":
        raise ConfigError("train.eval_every (a diffusion validation loss) is for train.stage=diffusion; set it to 0")
    if t.eval_every and not cfg.data.val_shards:
        raise ConfigError("train.eval_every needs data.val_shards: held-out shards, e.g. data.val_shards='[DIR/val]'")
    if t.stage == "autoencoder":
        if not m.vae and m.vae_preset not in VAE_PRESETS:
            raise ConfigError(f"model.vae_preset={m.vae_preset!r} is not allowed; choose one of {list(VAE_PRESETS)}")
        check_model_ref("model.vae", m.vae, need="config.json")
        return
    if not (m.pretrained or (m.vae and m.text_encoder and m.tokenizer)):
        raise ConfigError(
            "the diffusion stage needs model.pretrained (a folder with vae/ text_encoder/ tokenizer/) "
            "or all of model.vae, model.text_encoder and model.tokenizer"
        )
    check_model_ref("model.pretrained", m.pretrained)
    check_model_ref("model.vae", m.vae, need="config.json")
    check_model_ref("model.text_encoder", m.text_encoder, need="config.json")
    check_model_ref("model.tokenizer", m.tokenizer)
    s = cfg.style
    if s.enabled and s.backbone == "clip":
        check_model_ref("style.vision_model", s.vision_model, need="config.json")
    if s.enabled and s.init_from and not Path(os.path.expanduser(s.init_from)).exists():
        raise ConfigError(f"style.init_from={s.init_from!r}: no such run dir or checkpoint folder")
