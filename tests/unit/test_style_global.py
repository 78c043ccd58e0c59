"""The global style path (style tokens added to the time embedding) and the style learning-rate group."""

from __future__ import annotations

import copy

import torch

from ldmscale.config import Config, StyleConfig
from ldmscale.models.networks import build_unet
from ldmscale.style.global_path import StyleGlobalEmbedding, has_global_path
from ldmscale.style.install import install_style_path, is_new_in_step2
from ldmscale.trainer.engine import optimizer_groups

TEXT_DIM = 32


def _unet() -> torch.nn.Module:
    torch.manual_seed(0)
    return build_unet("tiny", 4, TEXT_DIM, 8).eval()


def _inputs(b: int = 3) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return (torch.randn(b, 4, 8, 8, generator=g), torch.tensor([10, 400, 900][:b]),
            torch.randn(b, 16, TEXT_DIM, generator=g))


def test_global_path_starts_at_step1_and_zero_tokens_add_exactly_nothing() -> None:
    step1 = _unet()
    step2 = copy.deepcopy(step1)
    install_style_path(step2, StyleConfig(enabled=True, num_tokens=4, global_path=True), TEXT_DIM)
    assert has_global_path(step2)
    x, t, ctx = _inputs()
    tokens = torch.randn(3, 4, TEXT_DIM) * 3
    with torch.no_grad():
        ref = step1(x, t, encoder_hidden_states=ctx).sample
        at_init = step2(x, t, encoder_hidden_states=ctx, cross_attention_kwargs={"style_tokens": tokens}).sample
        assert torch.equal(ref, at_init)  # zero-initialised: bitwise step 1
        step2.class_embedding.out.weight.normal_()  # as after some training
        styled = step2(x, t, encoder_hidden_states=ctx, cross_attention_kwargs={"style_tokens": tokens}).sample
        dropped = step2(x, t, encoder_hidden_states=ctx,
                        cross_attention_kwargs={"style_tokens": torch.zeros_like(tokens)}).sample
        text_only = step2(x, t, encoder_hidden_states=ctx).sample  # no tokens given: validation, text grids
    assert (styled - ref).abs().max() > 1e-3
    assert torch.equal(dropped, ref) and torch.equal(text_only, ref)


def test_global_path_alone_moves_every_resnet_block() -> None:
    """The style reaches blocks without attention too (DownBlock2D/UpBlock2D): through their time embedding."""
    unet = _unet()
    install_style_path(unet, StyleConfig(enabled=True, num_tokens=2, global_path=True), TEXT_DIM)
    for p in unet.attn_processors.values():  # the cross-attention side stays silent: only the global path acts
        if hasattr(p, "to_v_style"):
            assert p.to_v_style.weight.abs().sum() == 0
    seen: dict[str, torch.Tensor] = {}
    hooks = [m.register_forward_hook(lambda mod, i, o, n=n: seen.__setitem__(n, o.detach().clone()))
             for n, m in unet.named_modules() if n.endswith("resnets.0")]
    x, t, ctx = _inputs(1)
    with torch.no_grad():
        unet(x, t, encoder_hidden_states=ctx, cross_attention_kwargs={"style_tokens": torch.ones(1, 2, TEXT_DIM)})
        before = dict(seen)
        unet.class_embedding.out.weight.normal_()
        unet(x, t, encoder_hidden_states=ctx, cross_attention_kwargs={"style_tokens": torch.ones(1, 2, TEXT_DIM)})
    for h in hooks:
        h.remove()
    assert before and all(not torch.equal(before[n], seen[n]) for n in before)


def test_global_path_weights_are_unet_keys_that_step2_adds() -> None:
    unet = _unet()
    plain = set(unet.state_dict())
    install_style_path(unet, StyleConfig(enabled=True, num_tokens=4, global_path=True), TEXT_DIM)
    extra = set(unet.state_dict()) - plain
    assert {"class_embedding.proj.weight", "class_embedding.out.weight"} <= extra
    assert all(is_new_in_step2("unet." + k) for k in extra)
    assert not any(is_new_in_step2("unet." + k) for k in plain)
    assert isinstance(unet.class_embedding, StyleGlobalEmbedding)


def test_defaults_resolve_per_backbone() -> None:
    conv, clip = StyleConfig(enabled=True), StyleConfig(enabled=True, backbone="clip", vision_model="x")
    assert conv.uses_global_path and conv.uses_colour_stats
    assert not clip.uses_global_path and not clip.uses_colour_stats  # what an IP-Adapter export can carry
    assert not StyleConfig(enabled=True, global_path=False).uses_global_path


def test_lr_scale_puts_what_step2_adds_in_a_group_of_its_own() -> None:
    named = [("unet.conv_in.weight", torch.nn.Parameter(torch.zeros(1))),
             ("unet.down_blocks.0.attentions.0.transformer_blocks.0.attn2.processor.to_k_style.weight",
              torch.nn.Parameter(torch.zeros(1))),
             ("unet.class_embedding.out.weight", torch.nn.Parameter(torch.zeros(1))),
             ("style.head.weight", torch.nn.Parameter(torch.zeros(1)))]
    cfg = Config()
    cfg.style = StyleConfig(enabled=True, lr_scale=10.0)
    cfg.optim.lr = 1e-3
    base, new = optimizer_groups(named, cfg)
    assert [id(p) for p in base["params"]] == [id(named[0][1])]
    assert [id(p) for p in new["params"]] == [id(p) for _, p in named[1:]] and new["lr"] == 1e-2
    cfg.style.lr_scale = 1.0
    assert optimizer_groups(named, cfg) == [p for _, p in named]  # one group: old runs resume as they were
