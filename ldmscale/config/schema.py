"""The configuration's sections as typed dataclasses: every default, and every range check that needs neither the
world size, the device nor the filesystem (`Config.check`). Each field's comment says what it means; the
reference in docs/reference/config.md is generated from them (tools/gen_config_reference.py).
"""

from __future__ import annotations

import dataclasses
import math
import re
import typing
from dataclasses import dataclass, field
from typing import Any, Literal

from ldmscale.runtime.errors import InputError


class ConfigError(InputError, ValueError):
    """A configuration problem, with the key at fault and what is allowed."""

    kind = "config error"


# Sampler names, in one place: the config's choice, ldmscale-sample's --sampler, ldmscale.inference.samplers' table.
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
    min_height: int = 0  # on original_height
    min_aspect: float = 0.0  # width / height
    max_aspect: float = 0.0  # 0 = no limit
    min_similarity: float = 0.0  # LAION's CLIP image-text similarity
    allowed_nsfw: list[str] = field(default_factory=list)  # e.g. ["UNLIKELY"]; empty = keep all
    max_pwatermark: float = 1.0  # LAION-5B / aesthetic subsets only
    max_punsafe: float = 1.0  # LAION-5B / aesthetic subsets only
    min_caption_chars: int = 1  # captions shorter than this (after strip) are dropped
    max_caption_chars: int = 0  # 0 = no limit


SOURCE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")  # a source's name: part of W&B keys (data/<name>/share)
CaptionKey = str | dict[str, float]


def check_caption_key(key: str, value: CaptionKey) -> None:
    """`txt` (or another member such as `caption.txt`), `json.<field>[.<field>...]`, or {one of those: probability}
    with probabilities summing to 1 (one picked per sample id)."""
    choices = value if isinstance(value, dict) else {value: 1.0}
    if not choices:
        raise ConfigError(f"{key}={{}}: give a caption field (txt, json.caption, ...) or {{field: probability, ...}}")
    for name, p in choices.items():
        if not isinstance(name, str) or name in ("", "json", "json."):
            raise ConfigError(f"{key}: {name!r} names no caption field; use txt, json.<field> (e.g. json.caption) or "
                              f"another member's extension")
        if not isinstance(p, int | float) or isinstance(p, bool) or not p > 0:
            raise ConfigError(f"{key}: the probability of {name!r} is {p!r}; each must be a number > 0")
    if isinstance(value, dict) and abs(sum(value.values()) - 1.0) > 1e-6:
        raise ConfigError(f"{key}={value}: the probabilities sum to {sum(value.values()):g}, not 1")


@dataclass
class SourceConfig:
    """One weighted source of a mixture (data.sources)."""

    name: str = ""  # names the source in logs and W&B (data/<name>/share): letters, digits, _ . -
    shards: list[str] = field(default_factory=list)  # the forms data.shards takes
    weight: float = 0.0  # expected share of the samples drawn (after filtering); weights are normalised to sum 1
    # the caption: txt, json.<field> (json.caption, json.recaption), or {field: probability} picked per sample id;
    # "" = data.caption_key
    caption_key: CaptionKey = ""
    filters: FilterConfig | None = None  # replaces data.filters for this source (fields it omits take defaults)
    storage_options: dict[str, Any] = field(default_factory=dict)  # merged over data.storage_options (a bucket...)


@dataclass
class BucketConfig:
    """Aspect-ratio buckets (ldmscale/data/buckets.py): every image is resized to cover the canvas nearest its
    aspect ratio and cropped to it (at the centre, or at a random offset fixed per sample with
    data.center_crop=false), instead of to the data.resolution square."""

    enabled: bool = False
    # canvas sides are multiples of this many pixels: a multiple of the VAE's downsampling factor x the U-Net's
    # (8 x 8 = 64 for Stable Diffusion; checked against the models)
    step: int = 64
    max_aspect: float = 2.0  # widest canvas width / height (and tallest height / width); >= 1

    def check(self, resolution: int) -> None:
        if not self.enabled:
            return
        _positive("data.buckets.step", self.step)
        if self.step > resolution:
            raise ConfigError(f"data.buckets.step={self.step} is larger than data.resolution={resolution}; canvases "
                              f"are multiples of the step around the resolution: give a step of at most {resolution}")
        if self.max_aspect < 1.0:
            raise ConfigError(f"data.buckets.max_aspect={self.max_aspect} must be >= 1 (2.0 allows 2:1 and 1:2)")


