"""Per-block weights of the style attention at sampling (ldmscale-sample --style-scale-blocks)."""

from __future__ import annotations

import pytest
import torch

from ldmscale.models.networks import build_unet
from ldmscale.style.attention import StyleAttnProcessor, add_style_path, parse_block_scales, set_style_scales

TEXT_DIM = 32


def test_block_scales_weigh_the_style_output_per_block_group() -> None:
    torch.manual_seed(0)
    unet = build_unet("tiny", 4, TEXT_DIM, 8).eval()
    add_style_path(unet, TEXT_DIM)
    with torch.no_grad():
        for p in unet.attn_processors.values():
            if isinstance(p, StyleAttnProcessor):
                p.to_v_style.weight.normal_()
    x, t, ctx = torch.randn(2, 4, 8, 8), torch.tensor([10, 500]), torch.randn(2, 16, TEXT_DIM)
    kw = {"cross_attention_kwargs": {"style_tokens": torch.randn(2, 4, TEXT_DIM)}}

    def run() -> torch.Tensor:
        with torch.no_grad():
            return unet(x, t, encoder_hidden_states=ctx, **kw).sample

    full = run()
    with torch.no_grad():
        text_only = unet(x, t, encoder_hidden_states=ctx).sample
    set_style_scales(unet, {"down": 0.0, "mid": 0.0, "up": 0.0})
    assert torch.equal(run(), text_only)
    set_style_scales(unet, {"down": 0.0})  # the others stay 1
    down_off = run()
    assert not torch.equal(down_off, full) and not torch.equal(down_off, text_only)
    set_style_scales(unet, None)
    assert torch.equal(run(), full)  # back to 1 everywhere, bitwise


def test_block_scales_parse_and_refuse_unknown_groups() -> None:
    assert parse_block_scales("down=0, mid=1,up=0.5") == {"down": 0.0, "mid": 1.0, "up": 0.5}
    for bad in ("left=1", "down", "up=x"):
        with pytest.raises(ValueError, match="GROUP=SCALE"):
            parse_block_scales(bad)
