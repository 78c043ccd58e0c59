"""The clip backbone's default head is diffusers' IP-Adapter ImageProjection; saved configs keep what they meant."""

from __future__ import annotations

from pathlib import Path

import torch
import yaml

from ldmscale.config import Config, StyleConfig, config_from_yaml_text, dump_config
from ldmscale.style.encoder import StyleReference, build_style, style_input

TEXT_DIM = 32


def _vision(folder: Path) -> Path:
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    torch.manual_seed(0)
    CLIPVisionModelWithProjection(CLIPVisionConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, image_size=32,
        patch_size=8, projection_dim=24)).save_pretrained(folder)
    return folder


def test_ip_adapter_head_projects_clip_image_embeds_and_zero_embeds_give_zero_tokens(tmp_path: Path) -> None:
    from diffusers.models.embeddings import ImageProjection

    cfg = StyleConfig(enabled=True, backbone="clip", vision_model=str(_vision(tmp_path / "vision")))
    enc, frozen = build_style(cfg, TEXT_DIM, torch.device("cpu"), torch.float32)
    assert frozen is not None and frozen.projected and frozen.feature_dim == 24
    refs = torch.rand(2, 3, 16, 16) * 2 - 1
    feats = style_input(frozen, refs)
    assert torch.equal(feats, frozen.model(pixel_values=frozen.pixel_values(refs)).image_embeds)
    mu, logvar = enc(feats)
    assert mu.shape == logvar.shape == (2, 4, TEXT_DIM)
    # the same numbers as diffusers' own ImageProjection with the weights an export writes (zero biases)
    theirs = ImageProjection(image_embed_dim=24, cross_attention_dim=TEXT_DIM, num_image_text_embeds=4)
    with torch.no_grad():
        theirs.image_embeds.weight.copy_(enc.image_proj.proj.weight)
        theirs.image_embeds.bias.zero_()
        theirs.norm.weight.copy_(enc.image_proj.norm.weight)
        theirs.norm.bias.zero_()
    assert torch.allclose(theirs(feats), mu, atol=1e-6)
    # diffusers' unconditional image branch: zero embeddings -> exactly ldmscale's dropped style (zero tokens)
    assert torch.equal(enc(torch.zeros_like(feats))[0], torch.zeros(2, 4, TEXT_DIM))
    (mu.sum() + logvar.sum()).backward()
    assert enc.image_proj.proj.weight.grad is not None and enc.logvar.weight.grad is not None
    assert torch.equal(StyleReference(enc, frozen).tokens(refs), mu.detach())  # sampling uses the mean


def test_saved_configs_from_before_the_new_style_fields_keep_their_meaning() -> None:
    cfg = Config()
    cfg.style = StyleConfig(enabled=True, backbone="clip", vision_model="v", colour_stats=True, clip_head="pooled")
    old = yaml.safe_load(dump_config(cfg))
    for key in ("clip_head", "global_path", "lr_scale"):  # what a style run saved before these existed
        del old["style"][key]
    back = config_from_yaml_text(yaml.safe_dump(old)).style
    assert back.clip_head == "pooled" and back.global_path is False and back.lr_scale == 1.0
    assert back.uses_colour_stats
    now = config_from_yaml_text(dump_config(Config())).style  # a new run: the auto values stay auto
    assert now.global_path is None and now.colour_stats is None and now.clip_head == "ip_adapter"