@dataclass
class DataConfig:
    shards: list[str] = field(default_factory=list)  # URLs, brace patterns, globs, dirs, prefixes ending "/"
    # a mixture: weighted sources [{name, shards, weight, caption_key?, filters?, storage_options?}]; data.shards is
    # the one-source shorthand (give one or the other)
    sources: list[SourceConfig] = field(default_factory=list)
    # the caption: txt, json.<field> (json.caption, json.recaption), or {field: probability} picked per sample id
    caption_key: CaptionKey = "txt"
    val_shards: list[str] = field(default_factory=list)  # held-out shards for train.eval_every (same forms as shards)
    # images: JPEG shards, VAE-encoded every step | latents: shards written once by ldmscale-encode (posterior
    # moments), checked against this config through their manifest.json
    format: Literal["images", "latents"] = "images"
    storage_options: dict[str, Any] = field(default_factory=dict)  # fsspec options (endpoint_url, key, ...)
    resolution: int = 256  # square training size in pixels; a multiple of 8
    center_crop: bool = True  # else the top-left square
    random_flip: bool = False  # mirror half the images of each epoch left-right (which: seed, epoch, sample key)
    num_workers: int = 2  # DataLoader workers per rank (0 = decode in the training process)
    shuffle_buffer: int = 1000  # samples held by each worker's shuffle buffer
    # 0 = the shards' *_stats.json `successes` x the filters' measured pass rate (a mixture: summed over its
    # sources); an epoch draws this many samples from the sources by weight
    samples_per_epoch: int = 0
    caption_dropout: float = 0.1  # probability a caption is replaced by "" (classifier-free guidance)
    # loader worker processes: auto = spawn on CUDA (fork after CUDA init is unsafe), fork on CPU (faster start)
    start_method: Literal["auto", "fork", "spawn"] = "auto"
    # shards that may be missing or fail twice (retried once, later) in an epoch, over the whole job, before the
    # run stops: below 1 a share of data.shards, from 1 on a count (checked on the per-step sum over all ranks)
    max_failed_shards: float = 0.01
    # a resume over another shard list than the checkpoint's: refuse (exit 2, naming what changed) | new_epoch
    # (skip the rest of the saved epoch and start the next one over the new list, with a warning)
    on_shard_list_change: Literal["refuse", "new_epoch"] = "refuse"
    max_member_bytes: int = 64 * 2**20  # tar members above this are skipped unread (`too_large`); 0 = no cap
    filters: FilterConfig = field(default_factory=FilterConfig)
    buckets: BucketConfig = field(default_factory=BucketConfig)

    def check(self) -> None:
        _positive("data.resolution", self.resolution)
        if self.resolution % 8:
            raise ConfigError(f"data.resolution={self.resolution} must be a multiple of 8")
        self.buckets.check(self.resolution)
        _positive("data.num_workers", self.num_workers, allow_zero=True)
        _positive("data.shuffle_buffer", self.shuffle_buffer, allow_zero=True)
        _probability("data.caption_dropout", self.caption_dropout)
        _positive("data.max_failed_shards", self.max_failed_shards, allow_zero=True)
        if self.max_failed_shards >= 1 and self.max_failed_shards != int(self.max_failed_shards):
            raise ConfigError(f"data.max_failed_shards={self.max_failed_shards} must be a share below 1 or a whole "
                              f"number of shards")
        _positive("data.max_member_bytes", self.max_member_bytes, allow_zero=True)
        _positive("data.samples_per_epoch", self.samples_per_epoch, allow_zero=True)
        check_caption_key("data.caption_key", self.caption_key)
        if self.shards and self.sources:
            raise ConfigError("data.shards and data.sources are both set: data.shards is the one-source shorthand; "
                              "move its shards into a source of data.sources, or drop data.sources")
        if self.sources:
            self._check_sources()
        elif not self.shards:
            raise ConfigError(
                "data.shards is empty; give shard URLs, e.g. data.shards='[s3://bucket/{00000..00099}.tar]', or "
                "weighted sources in data.sources"
            )

    def _check_sources(self) -> None:
        names: set[str] = set()
        for i, s in enumerate(self.sources):
            key = f"data.sources[{s.name or i}]"
            if not SOURCE_NAME.fullmatch(s.name or ""):
                raise ConfigError(f"data.sources[{i}].name={s.name!r}: give each source a name of letters, digits, "
                                  f"_ . - (it names the source in logs and W&B)")
            if s.name in names:
                raise ConfigError(f"data.sources: two sources are named {s.name!r}; names must be unique")
            names.add(s.name)
            if not s.shards:
                raise ConfigError(f"{key}.shards is empty; give the source's shard URLs (the forms data.shards takes)")
            if not (isinstance(s.weight, int | float) and math.isfinite(s.weight) and s.weight > 0):
                raise ConfigError(f"{key}.weight={s.weight!r} must be a number > 0 (its expected share of the samples; "
                                  f"weights are normalised to sum 1)")
            if s.caption_key != "":
                check_caption_key(f"{key}.caption_key", s.caption_key)
        total = sum(s.weight for s in self.sources)
        if not (math.isfinite(total) and total > 0):
            raise ConfigError(f"data.sources: the weights sum to {total!r}; they must sum to a positive number")


