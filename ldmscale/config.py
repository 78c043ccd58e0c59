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
from typing import Any

import yaml


class ConfigError(ValueError):
    """A configuration problem, with the key at fault and what is allowed."""


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
    storage_options: dict[str, Any] = field(default_factory=dict)  # fsspec options (endpoint_url, key, ...)
    resolution: int = 256
    center_crop: bool = True
    random_flip: bool = False
    num_workers: int = 2
    shuffle_buffer: int = 1000
    samples_per_epoch: int = 0  # 0 = count from the shards' *_stats.json files
    caption_dropout: float = 0.1  # probability a caption is replaced by "" (classifier-free guidance)
    filters: FilterConfig = field(default_factory=FilterConfig)


@dataclass
class ModelConfig:
    pretrained: str = ""  # a diffusers pipeline folder or hub id holding vae/ text_encoder/ tokenizer/ (unet/)
    vae: str = ""  # overrides <pretrained>/vae
    text_encoder: str = ""  # overrides <pretrained>/text_encoder
    tokenizer: str = ""  # overrides <pretrained>/tokenizer
    unet: str = "tiny"  # a preset name (see models.UNET_PRESETS) or a folder/hub id to fine-tune from
    vae_preset: str = "tiny"  # autoencoder stage: the architecture to train when model.vae is empty
    prediction_type: str = "epsilon"  # epsilon | v_prediction
    num_train_timesteps: int = 1000
    beta_schedule: str = "scaled_linear"
    snr_gamma: float = 0.0  # >0 enables min-SNR-gamma loss weighting
    noise_offset: float = 0.0
    gradient_checkpointing: bool = False
    attention: str = "sdpa"  # sdpa | default


@dataclass
class AutoencoderConfig:
    kl_weight: float = 1e-6  # the LDM paper's KL-regularised autoencoder
    l1_weight: float = 1.0
    l2_weight: float = 0.0
    scaling_samples: int = 512  # images encoded to measure the latent scaling factor (1 / std)


@dataclass
class StyleConfig:
    """Style conditioning (step 2 of a two-step run): a KL-regularised style encoder whose tokens reach the
    U-Net through a separate, zero-initialised cross-attention path (ldmscale/style/attention.py)."""

    enabled: bool = False
    backbone: str = "conv"  # conv (small net trained from scratch) | clip (frozen CLIPVisionModel + trainable head)
    vision_model: str = ""  # backbone=clip: a CLIPVisionModel folder or hub id (from_pretrained)
    conv_channels: list[int] = field(default_factory=lambda: [32, 64, 128])  # backbone=conv: stride-2 stages
    num_tokens: int = 4  # K style tokens in the U-Net's cross-attention space
    # weight of KL(q(s|ref) || N(0, I)), KL in nats per sample while the denoising loss is a per-element mean:
    # 1e-3 collapsed the posterior in the style demo (KL 0.009 nats, style followed at chance), 1e-5 did not
    beta: float = 1e-5
    beta_warmup_steps: int = 0  # beta rises linearly from 0 to `beta` over these steps (0 = constant)
    reference: str = "augment"  # augment (another view of the same image) | metadata (another image, same style)
    metadata_key: str = "style"  # reference=metadata: the json field naming a sample's style
    pair_window: int = 64  # reference=metadata: partners are drawn from the last N samples of the same style
    crop_scale: tuple[float, float] = (0.5, 1.0)  # reference=augment: crop area range of the view
    shuffle_grid: int = 4  # reference=augment: the view's tiles are permuted on a g x g grid (1 = off)
    dropout: float = 0.1  # probability the style tokens are zeroed (classifier-free guidance on style)
    init_from: str = ""  # step-1 run dir, checkpoints/ folder or step_* folder: U-Net weights to start from
    init_weights: str = "ema"  # ema | raw: which step-1 weights
    guidance_scale: float = 3.0  # in-training sample grids and the CLI default


