"""`ldmscale-export CKPT OUT`: a training checkpoint (any ZeRO stage) as a StableDiffusionPipeline folder
(safetensors) that diffusers loads with `StableDiffusionPipeline.from_pretrained(OUT)`.

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

from ldmscale.checkpoint import CheckpointError, load_trained
from ldmscale.data.buckets import SizeCond
from ldmscale.inference.sizes import add_size_cond_args, drawable, size_cond_from_args
from ldmscale.models.size_conditioning import bake_size_conditioning, has_size_conditioning
from ldmscale.runtime.cli import run_cli

BAKED = "size_conditioning.json"


def export_pipeline(path: str | Path, out: str | Path, weights: str = "ema", size_cond: SizeCond | None = None
                    ) -> Path:
    m = load_trained(path, weights)
    if m.style is not None:
        raise CheckpointError(
            f"{path} is a style-conditioned checkpoint: StableDiffusionPipeline has no style path; sample it with "
            f"ldmscale-sample --style-image, or export its step-1 (text-only) run"
        )
    unet = m.unet
    if has_size_conditioning(unet):
        side = m.cfg.data.resolution if m.cfg is not None else int(unet.config.sample_size)
        size_cond = size_cond or SizeCond.default(side, side)
        unet = bake_size_conditioning(unet, size_cond)
    pipe = StableDiffusionPipeline(
        vae=m.encoders.vae, text_encoder=m.encoders.text_encoder, tokenizer=m.encoders.tokenizer, unet=unet,
        scheduler=DDIMScheduler.from_config(m.scheduler_config), safety_checker=None, feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.save_pretrained(out, safe_serialization=True)
    if unet is not m.unet:
        assert size_cond is not None
        (Path(out) / BAKED).write_text(json.dumps({
            "size_cond": size_cond.as_list(), "order": "original h, w, crop top, left, target h, w",
            "note": "fixed in the U-Net's time embedding; sample other sizes from the checkpoint with ldmscale-sample",
        }, indent=1))
    return Path(out)


def cli(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="ldmscale-export", description="Checkpoint -> diffusers pipeline folder")
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
