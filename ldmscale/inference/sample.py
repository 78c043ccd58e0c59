"""`ldmscale-sample`: images from a checkpoint or an exported diffusers folder (PNGs, samples.json, a labelled
grid)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from ldmscale.checkpoint.preflight import CheckpointInfo, check_checkpoint
from ldmscale.config import SAMPLERS
from ldmscale.inference.generate import check_style_image, generate, load_style_image, to_pil
from ldmscale.inference.images import write_samples
from ldmscale.inference.prompts import read_prompts
from ldmscale.inference.sizes import add_size_args, canvas_from_args, drawable
from ldmscale.runtime.cli import ArgumentParser, at_least, finite_float, output_dir_problem, run_cli
from ldmscale.runtime.errors import InputError
from ldmscale.style.attention import parse_block_scales, set_style_scales


def gather_prompts(args: argparse.Namespace) -> list[str]:
    prompts = list(args.prompt or [])
    if args.prompts_file:
        prompts += read_prompts(args.prompts_file)  # an empty or unreadable file is a PromptError naming it
    if not prompts:
        raise InputError("give --prompt TEXT (repeatable) or --prompts-file FILE")
    return prompts


def check_device(spec: str | None) -> torch.device:
    """--device as torch names it, and present on this machine."""
    if spec is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(spec)
    except RuntimeError:
        raise InputError(f"--device {spec!r} is not a device name; give cpu, cuda or cuda:N") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise InputError(f"--device {spec}: no CUDA GPU is visible on this machine; pass --device cpu, or run on "
                             f"a GPU node (CUDA_VISIBLE_DEVICES?)")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise InputError(f"--device {spec}: this machine has {torch.cuda.device_count()} GPU(s) (cuda:0.."
                             f"cuda:{torch.cuda.device_count() - 1})")
    elif device.type != "cpu":
        raise InputError(f"--device {spec}: ldmscale-sample runs on cpu or cuda[:N]")
    return device


def block_scales_arg(text: str) -> dict[str, float]:
    try:
        return parse_block_scales(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = ArgumentParser(prog="ldmscale-sample", description="Images from a checkpoint or diffusers folder")
    p.add_argument("checkpoint", help="run dir, checkpoints/ folder, step_* folder, or exported diffusers folder")
    p.add_argument("--prompt", action="append", help="a prompt; repeat for several")
    p.add_argument("--prompts-file", help="a text file, one prompt per line (.json/.jsonl/.parquet: a caption column)")
    p.add_argument("--num-images", type=at_least(1), default=4, help="images per prompt")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--steps", type=at_least(1), default=50, help="denoising steps")
    p.add_argument("--guidance-scale", type=finite_float, default=7.5, help="classifier-free guidance (1 = none)")
    p.add_argument("--style-image", action="append",
                   help="style reference image (style checkpoints); repeat for several: every prompt x every style")
    p.add_argument("--style-scale", type=finite_float, default=None,
                   help="style guidance scale (default: the checkpoint's style.guidance_scale)")
    p.add_argument("--style-scale-blocks", type=block_scales_arg, default=None, metavar="down=S,mid=S,up=S",
                   help="weights of the style attention per block group (default 1 each), e.g. down=0,mid=1,up=1 to "
                        "keep the reference's layout out (diffusers: set_ip_adapter_scale per block)")
    add_size_args(p)
    p.add_argument("--sampler", default="ddim", choices=SAMPLERS)
    p.add_argument("--weights", choices=["ema", "raw"], help="EMA (the default) or raw weights")
    p.add_argument("--batch-size", type=at_least(1), default=16, help="images per forward pass")
    p.add_argument("--device", help="cpu, cuda or cuda:N (default: cuda when a GPU is visible)")
    p.add_argument("--dtype", default="auto", choices=["auto", "fp32", "bf16", "fp16"],
                   help="the U-Net's and encoders' precision; auto: the training precision on a GPU, fp32 on the CPU")
    p.add_argument("--out", default="samples", help="folder for the PNGs, samples.json and grid.png")
    return p.parse_args(argv)


def check_inputs(a: argparse.Namespace) -> tuple[list[str], CheckpointInfo, torch.device]:
    """Every input, before the model loads: a bad one is one line and exit code 2."""
    prompts = gather_prompts(a)
    for f in a.style_image or []:
        check_style_image(f)
    if a.style_scale is not None and not a.style_image:
        raise InputError("--style-scale weighs a style reference: give --style-image FILE too, or drop --style-scale")
    if a.style_scale_blocks is not None and not a.style_image:
        raise InputError("--style-scale-blocks weighs a style reference per block: give --style-image FILE too, or "
                         "drop --style-scale-blocks")
    device = check_device(a.device)
    problem = output_dir_problem(a.out)
    if problem:
        raise InputError(f"--out {a.out}: {problem}; give a folder for the images")
    info = check_checkpoint(a.checkpoint, a.weights)
    if a.style_image and not info.style:
        raise InputError(f"--style-image: {a.checkpoint} is not a style-conditioned checkpoint (style.enabled); "
                         f"drop --style-image or give a style step-2 run")
    return prompts, info, device


def sample(a: argparse.Namespace) -> None:
    from ldmscale.checkpoint.loading import inference_dtype, load_trained  # not at the top: --help stays fast

    prompts, info, device = check_inputs(a)
    height, width, size_cond = canvas_from_args(a, drawable(info.tag_dir or info.path), a.checkpoint)
    source = info.tag_dir or info.path
    m = load_trained(source, info.weights, device, inference_dtype(a.dtype, source, device))
    tokens, labels, style_scale = None, [q for q in prompts for _ in range(a.num_images)], 1.0
    if a.style_image:
        assert m.cfg is not None and m.style is not None
        style_scale = a.style_scale if a.style_scale is not None else m.cfg.style.guidance_scale
        set_style_scales(m.unet, a.style_scale_blocks)
        refs = torch.cat([load_style_image(f, m.cfg.data.resolution) for f in a.style_image])
        per_style = m.style.tokens(refs)
        pairs = [(q, i) for q in prompts for i in range(len(a.style_image)) for _ in range(a.num_images)]
        tokens = torch.stack([per_style[i] for _, i in pairs])
        labels = [f"{q} | style {Path(a.style_image[i]).name}" for q, i in pairs]
    all_prompts = [lb.split(" | style ")[0] for lb in labels] if tokens is not None else labels
    images = generate(
        m.unet, m.encoders, m.scheduler_config, all_prompts, seed=a.seed, steps=a.steps,
        guidance_scale=a.guidance_scale, sampler=a.sampler, height=height, width=width, size_cond=size_cond,
        batch_size=a.batch_size,
        progress=sys.stderr.isatty() or True, style_tokens=tokens, style_scale=style_scale,
    )
    meta = {"seed": a.seed, "steps": a.steps, "guidance_scale": a.guidance_scale, "sampler": a.sampler,
            "width": width, "height": height, "weights": info.weights, "step": info.step}
    if size_cond is not None:
        meta["size_cond"] = size_cond.as_list()  # original h, w, crop top, left, target h, w
    if tokens is not None:
        meta["style_scale"] = style_scale
        if a.style_scale_blocks:
            meta["style_scale_blocks"] = a.style_scale_blocks
    grid = write_samples(to_pil(images), labels, Path(a.out), a.num_images, meta)
    print(f"wrote {len(all_prompts)} images and {grid}")


def cli(argv: list[str] | None = None) -> None:
    run_cli("ldmscale-sample", lambda: sample(parse_args(argv)))


if __name__ == "__main__":
    cli()
