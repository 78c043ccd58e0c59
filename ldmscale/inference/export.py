"""`ldmscale-export CKPT OUT`: a training checkpoint (any ZeRO stage) as a StableDiffusionPipeline folder
(safetensors) that diffusers loads with `StableDiffusionPipeline.from_pretrained(OUT)`.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from diffusers import DDIMScheduler, StableDiffusionPipeline

from ldmscale.checkpoint import CheckpointError, load_trained
from ldmscale.runtime.cli import run_cli


def export_pipeline(path: str | Path, out: str | Path, weights: str = "ema") -> Path:
    m = load_trained(path, weights)
    if m.style is not None:
        raise CheckpointError(
            f"{path} is a style-conditioned checkpoint: StableDiffusionPipeline has no style path; sample it with "
            f"ldmscale-sample --style-image, or export its step-1 (text-only) run"
        )
    pipe = StableDiffusionPipeline(
        vae=m.encoders.vae, text_encoder=m.encoders.text_encoder, tokenizer=m.encoders.tokenizer, unet=m.unet,
        scheduler=DDIMScheduler.from_config(m.scheduler_config), safety_checker=None, feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.save_pretrained(out, safe_serialization=True)
    return Path(out)


def cli(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="ldmscale-export", description="Checkpoint -> diffusers pipeline folder")
    p.add_argument("checkpoint", help="run dir, its checkpoints/ folder, or a step_* folder")
    p.add_argument("out", help="output folder for StableDiffusionPipeline.from_pretrained")
    p.add_argument("--weights", choices=["ema", "raw"], default="ema")
    run_cli("ldmscale-export", lambda: print(export_pipeline(*_args(p.parse_args(argv)))))


def _args(a: argparse.Namespace) -> tuple[str, str, str]:
    return a.checkpoint, a.out, a.weights


if __name__ == "__main__":
    cli()
