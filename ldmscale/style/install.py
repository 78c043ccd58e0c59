"""The whole style path of a step-2 U-Net, installed in one call wherever a style U-Net is built (training,
sample grids, loading a checkpoint), and the names of what step 2 adds."""

from __future__ import annotations

from diffusers import UNet2DConditionModel

from ldmscale.config import StyleConfig
from ldmscale.style.attention import add_style_path, is_style_key
from ldmscale.style.global_path import GLOBAL_PREFIX, add_global_path


def install_style_path(unet: UNet2DConditionModel, cfg: StyleConfig, style_dim: int, sdpa: bool = True) -> int:
    """Style cross-attention in every cross-attention block, plus the global path when `style.global_path`.
    Returns how many blocks got style attention. Call once step 1's weights are in (to_k_style copies to_k)."""
    n = add_style_path(unet, style_dim, sdpa)
    if cfg.uses_global_path:
        add_global_path(unet, cfg.num_tokens, style_dim)
    return n


def is_new_in_step2(name: str) -> bool:
    """A parameter of the trained module that step 2 adds: the style encoder ("style.*"), the style attention and
    the global path inside the U-Net ("unet.*"); the parameters `style.lr_scale` applies to."""
    unet_name = name.removeprefix("unet.")
    return name.startswith("style.") or is_style_key(unet_name) or unet_name.startswith(GLOBAL_PREFIX)
