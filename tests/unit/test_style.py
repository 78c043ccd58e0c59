"""Style conditioning: the decoupled attention path, the variational encoder, references, config checks."""

from __future__ import annotations

import copy
import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch

from ldmscale.config import ConfigError, ModelConfig, StyleConfig, load_config
from ldmscale.data.style_refs import REF_BYTES, REF_KEY, augment_view, pair_by_style
from ldmscale.models import noise
from ldmscale.models.networks import build_unet
from ldmscale.models.objective import LatentDiffusion, build_noise_scheduler
from ldmscale.style.attention import StyleAttnProcessor, add_style_path, is_style_key
from ldmscale.style.encoder import StyleEncoder, beta_at, kl_to_standard_normal
from tests.conftest import REPO, tiny_overrides

TEXT_DIM = 32


def _inputs(b: int = 3) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return torch.randn(b, 4, 8, 8, generator=g), torch.tensor([10, 400, 900][:b]), torch.randn(b, 16, TEXT_DIM,
                                                                                                generator=g)


def _step1_unet(attention: str = "sdpa") -> torch.nn.Module:
    torch.manual_seed(0)
    unet = build_unet("tiny", 4, TEXT_DIM, 8).eval()
    if attention == "default":
        from diffusers.models.attention_processor import AttnProcessor

        unet.set_attn_processor(AttnProcessor())
    return unet


@pytest.mark.parametrize("attention", ["sdpa", "default"])
def test_step2_model_equals_step1_model_at_initialisation(attention: str) -> None:
    step1 = _step1_unet(attention)
    step2 = copy.deepcopy(step1)
    n = add_style_path(step2, TEXT_DIM, sdpa=attention == "sdpa")
    assert n == sum(k.endswith("attn2.processor") for k in step1.attn_processors) == 4  # down, mid, 2x up
    x, t, ctx = _inputs()
    tokens = torch.randn(3, 4, TEXT_DIM) * 3  # any style tokens at all
    with torch.no_grad():
        ref = step1(x, t, encoder_hidden_states=ctx).sample
        same = step2(x, t, encoder_hidden_states=ctx, cross_attention_kwargs={"style_tokens": tokens}).sample
        without = step2(x, t, encoder_hidden_states=ctx).sample
    assert torch.equal(ref, same) and torch.equal(ref, without)  # bitwise, not allclose


def test_trained_style_path_changes_output_but_zero_tokens_add_exactly_nothing() -> None:
    unet = _step1_unet()
    add_style_path(unet, TEXT_DIM)
    x, t, ctx = _inputs()
    with torch.no_grad():
        base = unet(x, t, encoder_hidden_states=ctx).sample
        for p in unet.attn_processors.values():
            if isinstance(p, StyleAttnProcessor):
                p.to_v_style.weight.normal_()  # as after some training
        styled = unet(x, t, encoder_hidden_states=ctx, cross_attention_kwargs={"style_tokens": torch.randn(3, 4, 32)})
        dropped = unet(x, t, encoder_hidden_states=ctx, cross_attention_kwargs={"style_tokens": torch.zeros(3, 4, 32)})
    assert not torch.allclose(styled.sample, base, atol=1e-3)
    assert torch.equal(dropped.sample, base)  # style dropout / unconditional branch: exactly the text model


def test_concatenating_zero_style_tokens_to_the_text_would_change_step1() -> None:
    """Why the style path is separate: extra keys take softmax mass even when they are all zero."""
    unet = _step1_unet()
    x, t, ctx = _inputs()
    with torch.no_grad():
        ref = unet(x, t, encoder_hidden_states=ctx).sample
        concat = unet(x, t, encoder_hidden_states=torch.cat([ctx, torch.zeros(3, 4, TEXT_DIM)], dim=1)).sample
    assert (concat - ref).abs().max() > 1e-4


