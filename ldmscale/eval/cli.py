"""`ldmscale-eval CHECKPOINT --prompts FILE --reference REF`: FID and CLIP score per guidance scale.

Launch it like training (torchrun, the deepspeed launcher, srun): every rank draws and scores its share of
the images (prompts.rank_indices), the metric states are summed across ranks, rank 0 writes the report.
Every input is checked before the process group starts: a bad one is a one-line error and exit code 2.
"""

from __future__ import annotations

import argparse
import math
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import torch

from ldmscale.checkpoint import load_trained
from ldmscale.checkpoint.loading import inference_dtype
from ldmscale.checkpoint.preflight import CheckpointInfo, check_checkpoint
from ldmscale.config import SAMPLERS
from ldmscale.data.buckets import SizeCond
from ldmscale.eval.clip_score import build_clip_score, check_clip_model
from ldmscale.eval.fid import (
    GaussianStats,
    build_fid,
    check_stats_file,
    feature_size,
    load_stats,
    parse_features,
    stats_of,
)
from ldmscale.eval.generate import (
    GenerationSettings,
    check_settings,
    draw_missing,
    image_path,
    load_uint8,
    write_index,
    write_settings,
)
from ldmscale.eval.reference import Reference, find_reference, rank_batches
from ldmscale.eval.report import log_wandb, plot_sweep, write_json
from ldmscale.inference.prompts import PromptError, prompt_for, rank_indices, read_prompts
from ldmscale.inference.sizes import CanvasError, add_size_args, canvas_from_args, drawable
from ldmscale.runtime import dist
from ldmscale.runtime.cli import ArgumentParser, at_least, output_dir_problem, run_cli
from ldmscale.runtime.errors import InputError

# the scales of the Stable Diffusion model cards' and NeMo's FID-vs-CLIP curves (30k COCO-2014 val captions)
DEFAULT_GUIDANCE = "1.5,2,3,4,5,6,7,8"

@dataclass
class Plan:
    """Everything the checks found, so the distributed part never fails on input."""

    args: argparse.Namespace
    prompts: list[str]
    guidance: list[float]
    tag_dir: Path | None  # None for an exported diffusers folder
    settings: GenerationSettings | None  # None: only reference statistics are wanted
    wandb_project: str
    wandb_mode: str
    reference: Reference | None = None


