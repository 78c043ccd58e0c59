"""The trainable networks: a U-Net from a preset (config/presets.py) or a pretrained folder, an autoencoder from a
preset; and the small helpers that name their weights."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from diffusers import AutoencoderKL, UNet2DConditionModel

from ldmscale.config.presets import UNET_PRESETS, VAE_PRESETS


def vae_downsample_factor(vae_config: Any) -> int:
    return 2 ** (len(vae_config.block_out_channels) - 1)


def unet_downsample_factor(unet_config: Any) -> int:
    """Every down block but the last halves the latent."""
    return 2 ** (len(unet_config.block_out_channels) - 1)


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
    if unet.config.sample_size != sample_size:  # fine-tuned at another resolution: grids and exports follow this one
        unet.register_to_config(sample_size=sample_size)
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
