"""The training stages (`train.stage`): what DeepSpeed trains, how a micro-batch becomes a loss, what happens
at the end.

DiffusionStage: frozen VAE + text encoder (+ optional style path) around the U-Net objective; it draws sample
grids and counts the U-Net's FLOPs. AutoencoderStage: the VAE itself; at the end it exports a diffusers folder
with the latent scaling factor measured on the data. Every random draw comes from noise.py keyed by the global
sample ids, so resume stays bitwise.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from diffusers import ModelMixin, UNet2DConditionModel
from diffusers.models.attention_processor import AttnProcessor

from ldmscale.checkpoint.warm_start import init_from_step1
from ldmscale.config import Config, ConfigError
from ldmscale.data import ResumableLoader, normalize_pixels
from ldmscale.data.buckets import bucket_set, grid_buckets
from ldmscale.eval.grid import broadcast_weights, draw_shared, write_grid
from ldmscale.latents.manifest import check_encoders
from ldmscale.models import immiscible, noise
from ldmscale.models.autoencoder import AutoencoderObjective, measure_scaling_factor, save_vae
from ldmscale.models.encoders import FrozenEncoders, load_vae, tokenize
from ldmscale.models.networks import (
    build_unet,
    build_vae,
    strip_prefix,
    unet_downsample_factor,
    vae_downsample_factor,
)
from ldmscale.models.objective import LatentDiffusion, build_noise_scheduler
from ldmscale.models.size_conditioning import apply_size_config
from ldmscale.runtime import dist, preemption
from ldmscale.style.encoder import beta_at, build_style, style_input
from ldmscale.style.install import install_style_path
from ldmscale.trainer.ema import EMA, gathered
from ldmscale.trainer.engine import Engine
from ldmscale.trainer.monitor import Monitor, encode_flops_per_sample, training_flops_per_sample


def _prepare(trained: ModelMixin, cfg: Config) -> None:
    """Options that apply to whichever network is trained."""
    if cfg.model.gradient_checkpointing:
        trained.enable_gradient_checkpointing()
    if cfg.model.attention == "default":
        trained.set_attn_processor(AttnProcessor())


class Stage:
    """What both stages share: the wrapped module (`module`), the network it trains (`trained`, its parameters
    named `<prefix>*` inside `module`), and the full trained weights for sampling or export."""

    prefix = ""
    module: torch.nn.Module
    trained: ModelMixin  # a diffusers network (its config rebuilds it for sampling and export)
    tokenizer: Any = None
    init_note = ""

    def __init__(self, cfg: Config, device: torch.device, dtype: torch.dtype) -> None:
        self.cfg, self.device, self.dtype = cfg, device, dtype

    def flops_per_sample(self) -> float:
        return 0.0

    def compile(self, engine: Engine) -> None:
        """model.compile. Under ZeRO-3 the parameters are gathered by hooks around every submodule: DeepSpeed's
        `engine.compile` is the path it supports there (it compiles the module it wraps, hooks in place). Under
        ZeRO 0-2 the trained network is compiled in place (names, hooks and state dict unchanged). Inductor's
        compile workers are started first with the preemption signals blocked, so a notice does not kill them.
        Called last, once the engine exists and FLOPs were counted on an eager twin."""
        m = self.cfg.model
        if not m.compile:
            return
        mode = None if m.compile_mode == "default" else m.compile_mode
        if m.compile_backend == "inductor":
            preemption.start_compile_workers()
        if self.cfg.deepspeed.zero_stage == 3:
            engine.compile(backend=m.compile_backend, compile_kwargs={"mode": mode} if mode else {})
        else:
            self.trained.compile(backend=m.compile_backend, mode=mode)

    def channels_last_weights(self) -> bool:
        """model.channels_last under ZeRO-0: the conv weights go NHWC too (NHWC kernels then take both operands
        as they are). Done after deepspeed.initialize, whose first broadcast views every parameter as bytes and
        needs standard strides; ZeRO 1-3 keep parameters in flat buffers, so their weights stay NCHW (the
        convolution converts them per call). Returns whether the weights were converted."""
        if not (self.cfg.model.channels_last and self.cfg.deepspeed.zero_stage == 0):
            return False
        for p in self.trained.parameters():
            if p.dim() == 4:
                p.data = p.data.contiguous(memory_format=torch.channels_last)
        return True

    def encode_flops_per_sample(self) -> float:
        return 0.0

    def periodic(self, engine: Engine, ema: EMA | None, monitor: Monitor, out: Path, step: int) -> None:
        """Once in a while during training (every train.sample_every steps)."""

    def finish(self, engine: Engine, ema: EMA | None, monitor: Monitor, out: Path, step: int,
               loader: ResumableLoader) -> None:
        """After the last step."""

    def trained_weights(self, engine: Engine, ema: EMA | None) -> dict[str, torch.Tensor]:
        """Full fp32 weights of the trained network on rank 0 (EMA if kept). Collective: every rank calls it."""
        if ema is not None:
            return strip_prefix(ema.state_dict(), self.prefix)
        params = list(engine.module.parameters())
        with gathered(params):
            if dist.rank() != 0:
                return {}
            full = {n: p.detach().float().cpu().clone() for n, p in engine.module.named_parameters()}
        # buffers are not partitioned and not trained; take them from the module as they are
        return strip_prefix({**dict(engine.module.named_buffers()), **full}, self.prefix)


class DiffusionStage(Stage):
    prefix = "unet."
    module: LatentDiffusion

    def __init__(self, cfg: Config, device: torch.device, dtype: torch.dtype, fresh: bool = True,
                 manifest: dict | None = None) -> None:
        super().__init__(cfg, device, dtype)
        # latent shards carry the posterior moments: no VAE encoder then, and the set's manifest (read once by rank
        # 0 with the data plan) must name these
        self.encoders = FrozenEncoders.load(cfg.model, device, dtype, vae_encoder=cfg.data.format == "images")
        if cfg.data.format == "latents":
            assert manifest is not None, "data.format=latents: pass the shards' manifest (latents.shared_manifest)"
            check_encoders(manifest, self.encoders.vae_encoder_hash, self.encoders.text_encoder_hash)
        self.tokenizer = self.encoders.tokenizer
        self.vae_factor = vae_downsample_factor(self.encoders.vae.config)
        size = cfg.data.resolution // self.vae_factor
        self.latent_shape = (self.encoders.latent_channels, size, size)  # the square's; a bucket batch has its own
        unet = build_unet(cfg.model.unet, self.encoders.latent_channels, self.encoders.text_dim, size)
        unet = apply_size_config(unet, cfg.model.size_conditioning, cfg.model.size_embed_dim)
        check_canvas_step(cfg, self.vae_factor, unet_downsample_factor(unet.config))
        style_encoder, self.style_frozen = None, None
        if cfg.style.enabled:
            if cfg.style.init_from and fresh:  # a resume takes every weight from its own checkpoint
                self.init_note = init_from_step1(cfg.style, unet)
            style_encoder, self.style_frozen = build_style(cfg.style, self.encoders.text_dim, device, dtype)
        self.module = LatentDiffusion(unet, build_noise_scheduler(cfg.model), cfg.model.snr_gamma, style_encoder)
        self.module.channels_last = cfg.model.channels_last
        self.trained = unet
        _prepare(unet, cfg)
        if cfg.style.enabled:
            # last: after step 1's weights are in (to_k_style copies to_k) and the attention kind is chosen
            install_style_path(unet, cfg.style, self.encoders.text_dim, sdpa=cfg.model.attention == "sdpa")
        self.empty_ids = tokenize(self.tokenizer, [""]).to(device)
        self._empty: torch.Tensor | None = None
        self._default_size_cond: dict[tuple[int, int], torch.Tensor] = {}

    def _empty_context(self) -> torch.Tensor:
        """The text encoder's output for "" (the frozen encoder gives it once), [1, tokens, dim]."""
        if self._empty is None:
            with torch.no_grad():
                self._empty = self.encoders.encode_text(self.empty_ids)
        return self._empty

    def _size_cond(self, batch: dict[str, Any], height: int, width: int) -> torch.Tensor:
        """[B, 6] size conditioning: the batch's "size_cond" rows (bucketed data), else SDXL's default for an
        uncropped image at the batch's size (original = target, crop 0,0), made on the device once per size."""
        if "size_cond" in batch:
            return batch["size_cond"].to(self.device, non_blocking=True)
        row = self._default_size_cond.get((height, width))
        if row is None:
            row = torch.tensor([[height, width, 0, 0, height, width]]).to(self.device, non_blocking=True)
            self._default_size_cond[(height, width)] = row
        return row.expand(len(batch["keys"]), -1)

    def flops_per_sample(self) -> float:
        ctx = (self.tokenizer.model_max_length, self.encoders.text_dim)
        return training_flops_per_sample(self.trained, self.latent_shape, ctx)

    def encode_flops_per_sample(self) -> float:
        """The VAE encode that latents on the fly cost per image (reported apart from the U-Net's FLOPs)."""
        return encode_flops_per_sample(self.encoders.vae, self.cfg.data.resolution)

    def loss(self, engine: Engine, batch: dict[str, Any], ids: Sequence[int], step: int) -> tuple[torch.Tensor, dict]:
        """One micro-batch -> (loss, parts). `ids` are the global sample indices, `step` the optimizer step."""
        seed, m = self.cfg.train.seed, self.cfg.model
        # No host sync in a micro-batch: every draw is made on the device, every copy from the (pinned) batch is
        # non-blocking, and the caption dropout is a select on the device. A blocking copy would make the CPU wait
        # for the GPU's queue to drain before it could launch the next kernels.
        # The latent's shape is the batch's own (every micro-batch holds one bucket; a square run, the square).
        if "moments" in batch:
            shape = (self.latent_shape[0], *batch["moments"].shape[-2:])
        else:
            shape = (self.latent_shape[0], *(s // self.vae_factor for s in batch["pixels"].shape[-2:]))
        post = noise.randn(seed, ids, shape, noise.Stream.POSTERIOR, self.device)
        if "moments" in batch:  # data.format=latents: the same posterior draw, from the stored moments
            latents = self.encoders.latents_from_moments(batch["moments"].to(self.device, non_blocking=True), post)
        else:
            latents = self.encoders.encode_images(normalize_pixels(batch["pixels"].to(self.device, non_blocking=True)),
                                                  post)
        eps = noise.randn(seed, ids, shape, noise.Stream.NOISE, self.device)
        if m.noise_offset:
            offset = noise.randn(seed, ids, (shape[0], 1, 1), noise.Stream.NOISE_OFFSET, self.device)
            eps = eps + m.noise_offset * offset
        # model.immiscible: the latent-noise scores go to the host now; the assignment is awaited only after the
        # text encoder and the other draws are queued, so the device has work while the host solves it
        pending = immiscible.start(latents, eps) if m.immiscible else None
        # classifier-free guidance: a per-sample share of captions becomes ""
        drop = noise.rand(seed, ids, noise.Stream.CAPTION_DROP, self.device) < self.cfg.data.caption_dropout
        if "text_embeddings" in batch:  # stored by ldmscale-encode --text-embeddings
            context = batch["text_embeddings"].to(self.device, non_blocking=True)
            context = torch.where(drop[:, None, None], self._empty_context().to(context.dtype), context)
        else:
            input_ids = batch["input_ids"].to(self.device, non_blocking=True)
            context = self.encoders.encode_text(torch.where(drop[:, None], self.empty_ids, input_ids))
        timesteps = noise.timesteps(seed, ids, m.num_train_timesteps, m.timestep_sampling, m.logit_mean, m.logit_std,
                                    self.device)
        extra = self._style_args(batch, ids, step) if self.cfg.style.enabled else []
        if pending is not None:
            eps = eps[immiscible.finish(pending)]
        args = [latents, context, eps, timesteps, *extra]
        if m.size_conditioning:  # not dropped with the caption (SDXL's choice; docs/buckets.md)
            return engine(*args, size_cond=self._size_cond(batch, shape[1] * self.vae_factor,
                                                           shape[2] * self.vae_factor))
        return engine(*args)

    def _style_args(self, batch: dict[str, Any], ids: Sequence[int], step: int) -> list[Any]:
        """(style input, reparameterisation noise, keep mask, beta): all from the sample ids, so resume is exact."""
        s, seed = self.cfg.style, self.cfg.train.seed
        pixels = normalize_pixels(batch["style_pixels"].to(self.device, non_blocking=True))
        refs = style_input(self.style_frozen, pixels)
        z = noise.randn(seed, ids, (s.num_tokens, self.encoders.text_dim), noise.Stream.STYLE, self.device)
        keep = (noise.rand(seed, ids, noise.Stream.STYLE_DROP, self.device) >= s.dropout).float()
        return [refs, z, keep, beta_at(s, step)]

    def periodic(self, engine: Engine, ema: EMA | None, monitor: Monitor, out: Path, step: int) -> None:
        if self.cfg.train.sample_every and step % self.cfg.train.sample_every == 0:
            self.sample_grid(engine, ema, monitor, out, step)

    def finish(self, engine: Engine, ema: EMA | None, monitor: Monitor, out: Path, step: int,
               loader: ResumableLoader) -> None:
        every = self.cfg.train.sample_every
        if not (every and step % every == 0):  # else periodic() drew this step's grid already
            self.sample_grid(engine, ema, monitor, out, step)

    def sample_grid(self, engine: Engine, ema: EMA | None, monitor: Monitor, out: Path, step: int) -> None:
        """Every rank draws its share of the configured prompts with the EMA weights (broadcast from rank 0);
        rank 0 writes the grid (ldmscale.eval.grid). Nobody waits in a barrier for another's work."""
        t0 = time.perf_counter()
        # in the training precision on a GPU (half the memory of an fp32 copy on every rank); fp32 on the CPU
        dtype = self.dtype if self.device.type == "cuda" else torch.float32
        unet = UNet2DConditionModel.from_config(self.trained.config).to(self.device, dtype)
        if self.cfg.style.enabled:  # grids during style training are text-only: the style path adds nothing
            install_style_path(unet, self.cfg.style, self.encoders.text_dim,
                               sdpa=self.cfg.model.attention == "sdpa")
        broadcast_weights(unet, self.trained_weights(engine, ema), self.device)
        unet.eval()
        s, d = self.cfg.sample, self.cfg.data
        prompts = [p for p in s.prompts for _ in range(s.images_per_prompt)]
        # with buckets, every prompt on the tallest, the squarest and the widest canvas: the same fixed list at
        # every step, resume and world size (data/buckets.py grid_buckets)
        canvases = [(b.height, b.width) for b in grid_buckets(bucket_set(d.resolution, d.buckets.step,
                                                                         d.buckets.max_aspect))] \
            if d.buckets.enabled else [(d.resolution, d.resolution)]
        images, labels, shares = [], [], []
        for h, w in canvases:
            drawn = draw_shared(unet, self.encoders, dict(self.module.scheduler.config), prompts,
                                seed=self.cfg.train.seed, steps=s.num_steps, guidance_scale=s.guidance_scale,
                                sampler=s.sampler, height=h, width=w)
            if drawn is not None:  # rank 0
                images += drawn[0]
                labels += [f"{p} [{w}x{h}]" if len(canvases) > 1 else p for p in prompts]
                shares.append("+".join(map(str, drawn[1])))
        if images:
            grid = write_grid(images, labels, out / "samples" / f"step_{step:08d}", s.images_per_prompt, step)
            monitor.log_image("samples", grid, step, caption=f"step {step}")
            monitor.event(f"sample grid {grid} ({time.perf_counter() - t0:.1f}s; images per rank "
                          f"{', '.join(shares)})")


def check_canvas_step(cfg: Config, vae_factor: int, unet_factor: int) -> None:
    """data.buckets.step against the loaded models (config/checks.py checks it earlier when their configs are on
    disk; a hub id is known only now)."""
    step, need = cfg.data.buckets.step, vae_factor * unet_factor
    if cfg.data.buckets.enabled and step % need:
        raise ConfigError(f"data.buckets.step={step} is not a multiple of {need} (VAE factor {vae_factor} x U-Net "
                          f"downsampling {unet_factor}): every canvas side must be")


class AutoencoderStage(Stage):
    prefix = "vae."
    module: AutoencoderObjective

    def __init__(self, cfg: Config, device: torch.device, dtype: torch.dtype, fresh: bool = True) -> None:
        super().__init__(cfg, device, dtype)
        vae = load_vae(cfg.model) if cfg.model.vae else build_vae(cfg.model.vae_preset, cfg.data.resolution)
        self.vae_factor = vae_downsample_factor(vae.config)
        size = cfg.data.resolution // self.vae_factor
        self.latent_shape = (int(vae.config.latent_channels), size, size)
        self.module = AutoencoderObjective(vae, cfg.autoencoder)
        self.trained = vae
        _prepare(vae, cfg)

    def loss(self, engine: Engine, batch: dict[str, Any], ids: Sequence[int], step: int) -> tuple[torch.Tensor, dict]:
        pixels = normalize_pixels(batch["pixels"].to(self.device, non_blocking=True))
        # the posterior's shape is the batch's own (with aspect buckets, its bucket's)
        shape = (self.latent_shape[0], *(s // self.vae_factor for s in pixels.shape[-2:]))
        post = noise.randn(self.cfg.train.seed, ids, shape, noise.Stream.POSTERIOR, self.device)
        return engine(pixels, post)

    def finish(self, engine: Engine, ema: EMA | None, monitor: Monitor, out: Path, step: int,
               loader: ResumableLoader) -> None:
        """Export the trained VAE as a diffusers folder with its measured latent scaling factor."""
        weights = self.trained_weights(engine, ema)
        if dist.rank() == 0:
            cfg = self.cfg
            vae = type(self.trained).from_config(self.trained.config)
            vae.load_state_dict(weights, strict=True)
            vae.eval()
            # the training run's shard list and epoch size (no second listing of the store), read as one rank
            probe = ResumableLoader(cfg.data, None, seed=cfg.train.seed + 1, rank=0, world=1,
                                    micro_batch=cfg.train.micro_batch_size, samples_per_epoch=loader.samples_per_epoch,
                                    sources=loader.sources)
            batches = (normalize_pixels(next(probe)["pixels"]) for _ in range(10**9))
            factor = measure_scaling_factor(vae, batches, cfg.autoencoder.scaling_samples)
            save_vae(vae, weights, factor, out / "vae")
            monitor.event(f"autoencoder: exported {out / 'vae'} with scaling_factor={factor:.4f}")
        dist.barrier()


STAGES: dict[str, type[DiffusionStage] | type[AutoencoderStage]] = {
    "diffusion": DiffusionStage,
    "autoencoder": AutoencoderStage,
}


def build_stage(cfg: Config, device: torch.device, dtype: torch.dtype, fresh: bool = True,
                manifest: dict | None = None) -> DiffusionStage | AutoencoderStage:
    """The stage `train.stage` names. `fresh`: not resuming (a style run then loads its step-1 weights);
    `manifest`: the latent shards' manifest (data.format=latents)."""
    if cfg.train.stage == "diffusion":
        return DiffusionStage(cfg, device, dtype, fresh=fresh, manifest=manifest)
    return STAGES[cfg.train.stage](cfg, device, dtype, fresh=fresh)
