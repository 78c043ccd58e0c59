"""`ldmscale-export CKPT OUT`: a training checkpoint (any ZeRO stage) as a StableDiffusionPipeline folder
(safetensors) that diffusers loads with `StableDiffusionPipeline.from_pretrained(OUT)`, and `ldmscale_export.json`
beside it: the checkpoint, step and weights it came from (ldmscale-sample and -eval read it: an eval of the export
records its step).

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
from collections.abc import Mapping
from pathlib import Path

from ldmscale.checkpoint import TrainedModel, load_trained
from ldmscale.checkpoint.preflight import EXPORT_RECORD, CheckpointInfo, check_checkpoint
from ldmscale.checkpoint.store import CheckpointError
from ldmscale.config import Config
from ldmscale.data.buckets import SizeCond
from ldmscale.inference import ip_adapter
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
    if info.cfg is not None:
        check_exportable(info.cfg, path)
    check_export_folder(Path(out), info)
    return info


def check_exportable(cfg: Config, source: str | Path) -> None:
    """A style model the IP-Adapter format cannot carry is refused, naming the setting, before anything loads."""
    reason = ip_adapter.refusal(cfg.style) if cfg.style.enabled else None
    if reason:
        raise CheckpointError(f"{source} cannot be exported as a diffusers IP-Adapter: {reason} (or sample it with "
                              f"ldmscale-sample --style-image)")


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


def write_pipeline(m: TrainedModel, out: str | Path, record: Mapping[str, object], source: str | Path = "the model",
                   size_cond: SizeCond | None = None) -> Path:
    """The text pipeline (size conditioning baked in), plus the IP-Adapter of a style model."""
    # imported here: importing the pipeline warns when torchvision is absent, noise above a check's one line
    from diffusers import DDIMScheduler, StableDiffusionPipeline

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
    (Path(out) / EXPORT_RECORD).write_text(json.dumps(record, indent=1))
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
    info = check_export(path, out, weights)
    assert info.tag_dir is not None
    record = {"checkpoint": str(info.tag_dir), "step": info.step, "weights": info.weights}
    return write_pipeline(load_trained(info.tag_dir, info.weights), out, record, path, size_cond)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = ArgumentParser(prog="ldmscale-export", description="Checkpoint -> diffusers pipeline folder "
                       "(+ ip_adapter/ for a clip-backbone style checkpoint)")
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
