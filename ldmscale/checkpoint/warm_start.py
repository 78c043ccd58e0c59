"""Step 2 of style training starts from step 1: the text-conditioned U-Net's weights (EMA or raw) from a
run dir or checkpoint, loaded into the fresh model before the style path is added. The optimizer, LR
schedule, data position and step counter start fresh: only the function is carried over."""

from __future__ import annotations

from pathlib import Path

import torch
from diffusers import UNet2DConditionModel

from ldmscale.checkpoint.loading import load_ema, raw_state_dict
from ldmscale.checkpoint.resume import find_tag_dir
from ldmscale.config import StyleConfig
from ldmscale.models.networks import strip_prefix


def step1_unet_state(ref: str, weights: str) -> dict[str, torch.Tensor]:
    """The U-Net's state dict (keys without the "unet." prefix) from a step-1 run dir or checkpoint."""
    tag_dir = find_tag_dir(Path(ref).expanduser())
    state = load_ema(tag_dir) if weights == "ema" else raw_state_dict(tag_dir)
    unet = strip_prefix(state, "unet.")
    if not unet:
        raise ValueError(f"style.init_from={ref}: {tag_dir} holds no U-Net weights (an autoencoder-stage run?)")
    return unet


def init_from_step1(cfg: StyleConfig, unet: UNet2DConditionModel) -> str:
    """Load step 1's U-Net into `unet` (strict: same architecture, no style path yet). Returns what was loaded."""
    state = step1_unet_state(cfg.init_from, cfg.init_weights)
    try:
        unet.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise ValueError(
            f"style.init_from={cfg.init_from}: its U-Net does not match model.unet / the encoders of this config "
            f"(train step 2 with step 1's model section): {str(e)[:400]}"
        ) from None
    return f"{cfg.init_from} ({cfg.init_weights} weights, {len(state)} tensors)"
