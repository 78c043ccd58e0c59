"""What differs between the training stages: the module DeepSpeed trains and how a micro-batch becomes a loss.

Diffusion: frozen VAE + text encoder (+ optional style path) around the U-Net objective; autoencoder: the VAE
itself. Every random draw comes from noise.py keyed by the global sample ids, so resume stays bitwise.
"""

from __future__ import annotations

from typing import Any

import torch

from ldmscale import noise
from ldmscale.config import Config
from ldmscale.data import normalize_pixels
from ldmscale.monitor import training_flops_per_sample


class Task:
    """What differs between the stages: the module DeepSpeed trains and how a micro-batch becomes a loss."""

    def __init__(self, cfg: Config, device: torch.device, dtype: torch.dtype, fresh: bool = True) -> None:
        self.cfg, self.device, self.dtype = cfg, device, dtype
        self.encoders = None
        self.tokenizer = None
        self.style_frozen = None
        self.init_note = ""
        if cfg.train.stage == "diffusion":
            from ldmscale.encoders import FrozenEncoders
            from ldmscale.models import build_unet, vae_downsample_factor
            from ldmscale.objective import LatentDiffusion, build_noise_scheduler

            self.encoders = FrozenEncoders.load(cfg.model, device, dtype)
            self.tokenizer = self.encoders.tokenizer
            size = cfg.data.resolution // vae_downsample_factor(self.encoders.vae.config)
            self.latent_shape = (self.encoders.latent_channels, size, size)
            unet = build_unet(cfg.model.unet, self.encoders.latent_channels, self.encoders.text_dim, size)
            style_encoder = None
            if cfg.style.enabled:
                from ldmscale.style.encoder import build_style
                from ldmscale.style.step1_init import init_from_step1

                if cfg.style.init_from and fresh:  # a resume takes every weight from its own checkpoint
                    self.init_note = init_from_step1(cfg.style, unet)
                style_encoder, self.style_frozen = build_style(cfg.style, self.encoders.text_dim, device, dtype)
            self.module: torch.nn.Module = LatentDiffusion(unet, build_noise_scheduler(cfg.model), cfg.model.snr_gamma,
                                                           style_encoder)
            self.empty_ids = self._tokenize([""])
            self.trained = unet
        else:
            from ldmscale.autoencoder import AutoencoderObjective
            from ldmscale.encoders import load_vae
            from ldmscale.models import build_vae, vae_downsample_factor

            vae = load_vae(cfg.model) if cfg.model.vae else build_vae(cfg.model.vae_preset, cfg.data.resolution)
            size = cfg.data.resolution // vae_downsample_factor(vae.config)
            self.latent_shape = (int(vae.config.latent_channels), size, size)
            self.module = AutoencoderObjective(vae, cfg.autoencoder)
            self.trained = vae
        if cfg.model.gradient_checkpointing:
            self.trained.enable_gradient_checkpointing()
        if cfg.model.attention == "default":
            from diffusers.models.attention_processor import AttnProcessor

            self.trained.set_attn_processor(AttnProcessor())
        if cfg.style.enabled and self.encoders is not None:
            from ldmscale.style.attention import add_style_path

            # last: after step 1's weights are in (to_k_style copies to_k) and the attention kind is chosen
            add_style_path(self.trained, self.encoders.text_dim, sdpa=cfg.model.attention == "sdpa")

    def _tokenize(self, captions: list[str]) -> torch.Tensor:
        from ldmscale.encoders import tokenize

        return tokenize(self.tokenizer, captions)

    def flops_per_sample(self) -> float:
        if self.encoders is None:
            return 0.0
        ctx = (self.tokenizer.model_max_length, self.encoders.text_dim)
        return training_flops_per_sample(self.trained, self.latent_shape, ctx, self.device, torch.float32)

    def loss(self, engine: Any, batch: dict[str, Any], ids: list[int]) -> tuple[torch.Tensor, dict[str, Any]]:
        seed = self.cfg.train.seed
        pixels = normalize_pixels(batch["pixels"].to(self.device, non_blocking=True))
        post = noise.randn(seed, ids, self.latent_shape, noise.Stream.POSTERIOR)
        if self.encoders is None:
            return engine(pixels, post.to(self.device))
        latents = self.encoders.encode_images(pixels, post)
        input_ids = batch["input_ids"].clone()
        drop = noise.rand(seed, ids, noise.Stream.CAPTION_DROP) < self.cfg.data.caption_dropout
        input_ids[drop] = self.empty_ids
        context = self.encoders.encode_text(input_ids)
        timesteps = noise.randint(seed, ids, self.cfg.model.num_train_timesteps, noise.Stream.TIMESTEP)
        eps = noise.randn(seed, ids, self.latent_shape, noise.Stream.NOISE)
        if self.cfg.model.noise_offset:
            c = self.latent_shape[0]
            eps = eps + self.cfg.model.noise_offset * noise.randn(seed, ids, (c, 1, 1), noise.Stream.NOISE_OFFSET)
        if not self.cfg.style.enabled:
            return engine(latents, context, eps.to(self.device), timesteps.to(self.device))
        return engine(latents, context, eps.to(self.device), timesteps.to(self.device), *self._style_args(batch, ids))

    def _style_args(self, batch: dict[str, Any], ids: list[int]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor,
                                                                         float]:
        """(style input, reparameterisation noise, keep mask, beta): all from the sample ids, so resume is exact."""
        from ldmscale.style.encoder import beta_at, style_input

        s, seed = self.cfg.style, self.cfg.train.seed
        style_pixels = normalize_pixels(batch["style_pixels"].to(self.device, non_blocking=True))
        refs = style_input(self.style_frozen, style_pixels)
        z = noise.randn(seed, ids, (s.num_tokens, self.encoders.text_dim), noise.Stream.STYLE)
        keep = (noise.rand(seed, ids, noise.Stream.STYLE_DROP) >= s.dropout).float()
        step = ids[0] // self.cfg.train.global_batch_size  # ids are step * global_batch + slot
        return refs, z.to(self.device), keep.to(self.device), beta_at(s, step)