@dataclass
class ModelConfig:
    pretrained: str = ""  # a diffusers pipeline folder or hub id holding vae/ text_encoder/ tokenizer/ (unet/)
    vae: str = ""  # overrides <pretrained>/vae
    text_encoder: str = ""  # overrides <pretrained>/text_encoder
    tokenizer: str = ""  # overrides <pretrained>/tokenizer
    unet: str = "tiny"  # a preset name (ldmscale/config/presets.py) or a folder/hub id to fine-tune from
    vae_preset: str = "tiny"  # autoencoder stage: the architecture to train when model.vae is empty
    prediction_type: Literal["epsilon", "v_prediction"] = "epsilon"  # what the U-Net predicts
    num_train_timesteps: int = 1000  # T, the diffusion schedule's number of steps
    beta_schedule: Literal["scaled_linear", "linear", "squaredcos_cap_v2"] = "scaled_linear"  # DDPMScheduler's
    snr_gamma: float = 0.0  # >0 enables min-SNR-gamma loss weighting
    noise_offset: float = 0.0  # per-channel offset noise (brighter/darker images); 0 = off
    gradient_checkpointing: bool = False  # recompute activations in backward: memory for compute
    attention: Literal["sdpa", "default"] = "sdpa"  # torch's scaled_dot_product_attention | the math path
    # torch.compile of the trained network (nn.Module.compile: in place, parameter names unchanged; under ZeRO-3
    # DeepSpeed's engine.compile of the module it wraps); the first steps pay the compilation. backend: inductor
    # on GPUs; aot_eager traces without code generation (tests)
    compile: bool = False
    compile_mode: Literal["default", "reduce-overhead", "max-autotune"] = "default"  # torch.compile's mode
    compile_backend: Literal["inductor", "aot_eager", "eager"] = "inductor"  # torch.compile's backend
    # NHWC activations into the U-Net (under ZeRO-0 the conv weights too): faster convolutions on tensor cores
    channels_last: bool = False
    # how training timesteps are drawn (docs/training-recipes.md): uniform over [0, num_train_timesteps) | the
    # logit-normal of SD3 (Esser et al. 2024): t = floor(sigmoid(logit_mean + logit_std * z) * num_train_timesteps),
    # z standard normal, which trains the middle of the schedule more than its ends
    timestep_sampling: Literal["uniform", "logit_normal"] = "uniform"
    logit_mean: float = 0.0  # logit_normal: the centre (> 0 favours noisier timesteps)
    logit_std: float = 1.0  # logit_normal: the spread (large values approach two peaks at the ends)
    # immiscible diffusion (Li et al. 2024): within each micro-batch the drawn noises are assigned to the latents by
    # a minimum-total-distance linear assignment (scipy's linear_sum_assignment on the host; a B x B matrix). On the
    # text-conditioned demo the model then ignored the prompt (docs/results/time-to-quality.md)
    immiscible: bool = False
    # rescale the betas to zero terminal SNR (Lin et al. 2024, diffusers' rescale_betas_zero_snr): the last timestep
    # is pure noise, as at sampling. Needs v_prediction; sampling and exported schedulers then space timesteps
    # "trailing" (they start at the last one)
    zero_terminal_snr: bool = False
    # SDXL's micro-conditioning: (original height, width, crop top, left, target height, width) through sinusoidal
    # embeddings of size_embed_dim each into the U-Net's time embedding (diffusers' addition_embed_type
    # "text_time", zero-initialised). Not dropped with the caption (as SDXL). Sampling: --original-size, --crop,
    # --target-size (default: original = target, crop 0,0)
    size_conditioning: bool = False
    size_embed_dim: int = 256  # per number; SDXL's addition_time_embed_dim

    def check(self) -> None:
        _positive("model.num_train_timesteps", self.num_train_timesteps)
        _positive("model.snr_gamma", self.snr_gamma, allow_zero=True)
        _positive("model.noise_offset", self.noise_offset, allow_zero=True)
        _positive("model.logit_std", self.logit_std)
        if self.zero_terminal_snr and self.prediction_type != "v_prediction":
            raise ConfigError("model.zero_terminal_snr=true needs model.prediction_type=v_prediction (at zero SNR the "
                              "noisy latent is pure noise and an epsilon prediction says nothing about the image)")
        if self.size_conditioning and (self.size_embed_dim <= 0 or self.size_embed_dim % 2):
            raise ConfigError(f"model.size_embed_dim={self.size_embed_dim} must be a positive even number "
                              f"(sine and cosine halves), e.g. 256")


