"""Architecture presets by name (`model.unet`, `model.vae_preset`): the diffusers constructor arguments of each.
They give the architecture only; in/cross-attention sizes come from the VAE and text encoder at build time
(ldmscale.models.networks)."""

from __future__ import annotations

from typing import Any

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


