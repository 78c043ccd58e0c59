"""A decoupled style cross-attention path for every cross-attention block of a diffusers U-Net.

Why a separate path and not style tokens appended to the text tokens: softmax attention normalises over
all keys, so even all-zero extra tokens (key 0, logit 0) take probability mass from the text tokens and
change the step-1 model's output (tests/unit/test_style.py shows it). Here the style tokens get their own
softmax and their own bias-free to_k_style/to_v_style; the result is added to the text attention before
the output projection (IP-Adapter's design). to_v_style starts at zero, so at initialisation the path
adds exactly 0.0 and step 2 begins at step 1's function bit for bit; zero style tokens (style dropout,
the unconditional branch of guidance) also add exactly 0.0 at any point of training.

Style tokens reach the processors through `cross_attention_kwargs={"style_tokens": s}`; self-attention
blocks get a processor that accepts and ignores them (diffusers would warn on every call otherwise).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from diffusers import UNet2DConditionModel
from diffusers.models.attention_processor import Attention, AttnProcessor, AttnProcessor2_0


def _attend(attn: Attention, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, sdpa: bool) -> torch.Tensor:
    """[B, L, inner] x [B, S, inner] -> [B, L, inner], computed exactly as diffusers' own processors do."""
    if sdpa:
        b, heads = q.shape[0], attn.heads
        head_dim = k.shape[-1] // heads
        q, k, v = (t.view(b, -1, heads, head_dim).transpose(1, 2) for t in (q, k, v))
        out = F.scaled_dot_product_attention(q, k, v, dropout_p=0.0, is_causal=False)
        return out.transpose(1, 2).reshape(b, -1, heads * head_dim).to(q.dtype)
    q, k, v = attn.head_to_batch_dim(q), attn.head_to_batch_dim(k), attn.head_to_batch_dim(v)
    probs = attn.get_attention_scores(q, k, None)
    return attn.batch_to_head_dim(torch.bmm(probs, v))


class StyleAttnProcessor(torch.nn.Module):
    """Text cross-attention plus a style cross-attention of its own, summed before to_out."""

    def __init__(self, attn: Attention, style_dim: int, sdpa: bool = True) -> None:
        super().__init__()
        inner = attn.to_k.out_features
        self.sdpa = sdpa
        self.scale = 1.0  # sampling only: the style output's weight in this block (set_style_scales); not a weight
        self.to_k_style = torch.nn.Linear(style_dim, inner, bias=False)
        self.to_v_style = torch.nn.Linear(style_dim, inner, bias=False)
        with torch.no_grad():
            # keys start as the text keys (a sensible attention pattern); values at zero: the path adds nothing
            if attn.to_k.in_features == style_dim:
                self.to_k_style.weight.copy_(attn.to_k.weight)
            self.to_v_style.weight.zero_()

    def __call__(  # noqa: D102 - diffusers calls processors, not forward (so Linear hooks still fire under ZeRO-3)
        self,
        attn: Attention,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        temb: torch.Tensor | None = None,
        style_tokens: torch.Tensor | None = None,
    ) -> torch.Tensor:
        if attention_mask is not None or attn.spatial_norm is not None or hidden_states.ndim != 3:
            raise NotImplementedError("StyleAttnProcessor supports the U-Net's transformer blocks (3-D, no mask)")
        residual = hidden_states
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)
        query = attn.to_q(hidden_states)
        context = hidden_states if encoder_hidden_states is None else encoder_hidden_states
        if encoder_hidden_states is not None and attn.norm_cross:
            context = attn.norm_encoder_hidden_states(context)
        out = _attend(attn, query, attn.to_k(context), attn.to_v(context), self.sdpa)
        if style_tokens is not None and self.scale != 0.0:
            s = style_tokens.to(query.dtype)
            styled = _attend(attn, query, self.to_k_style(s), self.to_v_style(s), self.sdpa)
            out = out + (styled if self.scale == 1.0 else self.scale * styled)
        out = attn.to_out[1](attn.to_out[0](out))
        if attn.residual_connection:
            out = out + residual
        return out / attn.rescale_output_factor


class SelfAttnIgnoringStyle(AttnProcessor2_0):
    """diffusers' SDPA processor, accepting (and ignoring) the style tokens meant for cross-attention."""

    def __call__(self, attn: Attention, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None = None,
                 attention_mask: torch.Tensor | None = None, temb: torch.Tensor | None = None,
                 style_tokens: torch.Tensor | None = None) -> torch.Tensor:
        return super().__call__(attn, hidden_states, encoder_hidden_states, attention_mask, temb)


class SelfAttnIgnoringStyleMath(AttnProcessor):
    """The same for model.attention=default (the math attention of step 1)."""

    def __call__(self, attn: Attention, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None = None,
                 attention_mask: torch.Tensor | None = None, temb: torch.Tensor | None = None,
                 style_tokens: torch.Tensor | None = None) -> torch.Tensor:
        return super().__call__(attn, hidden_states, encoder_hidden_states, attention_mask, temb)


def add_style_path(unet: UNet2DConditionModel, style_dim: int, sdpa: bool = True) -> int:
    """Install the style path in place; returns how many cross-attention blocks got one.

    Call after the U-Net's weights are final for step 1 (to_k_style copies to_k) or load a state dict
    that holds the style weights afterwards.
    """
    processors: dict[str, torch.nn.Module | AttnProcessor2_0 | AttnProcessor] = {}
    modules = dict(unet.named_modules())
    n = 0
    for name in unet.attn_processors:
        attn = modules[name.removesuffix(".processor")]
        if name.endswith("attn2.processor"):
            processors[name] = StyleAttnProcessor(attn, style_dim, sdpa)
            n += 1
        else:
            processors[name] = SelfAttnIgnoringStyle() if sdpa else SelfAttnIgnoringStyleMath()
    unet.set_attn_processor(processors)
    return n


BLOCK_PREFIXES = {"down": "down_blocks.", "mid": "mid_block.", "up": "up_blocks."}


def set_style_scales(unet: UNet2DConditionModel, scales: dict[str, float] | None) -> None:
    """Per-block weights of the style attention at sampling, by block group ("down", "mid", "up") as diffusers'
    set_ip_adapter_scale names them; groups not named (and `None`) get 1.0. Zero tokens stay exactly zero at any
    scale, so the dropped-style branches of guidance do not change."""
    unknown = set(scales or {}) - set(BLOCK_PREFIXES)
    if unknown:
        raise ValueError(f"style block scales: unknown block group {sorted(unknown)[0]!r}; use down, mid, up")
    for name, proc in unet.attn_processors.items():
        if isinstance(proc, StyleAttnProcessor):
            group = next(g for g, prefix in BLOCK_PREFIXES.items() if name.startswith(prefix))
            proc.scale = float((scales or {}).get(group, 1.0))


def parse_block_scales(text: str) -> dict[str, float]:
    """`down=0,mid=1,up=0.5` -> {"down": 0.0, "mid": 1.0, "up": 0.5} (ldmscale-sample --style-scale-blocks)."""
    out: dict[str, float] = {}
    for item in filter(None, (x.strip() for x in text.split(","))):
        group, _, value = item.partition("=")
        try:
            if group.strip() not in BLOCK_PREFIXES:
                raise ValueError
            out[group.strip()] = float(value)
        except ValueError:
            raise ValueError(f"{item!r}: give GROUP=SCALE, GROUP one of down, mid, up, SCALE a number") from None
    return out


def is_style_key(name: str) -> bool:
    return ".processor.to_k_style." in name or ".processor.to_v_style." in name