@dataclass
class AutoencoderConfig:
    kl_weight: float = 1e-6  # the LDM paper's KL-regularised autoencoder
    l1_weight: float = 1.0  # weight of the L1 reconstruction loss
    l2_weight: float = 0.0  # weight of the L2 (MSE) reconstruction loss
    scaling_samples: int = 512  # images encoded to measure the latent scaling factor (1 / std)

    def check(self) -> None:
        for key in ("kl_weight", "l1_weight", "l2_weight"):
            _positive(f"autoencoder.{key}", getattr(self, key), allow_zero=True)
        _positive("autoencoder.scaling_samples", self.scaling_samples)


@dataclass
class StyleConfig:
    """Style conditioning (step 2 of a two-step run): a KL-regularised style encoder whose tokens reach the
    U-Net through a separate, zero-initialised cross-attention path (ldmscale/style/attention.py)."""

    enabled: bool = False  # train the style encoder and style path (step 2)
    backbone: Literal["conv", "clip"] = "conv"  # conv: small net trained from scratch; clip: frozen CLIP + head
    vision_model: str = ""  # backbone=clip: a CLIPVisionModel folder or hub id (from_pretrained)
    conv_channels: list[int] = field(default_factory=lambda: [32, 64, 128])  # backbone=conv: stride-2 stages
    num_tokens: int = 4  # K style tokens in the U-Net's cross-attention space (an IP-Adapter export needs 4)
    # the encoder's head also sees the reference's per-channel colour mean, std and quantiles
    # (ldmscale/style/encoder.py; measured in docs/results/style.md). None: on for the conv backbone, off for clip
    # (diffusers' IP-Adapter format, what a clip model exports to, cannot carry them)
    colour_stats: bool | None = None
    # backbone=clip: ip_adapter = CLIPVisionModelWithProjection's image_embeds -> Linear -> LayerNorm per token
    # (diffusers' ImageProjection, exported by ldmscale-export); pooled = CLIPVisionModel's pooled output
    # (+ colour statistics) -> LayerNorm -> Linear (style runs before the export existed)
    clip_head: Literal["ip_adapter", "pooled"] = "ip_adapter"
    # the style tokens, projected, also added to the U-Net's time embedding (every ResNet block; style/global_path.py).
    # None: on for the conv backbone, off for clip (the IP-Adapter format cannot carry it)
    global_path: bool | None = None
    lr_scale: float = 1.0  # learning rate of what step 2 adds (style encoder, style attention, global path) x this
    # weight of KL(q(s|ref) || N(0, I)), KL in nats per sample while the denoising loss is a per-element mean; too
    # large collapses the posterior and the style is ignored (docs/results/style.md)
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

    @property
    def uses_colour_stats(self) -> bool:
        return self.backbone == "conv" if self.colour_stats is None else self.colour_stats

    @property
    def uses_global_path(self) -> bool:
        return self.backbone == "conv" if self.global_path is None else self.global_path

    def check(self) -> None:
        if not self.enabled:
            return
        if self.backbone == "clip" and self.clip_head == "ip_adapter" and self.uses_colour_stats:
            raise ConfigError("style.colour_stats=true: the clip backbone's ip_adapter head takes CLIP's image_embeds "
                              "only; set style.clip_head=pooled for colour statistics, or style.colour_stats=false")
        _positive("style.num_tokens", self.num_tokens)
        _positive("style.lr_scale", self.lr_scale)
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
    lr: float = 1e-4  # peak learning rate
    weight_decay: float = 0.01  # decoupled (AdamW) weight decay
    betas: tuple[float, float] = (0.9, 0.999)  # Adam's (beta1, beta2)
    eps: float = 1e-8  # Adam's epsilon
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
class PostHocEMAConfig:
    """Post-hoc EMA (EDM2, Karras et al. 2024): power-function EMAs kept during training and snapshotted, from
    which `ldmscale-ema` reconstructs the EMA of any length after the run (docs/training-recipes.md)."""

    # relative standard deviations of the tracked EMA profiles (the profile's width / the training time so far);
    # empty = off. EDM2 keeps 0.05 and 0.10; each must be in (0, 0.28]
    sigma_rels: list[float] = field(default_factory=list)
    every: int = 1000  # write a snapshot of every profile every N steps (and at the last step) to OUT/posthoc_ema/

    def check(self) -> None:
        if not self.sigma_rels:
            return
        _positive("train.posthoc_ema.every", self.every)
        if len(set(self.sigma_rels)) != len(self.sigma_rels) or any(not 0 < s <= 0.28 for s in self.sigma_rels):
            raise ConfigError(f"train.posthoc_ema.sigma_rels={self.sigma_rels} must be distinct values in (0, 0.28] "
                              f"(0.289 is a uniform average of the whole run), e.g. [0.05, 0.10]")