def test_style_keys_live_in_the_unet_state_dict_as_processor_weights() -> None:
    unet = _step1_unet()
    plain = set(unet.state_dict())
    add_style_path(unet, TEXT_DIM)
    extra = set(unet.state_dict()) - plain
    assert len(extra) == 8 and all(is_style_key(k) for k in extra)
    assert set(unet.state_dict()) >= plain  # step 1's keys unchanged: step-1 checkpoints still load


def test_objective_adds_beta_times_masked_kl_and_reports_parts() -> None:
    cfg = StyleConfig(enabled=True, num_tokens=2, conv_channels=[8, 16])
    unet = _step1_unet()
    add_style_path(unet, TEXT_DIM)
    torch.manual_seed(0)
    m = LatentDiffusion(unet, build_noise_scheduler(ModelConfig()), 0.0, StyleEncoder(cfg, TEXT_DIM))
    x, t, ctx = _inputs()
    eps, refs = torch.randn(3, 4, 8, 8), torch.rand(3, 3, 32, 32) * 2 - 1
    z, keep = torch.randn(3, 2, TEXT_DIM), torch.tensor([1.0, 0.0, 1.0])
    loss, parts = m(x, ctx, eps, t, refs, z, keep, 0.5)
    mu, logvar = m.style(refs)
    kl = kl_to_standard_normal(mu, logvar)
    assert torch.allclose(parts["kl"], (kl[0] + kl[2]) / 2)  # the dropped sample's KL is not counted
    assert torch.allclose(loss, parts["denoise"] + 0.5 * parts["kl"])
    loss.backward()
    assert m.style.head.weight.grad is not None and m.style.head.weight.grad.abs().sum() > 0  # KL reaches it
    assert beta_at(StyleConfig(beta=0.2, beta_warmup_steps=100), 25) == pytest.approx(0.05)
    assert beta_at(StyleConfig(beta=0.2, beta_warmup_steps=100), 500) == pytest.approx(0.2)


def test_style_path_learns_to_use_the_tokens() -> None:
    """A short optimisation: with style tokens, the denoising loss ends lower than the text-only model's."""
    unet = _step1_unet()
    add_style_path(unet, TEXT_DIM)
    for n, p in unet.named_parameters():
        p.requires_grad_(is_style_key(n))
    x, t, ctx = _inputs()
    eps = torch.randn(3, 4, 8, 8)
    tokens = torch.randn(3, 4, TEXT_DIM)
    m = LatentDiffusion(unet, build_noise_scheduler(ModelConfig()))
    noisy = m.scheduler.add_noise(x, eps, t)
    opt = torch.optim.Adam([p for p in unet.parameters() if p.requires_grad], lr=3e-3)
    first = None
    for _ in range(40):
        opt.zero_grad()
        pred = unet(noisy, t, encoder_hidden_states=ctx, cross_attention_kwargs={"style_tokens": tokens}).sample
        loss = ((pred - eps) ** 2).mean()
        first = first if first is not None else loss.item()
        loss.backward()
        opt.step()
    assert loss.item() < 0.9 * first


def test_augmented_view_is_deterministic_per_key_and_keeps_colours() -> None:
    rng = np.random.default_rng(0)
    img = np.zeros((32, 32, 3), np.uint8)
    img[:] = (250, 230, 120)
    img[8:24, 12:20] = (200, 30, 30)
    img[4:28, 4:8] = rng.integers(0, 255, (24, 4, 3))
    a = augment_view(img, 0, "000000007", (0.5, 1.0), 4)
    assert np.array_equal(a, augment_view(img, 0, "000000007", (0.5, 1.0), 4))
    assert not np.array_equal(a, augment_view(img, 0, "000000008", (0.5, 1.0), 4))
    assert not np.array_equal(a, img) and a.shape == img.shape
    bg = np.array([250, 230, 120])
    assert (np.abs(a.astype(int) - bg).sum(-1) < 30).mean() > 0.4  # the background colour survives