@dataclass
class OptimConfig:
    name: str = "adamw"  # adamw | adam | sgd (DeepSpeed optimizers; offload uses DeepSpeedCPUAdam)
    lr: float = 1e-4
    weight_decay: float = 0.01
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    warmup_steps: int = 500
    min_lr_ratio: float = 0.1  # cosine decays to lr * min_lr_ratio at max_steps
    grad_clip: float = 1.0


@dataclass
class DeepSpeedConfig:
    zero_stage: int = 2
    precision: str = "bf16"  # fp32 | bf16 | fp16 (fp16 needs a GPU)
    offload_optimizer: bool = False
    offload_param: bool = False  # ZeRO-3 only
    extra: dict[str, Any] = field(default_factory=dict)  # merged last into the DeepSpeed config


@dataclass
class TrainConfig:
    stage: str = "diffusion"  # diffusion | autoencoder
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
    log_sample_keys: bool = False  # write every rank's sample keys per step (resume audits, tests)
    peak_tflops: float = 0.0  # per device, for MFU; 0 = look up the GPU, none on CPU


@dataclass
class SampleConfig:
    prompts: list[str] = field(default_factory=lambda: ["a photograph of an astronaut riding a horse"])
    num_steps: int = 50
    guidance_scale: float = 7.5
    sampler: str = "ddim"  # ddim | dpmsolver++ | euler | ddpm
    images_per_prompt: int = 1


@dataclass
class WandbConfig:
    mode: str = "disabled"  # online | offline | disabled
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