def parse_guidance(text: str) -> list[float]:
    try:
        scales = [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise InputError(f"--guidance {text!r}: give comma-separated numbers, e.g. {DEFAULT_GUIDANCE}") from None
    if not scales or any(not math.isfinite(g) or g < 1 for g in scales):
        raise InputError(f"--guidance {text!r}: give scales >= 1 (1 = no classifier-free guidance)")
    return scales


def check_reference(a: argparse.Namespace) -> Reference:
    """--reference, --num-reference and --save-reference-stats against each other and against --features."""
    ref = find_reference(a.reference)
    if ref.kind == "stats":
        check_stats_file(a.reference, a.features)
        if a.save_reference_stats:
            raise InputError("--save-reference-stats needs reference images (shards or a folder), not an .npz")
        if a.num_reference is not None:
            raise InputError(f"--num-reference counts reference images; {a.reference} holds statistics already "
                             f"computed: drop --num-reference")
        return ref
    if a.num_reference is not None and ref.count is not None and a.num_reference > ref.count:
        raise InputError(f"--num-reference {a.num_reference}: {a.reference} holds only {ref.count} images; give "
                         f"at most {ref.count}, or drop --num-reference to use them all")
    if a.num_reference is None and ref.count is not None and ref.count < 2:
        raise InputError(f"--reference {a.reference} holds {ref.count} image(s): FID needs at least 2")
    if a.save_reference_stats:
        out = Path(a.save_reference_stats)
        if out.suffix != ".npz" or out.is_dir():
            raise InputError(f"--save-reference-stats {out}: give a file name ending in .npz (--reference reads it "
                             f"back by that suffix)")
        problem = output_dir_problem(out.parent)
        if problem:
            raise InputError(f"--save-reference-stats {out}: {problem}")
    return ref


def check_canvas(a: argparse.Namespace, info: CheckpointInfo) -> tuple[int, int, SizeCond | None]:
    """The canvas to draw on: --resolution (a square), --width / --height, or the checkpoint's training size; each
    side a multiple of what the model draws (--resolution 30 with a VAE factor of 4 would draw 28 px)."""
    model = drawable(info.tag_dir or info.path)
    if a.resolution:  # the square default (--width / --height override a side)
        if a.resolution % model.multiple:
            near = max(model.multiple, round(a.resolution / model.multiple) * model.multiple)
            raise CanvasError(f"--resolution {a.resolution}: {a.checkpoint} draws sides that are multiples of "
                              f"{model.multiple} px ({model.why}); try --resolution {near}")
        model = replace(model, side=a.resolution)
    return canvas_from_args(a, model, a.checkpoint)


def plan(a: argparse.Namespace, world: int) -> Plan:
    """All input checks; raises InputError with a message naming the problem and the fix."""
    parse_features(a.features)
    problem = output_dir_problem(a.out)
    if problem:
        raise InputError(f"--out {a.out}: {problem}; give a folder for the images and eval.json")
    ref = check_reference(a)
    if a.checkpoint is None:
        if not a.save_reference_stats:
            raise InputError("give a CHECKPOINT to evaluate, or --save-reference-stats FILE to only write statistics")
        if None in reference_canvas(a):
            raise InputError("--save-reference-stats without a CHECKPOINT needs --resolution (the generation size) "
                             "or --width and --height")
        feature_size(a.features)  # a CLIP folder that is not one fails here, not after the process group
        return Plan(a, [], [], None, None, "", "disabled", ref)
    if a.clip_model:
        check_clip_model(a.clip_model)
    feature_size(a.features)
    prompts = read_prompts(a.prompts, a.caption_column) if a.prompts else []
    if not prompts:
        raise PromptError("give --prompts FILE (.txt, or .json/.jsonl/.parquet with a caption column)")
    guidance = parse_guidance(a.guidance)
    num = a.num_images if a.num_images is not None else len(prompts)
    if num < max(2, world):
        raise InputError(f"--num-images {num}: FID needs at least 2 images and every one of the {world} ranks one")
    info = check_checkpoint(a.checkpoint, a.weights)
    project, mode = ("ldmscale", "disabled") if info.cfg is None else (info.cfg.wandb.project, info.cfg.wandb.mode)
    height, width, size_cond = check_canvas(a, info)
    settings = GenerationSettings(str(info.tag_dir or info.path.resolve()), info.step, info.weights, a.seed, a.steps,
                                  a.sampler, height, width, size_cond.as_list() if size_cond else None)
    check_settings(Path(a.out), settings)
    a.num_images = num
    return Plan(a, prompts, guidance, info.tag_dir, settings, project, a.wandb_mode or mode, ref)


def run(p: Plan, rank: int, world: int, device: torch.device) -> dict[str, Any] | None:
    """The distributed part: reference features, then per guidance scale draw the missing images, score."""
    a, out = p.args, Path(p.args.out)
    fid = build_fid(a.features, device)
    height, width = (p.settings.height, p.settings.width) if p.settings else reference_canvas(a)
    assert p.reference is not None and height is not None and width is not None  # plan() checked both
    if p.reference.kind == "stats":
        load_stats(fid, GaussianStats.load(a.reference), real=True, owner=rank == 0)
    else:
        for batch in rank_batches(p.reference, (height, width), rank, world, a.batch_size, a.num_reference):
            fid.update(batch.to(device), real=True)
    if a.save_reference_stats:
        ref = stats_of(fid, real=True)  # collective
        ref.features = a.features
        if rank == 0:
            ref.save(a.save_reference_stats)
            print(f"ldmscale-eval: wrote {a.save_reference_stats} ({ref.n} reference images, {a.features})", flush=True)
    if p.settings is None:
        return None
    source = p.tag_dir or a.checkpoint
    model = load_trained(source, p.settings.weights, device, inference_dtype(a.dtype, source, device))
    clip = build_clip_score(a.clip_model, device) if a.clip_model else None
    if rank == 0:
        write_settings(out, p.settings)
    mine = rank_indices(a.num_images, rank, world)
    results = []
    for g in p.guidance:
        drawn = draw_missing(model, p.prompts, mine, out, g, p.settings, a.batch_size)
        for start in range(0, len(mine), a.batch_size):  # score from the files: resumed == uninterrupted
            chunk = mine[start : start + a.batch_size]
            images = load_uint8([image_path(out, g, i) for i in chunk]).to(device)
            fid.update(images, real=False)
            if clip is not None:
                clip.update(images, [prompt_for(p.prompts, i) for i in chunk])
        row = {"guidance": g, "fid": float(fid.compute()),
               "clip_score": float(clip.compute()) if clip is not None else None}
        fid.reset()  # keeps the reference statistics (reset_real_features=False)
        if clip is not None:
            clip.reset()
        results.append(row)
        if rank == 0:
            write_index(out, g, p.prompts, a.num_images)
        dist.print0(f"guidance {g:g}: FID {row['fid']:.3f}" + (f" | CLIP score {row['clip_score']:.3f}"
                                                                if clip is not None else "") + f" (drew {drawn} here)")
    return {"checkpoint": p.settings.checkpoint, "step": p.settings.step, "results": results,
            "generation": asdict(p.settings),
            "settings": {**vars(a), "num_images": a.num_images, "num_prompts": len(p.prompts), "world_size": world}}


def reference_canvas(a: argparse.Namespace) -> tuple[int | None, int | None]:
    """(height, width) the reference images are decoded at when no checkpoint says it."""
    return a.height or a.resolution, a.width or a.resolution


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = ArgumentParser(prog="ldmscale-eval", description=__doc__.splitlines()[0])
    ap.add_argument("checkpoint", nargs="?", help="run dir, checkpoints/, step_* folder or exported diffusers folder")
    ap.add_argument("--prompts", help="captions: .txt (one per line), .json/.jsonl/.parquet with a caption column")
    ap.add_argument("--caption-column", default="caption")
    ap.add_argument("--reference", required=True,
                    help="reference images (shards: folder, glob, s3://bucket/prefix/ or brace pattern; an image "
                         "folder) or an .npz of --save-reference-stats")
    ap.add_argument("--save-reference-stats", help="write the reference's feature statistics to this .npz")
    ap.add_argument("--num-reference", type=at_least(2), help="use only the first N reference images")
    ap.add_argument("--num-images", type=at_least(1), help="images per guidance scale; prompt i %% len(prompts) "
                                                    "(default: one per prompt)")
    ap.add_argument("--guidance", default=DEFAULT_GUIDANCE, help="comma-separated classifier-free guidance scales")
    ap.add_argument("--features", default="inception:pt_inception-2015-12-05-6726825d.pth",
                    help="FID features: inception:WEIGHTS.pth | clip:FOLDER | pixels:N")
    ap.add_argument("--clip-model", help="CLIP folder or hub id for the CLIP score (omit to skip it)")
    ap.add_argument("--steps", type=at_least(1), default=50, help="denoising steps")
    ap.add_argument("--sampler", default="ddim", choices=SAMPLERS)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--weights", choices=["ema", "raw"], help="EMA (the default) or raw weights")
    ap.add_argument("--resolution", type=at_least(1),
                    help="generation size, a multiple of what the model draws (default: the checkpoint's "
                         "data.resolution)")
    add_size_args(ap)  # --width / --height (a non-square canvas) and size conditioning
    ap.add_argument("--batch-size", type=at_least(1), default=16, help="images per forward pass")
    ap.add_argument("--dtype", default="auto", choices=["auto", "fp32", "bf16", "fp16"],
                    help="the U-Net's and encoders' precision; auto: the training precision on a GPU, fp32 on the CPU")
    ap.add_argument("--wandb-mode", choices=["online", "offline", "disabled"],
                    help="default: the checkpoint's wandb.mode")
    ap.add_argument("--out", default="eval_out", help="images, eval.json and the plot go here")
    return ap.parse_args(argv)


def evaluate(a: argparse.Namespace) -> None:
    try:
        p = plan(a, dist.world_info_from_env()[1])  # every input check, before the process group
    except (ValueError, OSError) as e:  # plan only reads and parses what the user named
        raise e if isinstance(e, InputError) else InputError(str(e)) from None
    info = dist.init_distributed(timeout_min=60, engine="torch")
    report = run(p, info.rank, info.world_size, info.device)
    if report is not None and info.is_main:
        out = Path(a.out)
        plot = plot_sweep(report["results"], out / "fid_vs_clip.png",
                          f"{Path(report['checkpoint']).name}: {a.num_images} images, {a.features}")
        print(f"ldmscale-eval: wrote {write_json(out, report)} and {plot}", flush=True)
        log_wandb(report, plot, p.wandb_project, p.wandb_mode, out)
    dist.cleanup()


def cli(argv: list[str] | None = None) -> None:
    run_cli("ldmscale-eval", lambda: evaluate(parse_args(argv)))


if __name__ == "__main__":
    cli()
