"""A global style path: the style tokens, projected, added to the U-Net's time embedding.

Why beside the tokens' cross-attention: colour, tone and contrast are global, and the U-Net already takes global
conditioning through its time embedding, which every ResNet block turns into a per-channel shift of its features
(SDXL feeds its pooled text embedding the same way). Cross-attention reaches only the blocks that have attention
and only through a softmax over the tokens; this path reaches every ResNet block of the U-Net directly.

It sits in the U-Net's own slot for extra global conditioning, `unet.class_embedding` (diffusers adds its output
to the time embedding), so its weights are `class_embedding.*` in the U-Net's state dict. Both linear maps are
bias-free and the second starts at zero: at initialisation the path adds exactly 0.0 (step 2 starts at step 1's
function), and all-zero tokens (style dropout, the unconditional branches of guidance) add exactly 0.0 at any
point of training. A forward pre-hook hands the style tokens from `cross_attention_kwargs` to the U-Net as
`class_labels` (all-zero tokens when a caller gives none), so no caller needs to know the path exists.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from diffusers import UNet2DConditionModel

GLOBAL_PREFIX = "class_embedding."


class StyleGlobalEmbedding(torch.nn.Module):
    """[B, K, D] style tokens -> [B, time_embed_dim]: bias-free Linear, SiLU, zero-initialised bias-free Linear."""

    def __init__(self, num_tokens: int, token_dim: int, time_dim: int) -> None:
        super().__init__()
        self.num_tokens, self.token_dim = num_tokens, token_dim
        self.proj = torch.nn.Linear(num_tokens * token_dim, time_dim, bias=False)
        self.out = torch.nn.Linear(time_dim, time_dim, bias=False)
        torch.nn.init.zeros_(self.out.weight)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.out(F.silu(self.proj(tokens.flatten(1).to(self.proj.weight.dtype))))


def _tokens_as_class_labels(module: UNet2DConditionModel, args: tuple[Any, ...],
                            kwargs: dict[str, Any]) -> tuple[tuple[Any, ...], dict[str, Any]] | None:
    if kwargs.get("class_labels") is not None:
        return None
    emb = module.class_embedding
    tokens = (kwargs.get("cross_attention_kwargs") or {}).get("style_tokens")
    if tokens is None:  # a text-only call (validation, text grids): no style, exactly as dropped tokens
        sample = args[0] if args else kwargs["sample"]
        tokens = sample.new_zeros(sample.shape[0], emb.num_tokens, emb.token_dim)
    return args, {**kwargs, "class_labels": tokens}


def add_global_path(unet: UNet2DConditionModel, num_tokens: int, token_dim: int) -> StyleGlobalEmbedding:
    """Install the global path in place (unet.class_embedding must be free: a class-conditioned U-Net is not)."""
    if unet.class_embedding is not None:
        raise ValueError("style.global_path: this U-Net has a class embedding of its own; turn style.global_path off")
    time_dim = unet.time_embedding.linear_2.out_features
    unet.class_embedding = StyleGlobalEmbedding(num_tokens, token_dim, time_dim)
    unet.register_forward_pre_hook(_tokens_as_class_labels, with_kwargs=True)
    return unet.class_embedding


def has_global_path(unet: UNet2DConditionModel) -> bool:
    return isinstance(unet.class_embedding, StyleGlobalEmbedding)