# ---------------------------------------------------------------- building from dicts


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Convert a YAML/CLI value to the annotated type, or fail naming the key."""
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping of {tp.__name__} fields, got {value!r}")
        return _from_dict(tp, value, key + ".")
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


SECRET_WORDS = ("secret", "key", "token", "password", "credential", "session")


def _redacted(options: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in options.items():
        if isinstance(v, dict):
            out[k] = _redacted(v)
        else:
            out[k] = "***" if any(w in k.lower() for w in SECRET_WORDS) else v
    return out


def public_dict(cfg: Config) -> dict[str, Any]:
    """The config as saved and logged (config.yaml, checkpoints, W&B): storage credentials masked."""
    d = to_dict(cfg)
    d["data"]["storage_options"] = _redacted(d["data"]["storage_options"])
    return d


def dump_config(cfg: Config) -> str:
    return yaml.safe_dump(public_dict(cfg), sort_keys=False)


def config_from_yaml_text(text: str) -> Config:
    """Rebuild a saved config (no validation of paths: a checkpoint may have moved machines)."""
    return _from_dict(Config, yaml.safe_load(text) or {})


# ---------------------------------------------------------------- validation


def _choice(key: str, value: Any, allowed: typing.Iterable[Any]) -> None:
    allowed = list(allowed)
    if value not in allowed:
        raise ConfigError(f"{key}={value!r} is not allowed; choose one of {allowed}")


def _positive(key: str, value: float, allow_zero: bool = False) -> None:
    if value < 0 or (value == 0 and not allow_zero):
        raise ConfigError(f"{key}={value!r} must be {'>= 0' if allow_zero else '> 0'}")


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
    """Reject impossible combinations before any process group starts."""
    from ldmscale.models import UNET_PRESETS, VAE_PRESETS  # local: keep config import light

    world = world_size or world_size_from_env()
    t, d, m, o, ds = cfg.train, cfg.data, cfg.model, cfg.optim, cfg.deepspeed
    _choice("train.stage", t.stage, ["diffusion", "autoencoder"])
    _choice("deepspeed.zero_stage", ds.zero_stage, [0, 1, 2, 3])
    _choice("deepspeed.precision", ds.precision, ["fp32", "bf16", "fp16"])
    _choice("model.prediction_type", m.prediction_type, ["epsilon", "v_prediction"])
    _choice("model.attention", m.attention, ["sdpa", "default"])
    _choice("optim.name", o.name, ["adamw", "adam", "sgd"])
    _choice("sample.sampler", cfg.sample.sampler, ["ddim", "dpmsolver++", "euler", "ddpm"])
    _choice("wandb.mode", cfg.wandb.mode, ["online", "offline", "disabled"])
    if device_type is None:
        import torch

        device_type = "cuda" if torch.cuda.is_available() else "cpu"
    if ds.precision == "fp16" and device_type == "cpu":
        raise ConfigError("deepspeed.precision=fp16 is not supported on CPU; use bf16 or fp32")
    if ds.offload_param and ds.zero_stage != 3:
        raise ConfigError("deepspeed.offload_param=true needs deepspeed.zero_stage=3")
    if ds.offload_optimizer and ds.zero_stage == 0:
        raise ConfigError("deepspeed.offload_optimizer=true needs deepspeed.zero_stage 1, 2 or 3")
    for key in ("max_steps", "global_batch_size", "micro_batch_size", "log_every", "keep_last", "ckpt_every"):
        _positive(f"train.{key}", getattr(t, key))
    _positive("train.sample_every", t.sample_every, allow_zero=True)
    _positive("optim.lr", o.lr)
    _positive("data.resolution", d.resolution)
    _positive("data.num_workers", d.num_workers, allow_zero=True)
    if not 0.0 <= t.ema_decay < 1.0:
        raise ConfigError(f"train.ema_decay={t.ema_decay} must be in [0, 1); 0 disables EMA")
    if not 0.0 <= d.caption_dropout < 1.0:
        raise ConfigError(f"data.caption_dropout={d.caption_dropout} must be in [0, 1)")
    per_step = world * t.micro_batch_size
    if t.global_batch_size % per_step:
        raise ConfigError(
            f"train.global_batch_size={t.global_batch_size} is not divisible by ranks ({world}) x "
            f"train.micro_batch_size ({t.micro_batch_size}) = {per_step}; make it a multiple of {per_step}"
        )
    if not d.shards:
        raise ConfigError("data.shards is empty; give shard URLs, e.g. data.shards='[s3://bucket/{00000..00099}.tar]'")
    if d.resolution % 8:
        raise ConfigError(f"data.resolution={d.resolution} must be a multiple of 8")
    if m.unet not in UNET_PRESETS:
        check_model_ref("model.unet", m.unet, need="config.json")
    if t.stage == "autoencoder":
        if not m.vae and m.vae_preset not in VAE_PRESETS:
            _choice("model.vae_preset", m.vae_preset, VAE_PRESETS)
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
    validate_style(cfg.style)


def validate_style(s: StyleConfig) -> None:
    if not s.enabled:
        return
    _choice("style.backbone", s.backbone, ["conv", "clip"])
    _choice("style.reference", s.reference, ["augment", "metadata"])
    _choice("style.init_weights", s.init_weights, ["ema", "raw"])
    _positive("style.num_tokens", s.num_tokens)
    _positive("style.beta", s.beta, allow_zero=True)
    _positive("style.beta_warmup_steps", s.beta_warmup_steps, allow_zero=True)
    _positive("style.pair_window", s.pair_window)
    _positive("style.shuffle_grid", s.shuffle_grid)
    if not 0.0 <= s.dropout < 1.0:
        raise ConfigError(f"style.dropout={s.dropout} must be in [0, 1)")
    lo, hi = s.crop_scale
    if not 0.0 < lo <= hi <= 1.0:
        raise ConfigError(f"style.crop_scale={list(s.crop_scale)} must satisfy 0 < low <= high <= 1")
    if s.backbone == "clip":
        if not s.vision_model:
            raise ConfigError("style.backbone=clip needs style.vision_model (a CLIPVisionModel folder or hub id)")
        check_model_ref("style.vision_model", s.vision_model, need="config.json")
    elif not s.conv_channels or any(c <= 0 for c in s.conv_channels):
        raise ConfigError(f"style.conv_channels={s.conv_channels} must be a non-empty list of positive widths")
    if s.reference == "metadata" and not s.metadata_key:
        raise ConfigError("style.reference=metadata needs style.metadata_key (the json field naming the style)")
    if s.init_from and not Path(os.path.expanduser(s.init_from)).exists():
        raise ConfigError(f"style.init_from={s.init_from!r}: no such run dir or checkpoint folder")
