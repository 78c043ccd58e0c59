"""`ldmscale-export CKPT OUT`: a training checkpoint (any ZeRO stage) as a StableDiffusionPipeline folder
(safetensors) that diffusers loads with `StableDiffusionPipeline.from_pretrained(OUT)`.

A style checkpoint (clip backbone) adds its style path as an IP-Adapter, `OUT/ip_adapter/`
(ldmscale/inference/ip_adapter.py), used with
`pipe.load_ip_adapter(OUT, subfolder="ip_adapter", weight_name="ip-adapter.safetensors")` and
`pipe(prompt, ip_adapter_image=ref)`; a style model that format cannot carry is refused, naming the setting.

A size-conditioned checkpoint (model.size_conditioning) is exported with one size conditioning baked into the
U-Net (models/size_conditioning.py: bake_size_conditioning), since StableDiffusionPipeline passes the U-Net no
`added_cond_kwargs`: SDXL's default for the training resolution's square (original = target, crop 0,0) unless
--original-size, --crop, --target-size say otherwise. OUT/size_conditioning.json records what was baked; other
sizes and crops are drawn from the checkpoint with ldmscale-sample.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from diffusers import DDIMScheduler, StableDiffusionPipeline

from ldmscale.checkpoint import CheckpointError, TrainedModel, load_trained, saved_config
from ldmscale.config import Config
from ldmscale.data.buckets import SizeCond
from ldmscale.inference import ip_adapter
from ldmscale.inference.sizes import add_size_cond_args, drawable, size_cond_from_args
from ldmscale.models.size_conditioning import bake_size_conditioning, has_size_conditioning
from ldmscale.runtime.cli import run_cli

BAKED = "size_conditioning.json"


def check_exportable(cfg: Config, source: str | Path) -> None:
    """A style model the IP-Adapter format cannot carry is refused, naming the setting, before anything loads."""
    reason = ip_adapter.refusal(cfg.style) if cfg.style.enabled else None
    if reason:
        raise CheckpointError(f"{source} cannot be exported as a diffusers IP-Adapter: {reason} (or sample it with "
                              f"ldmscale-sample --style-image)")


def write_pipeline(m: TrainedModel, out: str | Path, source: str | Path = "the model",
                   size_cond: SizeCond | None = None) -> Path:
    """The text pipeline (size conditioning baked in), plus the IP-Adapter of a style model."""
    style_cfg = m.cfg.style if m.cfg is not None and m.style is not None else None
    if style_cfg is not None:
        assert m.cfg is not None
        check_exportable(m.cfg, source)
    unet = ip_adapter.text_unet(m.unet) if style_cfg is not None else m.unet
    baked = None
    if has_size_conditioning(unet):
        side = m.cfg.data.resolution if m.cfg is not None else int(unet.config.sample_size)
        baked = size_cond or SizeCond.default(side, side)
        unet = bake_size_conditioning(unet, baked)
    extractor = ip_adapter.feature_extractor(m.style.frozen.size) if style_cfg is not None else None
    pipe = StableDiffusionPipeline(
        vae=m.encoders.vae, text_encoder=m.encoders.text_encoder, tokenizer=m.encoders.tokenizer, unet=unet,
        scheduler=DDIMScheduler.from_config(m.scheduler_config), safety_checker=None, feature_extractor=extractor,
        image_encoder=None, requires_safety_checker=False,
    )
    pipe.save_pretrained(out, safe_serialization=True)
    if baked is not None:
        (Path(out) / BAKED).write_text(json.dumps({
            "size_cond": baked.as_list(), "order": "original h, w, crop top, left, target h, w",
            "note": "fixed in the U-Net's time embedding; sample other sizes from the checkpoint with ldmscale-sample",
        }, indent=1))
    if style_cfg is not None:
        ip_adapter.write_ip_adapter(m.unet, m.style.encoder, m.style.frozen, Path(out))
    return Path(out)


def export_pipeline(path: str | Path, out: str | Path, weights: str = "ema", size_cond: SizeCond | None = None
                    ) -> Path:
    if not (Path(path) / "model_index.json").exists():  # a checkpoint, not an exported folder
        check_exportable(saved_config(path), path)
    return write_pipeline(load_trained(path, weights), out, path, size_cond)


def cli(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="ldmscale-export", description="Checkpoint -> diffusers pipeline folder "
                                "(+ ip_adapter/ for a clip-backbone style checkpoint)")
    p.add_argument("checkpoint", help="run dir, its checkpoints/ folder, or a step_* folder")
    p.add_argument("out", help="output folder for StableDiffusionPipeline.from_pretrained")
    p.add_argument("--weights", choices=["ema", "raw"], default="ema")
    add_size_cond_args(p)
    run_cli("ldmscale-export", lambda: print(export_pipeline(*_args(p.parse_args(argv)))))


def _args(a: argparse.Namespace) -> tuple[str, str, str, SizeCond | None]:
    model = drawable(a.checkpoint)
    return a.checkpoint, a.out, a.weights, size_cond_from_args(a, model, a.checkpoint, model.side, model.side)


if __name__ == "__main__":
    cli()
