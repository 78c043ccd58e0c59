"""The trainable networks: U-Net presets by name (or a pretrained folder), and autoencoder presets."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from diffusers import AutoencoderKL, UNet2DConditionModel

# Presets give the architecture only; in/cross-attention sizes come from the VAE and text encoder.
UNET_PRESETS: dict[str, dict[str, Any]] = {
    # ~0.8 M params: unit tests and multi-process checks on CPU
    "tiny": dict(
        block_out_channels=(32, 64),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        layers_per_block=1,
        attention_head_dim=8,
        norm_num_groups=16,
    ),
    # ~6 M params: the CPU demo (digits at 8x8x4 latents) in minutes
    "small": dict(
        block_out_channels=(64, 128, 128),
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        layers_per_block=1,
        attention_head_dim=8,
        norm_num_groups=32,
    ),
    # Stable Diffusion 1.x U-Net: ~860 M params
    "sd15": dict(
        block_out_channels=(320, 640, 1280, 1280),
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        layers_per_block=2,
        attention_head_dim=8,
        norm_num_groups=32,
    ),
}

VAE_PRESETS: dict[str, dict[str, Any]] = {
    # factor 4: 32x32 RGB -> 8x8x4
    "tiny": dict(
        block_out_channels=(32, 64, 64),
        down_block_types=("DownEncoderBlock2D",) * 3,
        up_block_types=("UpDecoderBlock2D",) * 3,
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=16,
    ),
    # Stable Diffusion 1.x's autoencoder architecture (factor 8, 4 latent channels, ~84 M params)
    "sd15": dict(
        block_out_channels=(128, 256, 512, 512),
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        layers_per_block=2,
        latent_channels=4,
        norm_num_groups=32,
    ),
}


def vae_downsample_factor(vae_config: Any) -> int:
    return 2 ** (len(vae_config.block_out_channels) - 1)


def build_unet(ref: str, in_channels: int, cross_attention_dim: int, sample_size: int) -> UNet2DConditionModel:
    """A preset built from config (random init), or a pretrained U-Net folder/hub id to fine-tune."""
    if ref in UNET_PRESETS:
        return UNet2DConditionModel(
            sample_size=sample_size,
            in_channels=in_channels,
            out_channels=in_channels,
            cross_attention_dim=cross_attention_dim,
            **UNET_PRESETS[ref],
        )
    unet = UNet2DConditionModel.from_pretrained(ref, subfolder="unet" if _has_subfolder(ref, "unet") else None)
    if unet.config.cross_attention_dim != cross_attention_dim or unet.config.in_channels != in_channels:
        raise ValueError(
            f"U-Net {ref} expects cross_attention_dim={unet.config.cross_attention_dim}, "
            f"in_channels={unet.config.in_channels}, but the text encoder gives {cross_attention_dim} and the "
            f"VAE {in_channels}; use matching encoders or a U-Net preset"
        )
    return unet


def build_vae(preset: str, resolution: int) -> AutoencoderKL:
    return AutoencoderKL(sample_size=resolution, **VAE_PRESETS[preset])


def _has_subfolder(ref: str, name: str) -> bool:
    return (Path(ref) / name / "config.json").exists()


def strip_prefix(state: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """The entries under `prefix` ("unet.", "style.", "vae."), renamed as the sub-module knows them."""
    return {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
