"""`ldmscale-sample`: images from a checkpoint or an exported diffusers folder (PNGs, samples.json, a labelled
grid)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from ldmscale.config import SAMPLERS
from ldmscale.inference.generate import generate, load_style_image, to_pil
from ldmscale.inference.images import write_samples
from ldmscale.inference.prompts import read_prompts
from ldmscale.runtime.cli import run_cli
from ldmscale.runtime.errors import InputError


def gather_prompts(args: argparse.Namespace) -> list[str]:
    prompts = list(args.prompt or [])
    if args.prompts_file:
        prompts += read_prompts(args.prompts_file)
    if not prompts:
        raise InputError("give --prompt TEXT (repeatable) or --prompts-file FILE")
    return prompts


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="ldmscale-sample", description="Images from a checkpoint or diffusers folder")
    p.add_argument("checkpoint", help="run dir, checkpoints/ folder, step_* folder, or exported diffusers folder")
    p.add_argument("--prompt", action="append", help="a prompt; repeat for several")
    p.add_argument("--prompts-file", help="a text file, one prompt per line")
    p.add_argument("--num-images", type=int, default=4, help="images per prompt")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--guidance-scale", type=float, default=7.5)
    p.add_argument("--style-image", action="append",
                   help="style reference image (style checkpoints); repeat for several: every prompt x every style")
    p.add_argument("--style-scale", type=float, default=None,
                   help="style guidance scale (default: the checkpoint's style.guidance_scale)")
    p.add_argument("--sampler", default="ddim", choices=SAMPLERS)
    p.add_argument("--weights", default="ema", choices=["ema", "raw"], help="EMA (default) or raw weights")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default="auto", choices=["auto", "fp32", "bf16", "fp16"],
                   help="auto: the training precision on a GPU, fp32 on the CPU")
    p.add_argument("--out", default="samples")
    return p.parse_args(argv)


def sample(a: argparse.Namespace) -> None:
    from ldmscale.checkpoint.loading import inference_dtype, load_trained  # not at the top: --help stays fast

    prompts = gather_prompts(a)
    m = load_trained(a.checkpoint, a.weights, a.device, inference_dtype(a.dtype, a.checkpoint, a.device))
    res = m.cfg.data.resolution if m.cfg else None
    tokens, labels, style_scale = None, [q for q in prompts for _ in range(a.num_images)], 1.0
    if a.style_image:
        if m.style is None:
            raise InputError(f"--style-image: {a.checkpoint} is not a style-conditioned checkpoint (style.enabled); "
                             f"drop --style-image or give a style step-2 run")
        assert m.cfg is not None
        style_scale = a.style_scale if a.style_scale is not None else m.cfg.style.guidance_scale
        refs = torch.cat([load_style_image(f, m.cfg.data.resolution) for f in a.style_image])
        per_style = m.style.tokens(refs)
        pairs = [(q, i) for q in prompts for i in range(len(a.style_image)) for _ in range(a.num_images)]
        tokens = torch.stack([per_style[i] for _, i in pairs])
        labels = [f"{q} | style {Path(a.style_image[i]).name}" for q, i in pairs]
    all_prompts = [lb.split(" | style ")[0] for lb in labels] if tokens is not None else labels
    images = generate(
        m.unet, m.encoders, m.scheduler_config, all_prompts, seed=a.seed, steps=a.steps,
        guidance_scale=a.guidance_scale, sampler=a.sampler, resolution=res, batch_size=a.batch_size,
        progress=sys.stderr.isatty() or True, style_tokens=tokens, style_scale=style_scale,
    )
    meta = {"seed": a.seed, "steps": a.steps, "guidance_scale": a.guidance_scale, "sampler": a.sampler}
    if tokens is not None:
        meta["style_scale"] = style_scale
    grid = write_samples(to_pil(images), labels, Path(a.out), a.num_images, meta)
    print(f"wrote {len(all_prompts)} images and {grid}")


def cli(argv: list[str] | None = None) -> None:
    run_cli("ldmscale-sample", lambda: sample(parse_args(argv)))


if __name__ == "__main__":
    cli()