@dataclass
class TrainConfig:
    stage: Literal["diffusion", "autoencoder"] = "diffusion"  # what this run trains (ldmscale.trainer.stages)
    out_dir: str = "runs/default"  # the run folder: config.yaml, log.jsonl, checkpoints/, samples/
    seed: int = 0  # initial weights, the data order and every per-sample draw derive from it
    max_steps: int = 1000  # optimizer steps of the run (the LR schedule's length)
    global_batch_size: int = 256  # samples per optimizer step, over all ranks
    # per rank; accumulation = global / (ranks * micro). 0 = derived from the world: the largest divisor of
    # global / ranks up to max_micro_batch_size (one config for 8, 128 or 1,024 ranks)
    micro_batch_size: int = 32
    max_micro_batch_size: int = 32  # micro_batch_size=0: the largest micro-batch a GPU takes
    ema_decay: float = 0.9999  # 0 disables EMA
    ema_start_step: int = 0  # the EMA starts updating after this step
    ema_warmup: bool = True  # decay min(ema_decay, (1+n)/(10+n)) after n updates, so random init fades fast
    ckpt_every: int = 1000  # checkpoint every N steps (and on preemption and at the end)
    keep_last: int = 3  # complete checkpoints kept; older ones are pruned
    log_every: int = 10  # steps between log lines (log.jsonl, W&B, stdout)
    sample_every: int = 0  # 0 = only at the end
    eval_every: int = 0  # validation loss on data.val_shards every N steps and at the end; 0 = off
    eval_samples: int = 256  # the fixed held-out samples it averages (the first N of data.val_shards)
    log_sample_keys: bool = False  # write every rank's sample keys per step (resume audits, tests)
    peak_tflops: float = 0.0  # per device, for MFU; 0 = look up the GPU, none on CPU
    cudnn_benchmark: bool = True  # CUDA: let cuDNN pick the fastest convolution kernels for the fixed shapes
    posthoc_ema: PostHocEMAConfig = field(default_factory=PostHocEMAConfig)  # EMA length chosen after training

    def check(self) -> None:
        for key in ("max_steps", "global_batch_size", "max_micro_batch_size", "log_every", "keep_last", "ckpt_every"):
            _positive(f"train.{key}", getattr(self, key))
        _positive("train.micro_batch_size", self.micro_batch_size, allow_zero=True)
        _positive("train.sample_every", self.sample_every, allow_zero=True)
        _positive("train.eval_every", self.eval_every, allow_zero=True)
        _positive("train.eval_samples", self.eval_samples)
        _probability("train.ema_decay", self.ema_decay)
        self.posthoc_ema.check()


