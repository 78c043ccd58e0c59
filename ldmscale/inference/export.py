"""`ldmscale-export CKPT OUT`: a training checkpoint (any ZeRO stage) as a StableDiffusionPipeline folder
(safetensors) that diffusers loads with `StableDiffusionPipeline.from_pretrained(OUT)`, and `ldmscale_export.json`
beside it: the checkpoint, step and weights it came from (ldmscale-sample and -eval read it: an eval of the export
records its step).

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

from ldmscale.checkpoint import load_trained
from ldmscale.checkpoint.preflight import EXPORT_RECORD, CheckpointInfo, check_checkpoint
from ldmscale.checkpoint.store import CheckpointError
from ldmscale.data.buckets import SizeCond
from ldmscale.inference.sizes import add_size_cond_args, drawable, size_cond_from_args
from ldmscale.models.size_conditioning import bake_size_conditioning, has_size_conditioning
from ldmscale.runtime.cli import ArgumentParser, output_dir_problem, run_cli

BAKED = "size_conditioning.json"


def check_export(path: str | Path, out: str | Path, weights: str | None) -> CheckpointInfo:
    """Every input of an export, before any weights are read."""
    info = check_checkpoint(path, weights)
    if info.exported:
        raise CheckpointError(f"{path} is already an exported diffusers folder; give the training checkpoint "
                              f"(run dir, checkpoints/ or step_* folder) it came from")
    if info.style:
        raise CheckpointError(
            f"{path} is a style-conditioned checkpoint: StableDiffusionPipeline has no style path; sample it with "
            f"ldmscale-sample --style-image, or export its step-1 (text-only) run"
        )
    check_export_folder(Path(out), info)
    return info


def check_export_folder(out: Path, info: CheckpointInfo) -> None:
    """OUT must be a new, empty or earlier export folder outside the checkpoint's run: an export written into a
    run dir would make that run dir read as the export (its model_index.json) by every later command."""
    assert info.tag_dir is not None
    problem = output_dir_problem(out)
    if problem:
        raise CheckpointError(f"OUT {out}: {problem}; give a folder path for the diffusers pipeline")
    target, tag = out.resolve(), info.tag_dir.resolve()
    root = tag.parent
    if (root / "latest").exists() or root.name == "checkpoints":  # a run's checkpoints/ folder
        if target in (root.parent, root) or target.is_relative_to(root):
            raise CheckpointError(f"OUT {out} is the run's own folder ({root.parent}) or inside its checkpoints/: "
                                  f"give a folder of its own, e.g. {root.parent / 'export'}")
    elif target.is_relative_to(tag):
        raise CheckpointError(f"OUT {out} is inside the checkpoint {tag}: give a folder of its own")
    if out.is_dir() and any(out.iterdir()) and not (out / "model_index.json").exists():
        raise CheckpointError(f"OUT {out} is a folder with other files in it: give a new or empty folder (or an "
                              f"earlier export to replace)")


def export_pipeline(path: str | Path, out: str | Path, weights: str = "ema", size_cond: SizeCond | None = None
                    ) -> Path:
    info = check_export(path, out, weights)
    # imported after the checks: importing the pipeline warns when torchvision is absent, noise above their line
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    m = load_trained(info.tag_dir or path, info.weights)
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
    record = {"checkpoint": str(info.tag_dir), "step": info.step, "weights": info.weights}
    (Path(out) / EXPORT_RECORD).write_text(json.dumps(record, indent=1))
    if unet is not m.unet:
        assert size_cond is not None
        (Path(out) / BAKED).write_text(json.dumps({
            "size_cond": size_cond.as_list(), "order": "original h, w, crop top, left, target h, w",
            "note": "fixed in the U-Net's time embedding; sample other sizes from the checkpoint with ldmscale-sample",
        }, indent=1))
    return Path(out)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = ArgumentParser(prog="ldmscale-export", description="Checkpoint -> diffusers pipeline folder")
    p.add_argument("checkpoint", help="run dir, its checkpoints/ folder, or a step_* folder")
    p.add_argument("out", help="output folder for StableDiffusionPipeline.from_pretrained (new, empty, or an "
                               "earlier export; not inside the run's checkpoints/)")
    p.add_argument("--weights", choices=["ema", "raw"], default="ema")
    add_size_cond_args(p)
    return p.parse_args(argv)


def export(a: argparse.Namespace) -> None:
    info = check_export(a.checkpoint, a.out, a.weights)
    assert info.tag_dir is not None
    model = drawable(info.tag_dir)
    size_cond = size_cond_from_args(a, model, a.checkpoint, model.side, model.side)
    print(export_pipeline(info.tag_dir, a.out, info.weights, size_cond))


def cli(argv: list[str] | None = None) -> None:
    run_cli("ldmscale-export", lambda: export(parse_args(argv)))


if __name__ == "__main__":
    cli()
