"""ldmscale-export of a clip-backbone style checkpoint as a diffusers IP-Adapter, loaded back through diffusers'
own `load_ip_adapter`: the same noise prediction for the same reference, and a pipeline call end to end."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionPipeline
from PIL import Image
from safetensors.torch import save_file

from ldmscale.checkpoint import COMPLETE, load_trained
from ldmscale.config import dump_config, load_config
from ldmscale.inference.export import cli, export_pipeline
from ldmscale.models.encoders import FrozenEncoders
from ldmscale.models.networks import build_unet
from ldmscale.style.attention import StyleAttnProcessor, set_style_scales
from ldmscale.style.encoder import build_style
from ldmscale.style.install import install_style_path
from tests.conftest import REPO, tiny_overrides


def _vision_model(folder: Path) -> Path:
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    torch.manual_seed(0)
    CLIPVisionModelWithProjection(CLIPVisionConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, image_size=32,
        patch_size=8, projection_dim=24)).save_pretrained(folder)
    return folder


def _style_checkpoint(assets: Path, run: Path, **style: object) -> Path:
    """A step-2 checkpoint folder as the trainer leaves it (config.yaml, trainer_state.json, ema.safetensors,
    COMPLETE, latest), with style weights drawn at random so that the style path is far from its zero
    initialisation."""
    cfg = load_config(REPO / "configs/tiny.yaml", tiny_overrides(assets, run, **{"style.enabled": "true", **style}))
    enc = FrozenEncoders.load(cfg.model, torch.device("cpu"), torch.float32)
    torch.manual_seed(1)
    unet = build_unet("tiny", enc.latent_channels, enc.text_dim, cfg.data.resolution // 4)
    install_style_path(unet, cfg.style, enc.text_dim)
    encoder, _ = build_style(cfg.style, enc.text_dim, torch.device("cpu"), torch.float32)
    with torch.no_grad():
        for p in list(encoder.parameters()) + [p for n, p in unet.named_parameters() if "_style" in n]:
            p.copy_(torch.randn_like(p) * 0.2)
    state = {**{f"unet.{k}": v for k, v in unet.state_dict().items()},
             **{f"style.{k}": v for k, v in encoder.state_dict().items()}}
    tag = run / "checkpoints" / "step_00000001"
    tag.mkdir(parents=True)
    (tag / "config.yaml").write_text(dump_config(cfg))
    (tag / "trainer_state.json").write_text(json.dumps({"step": 1}))
    save_file({k: v.contiguous() for k, v in state.items()}, str(tag / "ema.safetensors"))
    (tag / COMPLETE).write_text("")
    (run / "checkpoints" / "latest").write_text(tag.name)
    return run


@pytest.fixture(scope="module")
def exported(assets: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    tmp = tmp_path_factory.mktemp("ipa")
    run = _style_checkpoint(assets, tmp / "run", **{"style.backbone": "clip",
                                                     "style.vision_model": str(_vision_model(tmp / "vision"))})
    out = export_pipeline(run, tmp / "export")
    pipe = StableDiffusionPipeline.from_pretrained(out)
    pipe.load_ip_adapter(str(out), subfolder="ip_adapter", weight_name="ip-adapter.safetensors")
    return {"run": run, "out": out, "pipe": pipe, "model": load_trained(run)}


def test_diffusers_unet_with_the_loaded_adapter_predicts_ldmscales_noise(exported: dict) -> None:
    m, pipe = exported["model"], exported["pipe"]
    torch.manual_seed(2)
    refs = torch.rand(2, 3, 32, 32) * 2 - 1
    tokens = m.style.tokens(refs)
    embeds = m.style.frozen.features(refs)  # CLIP's projected image_embeds, what diffusers' pipeline computes
    same_encoder = pipe.image_encoder(pixel_values=m.style.frozen.pixel_values(refs)).image_embeds
    assert torch.allclose(same_encoder, embeds, atol=1e-6)
    x, t, ctx = torch.randn(2, 4, 8, 8), torch.tensor([50, 700]), torch.randn(2, 77, m.encoders.text_dim)
    with torch.no_grad():
        ours = m.unet(x, t, encoder_hidden_states=ctx, cross_attention_kwargs={"style_tokens": tokens}).sample
        text_only = m.unet(x, t, encoder_hidden_states=ctx).sample
        theirs = pipe.unet(x, t, encoder_hidden_states=ctx, added_cond_kwargs={"image_embeds": [embeds[:, None]]})
        uncond = pipe.unet(x, t, encoder_hidden_states=ctx,
                           added_cond_kwargs={"image_embeds": [torch.zeros_like(embeds)[:, None]]})
    assert (ours - text_only).abs().max() > 1e-3  # the style path does something, so agreeing means something
    assert (theirs.sample - ours).abs().max() <= 1e-4
    # diffusers' unconditional image branch (zero embeddings) is ldmscale's dropped style (zero tokens)
    assert (uncond.sample - text_only).abs().max() <= 1e-4
    # per-block scales: ldmscale-sample --style-scale-blocks = set_ip_adapter_scale with the same block groups
    scales = {"down": 0.0, "mid": 1.0, "up": 0.5}
    set_style_scales(m.unet, scales)
    pipe.set_ip_adapter_scale(scales)
    with torch.no_grad():
        ours = m.unet(x, t, encoder_hidden_states=ctx, cross_attention_kwargs={"style_tokens": tokens}).sample
        theirs = pipe.unet(x, t, encoder_hidden_states=ctx, added_cond_kwargs={"image_embeds": [embeds[:, None]]})
    set_style_scales(m.unet, None)
    pipe.set_ip_adapter_scale(1.0)
    assert (theirs.sample - ours).abs().max() <= 1e-4


def test_adapter_file_has_diffusers_layout_and_the_pipeline_draws(exported: dict) -> None:
    from safetensors import safe_open

    with safe_open(str(exported["out"] / "ip_adapter/ip-adapter.safetensors"), "pt") as f:
        keys = set(f.keys())
    blocks = sum(isinstance(p, StyleAttnProcessor) for p in exported["model"].unet.attn_processors.values())
    assert keys == {"image_proj.proj.weight", "image_proj.proj.bias", "image_proj.norm.weight", "image_proj.norm.bias",
                    *(f"ip_adapter.{2 * i + 1}.to_{kv}_ip.weight" for i in range(blocks) for kv in "kv")}
    assert (exported["out"] / "ip_adapter/image_encoder/preprocessor_config.json").exists()
    pipe = exported["pipe"]
    pipe.set_ip_adapter_scale(0.75)  # text guidance 4, style guidance 3 (docs/style.md)
    ref = Image.fromarray(np.random.default_rng(0).integers(0, 255, (32, 32, 3), dtype=np.uint8))
    images = pipe("a handwritten digit 3", ip_adapter_image=ref, num_inference_steps=2, guidance_scale=4.0,
                  height=32, width=32, output_type="np").images
    assert images.shape == (1, 32, 32, 3) and np.isfinite(images).all()


def test_a_model_the_format_cannot_carry_is_refused_in_one_line(
        assets: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    run = _style_checkpoint(assets, tmp_path / "run")  # the conv backbone
    capsys.readouterr()  # what building the checkpoint printed
    with pytest.raises(SystemExit) as e:
        cli([str(run), str(tmp_path / "out")])
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and len(err.splitlines()) == 1 and "style.backbone=conv" in err
    assert not (tmp_path / "out").exists()  # refused before anything is written