@dataclass
class SampleConfig:
    """The sample grids drawn during training (train.sample_every and at the end)."""

    prompts: list[str] = field(default_factory=lambda: ["a photograph of an astronaut riding a horse"])
    num_steps: int = 50  # sampler steps
    guidance_scale: float = 7.5  # classifier-free guidance on the text
    sampler: SamplerName = "ddim"  # a diffusers scheduler by name (ldmscale/inference/samplers.py)
    images_per_prompt: int = 1  # images per prompt: one row of the grid each

    def check(self) -> None:
        _positive("sample.num_steps", self.num_steps)
        _positive("sample.images_per_prompt", self.images_per_prompt)


@dataclass
class WandbConfig:
    mode: Literal["online", "offline", "disabled"] = "disabled"  # offline: the run is written under <out_dir>/wandb/
    project: str = "ldmscale"  # W&B project
    entity: str = ""  # W&B team or user; "" = the default entity
    name: str = ""  # run name; "" = W&B's generated name
    tags: list[str] = field(default_factory=list)  # W&B run tags


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
        if self.data.format == "latents" and any(
                key != "txt" for key in [self.data.caption_key, *(s.caption_key for s in self.data.sources)] if key):
            raise ConfigError("data.format=latents reads each sample's caption from its txt member, where "
                              "ldmscale-encode stored the one caption_key picked: give caption_key when encoding the "
                              "image shards and leave it at txt for the latent shards")
        if self.data.format == "latents" and self.data.random_flip:
            raise ConfigError("data.random_flip=true with data.format=latents: the latents were encoded from the "
                              "images as they are, and a mirrored latent is not the latent of the mirrored image; set "
                              "data.random_flip=false (or train from the image shards)")
        if self.model.size_conditioning and self.train.stage != "diffusion":
            raise ConfigError("model.size_conditioning conditions the diffusion U-Net; the autoencoder stage has "
                              "none: set it to false for train.stage=autoencoder")
        if self.data.format == "latents" and self.style.enabled:
            raise ConfigError("style.enabled=true needs each sample's reference image, which latent shards do not "
                              "carry: train style step 2 from the image shards (data.format=images, data.shards=...)")