def _meta_sample(key: str, style: str | None) -> dict:
    meta = json.dumps({} if style is None else {"style": style})
    return {"__key__": key, "jpg": f"img-{key}".encode(), "txt": b"x", "json": meta.encode()}


def test_metadata_pairing_takes_a_partner_of_the_same_style_and_replays_exactly() -> None:
    import random

    styles = ["a", "b", "a", "c", "b", "a", "a", None, "b", "c"]
    stream = [_meta_sample(f"{i:09d}", s) for i, s in enumerate(styles)]

    def run() -> tuple[list[dict], Counter]:
        counts: Counter = Counter()
        return list(pair_by_style(iter(stream), "style", 8, random.Random(5), ("jpg",), counts)), counts

    out, counts = run()
    assert out == run()[0]  # a replay of the same stream builds the same pairs
    style_by_key = dict(zip((s["__key__"] for s in stream), styles))
    for s in out:
        if REF_BYTES in s:
            assert style_by_key[s[REF_KEY]] == style_by_key[s["__key__"]] and s[REF_KEY] != s["__key__"]
            assert s[REF_BYTES] == f"img-{s[REF_KEY]}".encode()  # the partner's raw image travels along
    assert counts["style_self_ref"] == 4  # first a, first b, first c, and the sample without a style


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("style.backbone=resnet", "style.backbone='resnet' is not allowed"),
        ("style.backbone=clip", "style.backbone=clip needs style.vision_model"),
        ("style.reference=random", "style.reference='random' is not allowed"),
        ("style.dropout=1.0", "style.dropout=1.0 must be in [0, 1)"),
        ("style.num_tokens=0", "style.num_tokens=0 must be > 0"),
        ("style.init_from=/nonexistent/run", "style.init_from='/nonexistent/run': no such run dir"),
        ("style.init_weights=best", "style.init_weights='best' is not allowed"),
        ("style.crop_scale=[0.8,0.2]", "style.crop_scale=[0.8, 0.2] must satisfy"),
    ],
)
def test_bad_style_config_is_rejected(assets: Path, tmp_path: Path, override: str, message: str) -> None:
    with pytest.raises(ConfigError) as err:
        load_config(REPO / "configs/tiny.yaml", tiny_overrides(assets, tmp_path) + ["style.enabled=true", override])
    assert message in str(err.value)


def test_style_noise_is_per_sample() -> None:
    a = noise.randn(0, [5, 6], (2, 3), noise.Stream.STYLE)
    assert torch.equal(a[1], noise.randn(0, [6], (2, 3), noise.Stream.STYLE)[0])


def test_clip_backbone_is_loaded_with_from_pretrained_frozen_outside_with_a_trainable_head(tmp_path: Path) -> None:
    from transformers import CLIPVisionConfig, CLIPVisionModel

    from ldmscale.style.encoder import StyleReference, build_style, style_input

    torch.manual_seed(0)
    CLIPVisionModel(CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                                     image_size=32, patch_size=8)).save_pretrained(tmp_path / "vision")
    cfg = StyleConfig(enabled=True, backbone="clip", vision_model=str(tmp_path / "vision"), num_tokens=3,
                      clip_head="pooled")
    enc, frozen = build_style(cfg, TEXT_DIM, torch.device("cpu"), torch.float32)
    assert frozen is not None and enc.backbone is None
    assert not any(p.requires_grad for p in frozen.model.parameters())
    assert not set(map(id, frozen.model.parameters())) & set(map(id, enc.parameters()))  # not in the engine
    refs = torch.rand(2, 3, 16, 16) * 2 - 1  # resized to the vision model's 32 px inside
    mu, logvar = enc(style_input(frozen, refs))
    assert mu.shape == logvar.shape == (2, 3, TEXT_DIM)
    (mu.sum() + logvar.sum()).backward()
    assert enc.head.weight.grad is not None
    assert torch.equal(StyleReference(enc, frozen).tokens(refs), mu.detach())  # sampling uses the mean
