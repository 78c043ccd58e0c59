"""Sampling with classifier-free guidance, and the `ldmscale-sample` CLI.

Each image's starting noise is a function of (seed, image index), so an image does not change with
the batch size or with how many other images are drawn.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import warnings
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from diffusers import UNet2DConditionModel
from PIL import Image, ImageDraw
from tqdm import tqdm

from ldmscale import noise
from ldmscale.config import SAMPLERS
from ldmscale.encoders import FrozenEncoders
from ldmscale.models import vae_downsample_factor
from ldmscale.samplers import make_scheduler


def warn_long_prompts(tokenizer: object, prompts: list[str]) -> None:
    limit = tokenizer.model_max_length  # type: ignore[attr-defined]
    for p in prompts:
        n = len(tokenizer(p).input_ids)  # type: ignore[operator]
        if n > limit:
            warnings.warn(f"prompt truncated to {limit} tokens (it has {n}): {p[:60]!r}", stacklevel=2)


@torch.no_grad()
def generate(
    unet: UNet2DConditionModel,
    encoders: FrozenEncoders,
    scheduler_config: dict,
    prompts: list[str],
    *,
    seed: int = 0,
    steps: int = 50,
    guidance_scale: float = 7.5,
    sampler: str = "ddim",
    resolution: int | None = None,
    batch_size: int = 16,
    first_index: int = 0,
    indices: Sequence[int] | None = None,
    progress: bool = False,
    style_tokens: torch.Tensor | None = None,
    style_scale: float = 1.0,
) -> torch.Tensor:
    """One image per prompt -> float [N, 3, H, W] in [0, 1]. Prompt k starts from the noise of image index
    `indices[k]` (default `first_index + k`), so a rank drawing a strided share draws the images one process would.

    With `style_tokens` [N,K,D] (one row per prompt; a U-Net with the style path), dual classifier-free
    guidance: eps = e(0,0) + g_text (e(t,0) - e(0,0)) + g_style (e(t,s) - e(t,0)), where a dropped style is
    all-zero tokens as in training. An empty prompt gives style-only guidance, no tokens text-only."""
    if style_tokens is not None and len(style_tokens) != len(prompts):
        raise ValueError(f"style_tokens has {len(style_tokens)} rows for {len(prompts)} prompts")
    if indices is not None and len(indices) != len(prompts):
        raise ValueError(f"{len(indices)} image indices for {len(prompts)} prompts")
    device = next(unet.parameters()).device
    dtype = next(unet.parameters()).dtype
    f = vae_downsample_factor(encoders.vae.config)
    size = (resolution // f) if resolution else int(unet.config.sample_size)
    shape = (int(unet.config.in_channels), size, size)
    warn_long_prompts(encoders.tokenizer, prompts)
    out = []
    chunks = range(0, len(prompts), batch_size)
    bar = tqdm(total=len(prompts) * steps, disable=not progress, desc="sampling", unit="step")
    for start in chunks:
        batch = prompts[start : start + batch_size]
        n = len(batch)
        sched = make_scheduler(sampler, scheduler_config)
        sched.set_timesteps(steps, device=device)
        ids = indices[start : start + n] if indices is not None else range(first_index + start, first_index + start + n)
        latents = noise.randn(seed, ids, shape, noise.Stream.SAMPLING, device) * sched.init_noise_sigma
        cond = encoders.embed_prompts(batch).to(device, dtype)
        context = torch.cat([encoders.embed_prompts([""] * n).to(device, dtype), cond]) if guidance_scale != 1 else cond
        if style_tokens is not None:
            s = style_tokens[start : start + n].to(device, dtype)
            latents = _sample_dual(unet, sched, latents, context if guidance_scale != 1 else torch.cat([cond, cond]),
                                   s, guidance_scale, style_scale, dtype, bar)
            out.append((encoders.decode_latents(latents).cpu() + 1) / 2)
            continue
        for t in sched.timesteps:
            x = torch.cat([latents] * 2) if guidance_scale != 1 else latents
            x = sched.scale_model_input(x, t)
            pred = unet(x.to(dtype), t, encoder_hidden_states=context).sample.float()
            if guidance_scale != 1:
                uncond, c = pred.chunk(2)
                pred = uncond + guidance_scale * (c - uncond)
            latents = sched.step(pred, t, latents).prev_sample
            bar.update(n)
        out.append((encoders.decode_latents(latents).cpu() + 1) / 2)
    bar.close()
    return torch.cat(out)


def _sample_dual(unet: UNet2DConditionModel, sched: object, latents: torch.Tensor, context: torch.Tensor,
                 style: torch.Tensor, g_text: float, g_style: float, dtype: torch.dtype, bar: tqdm) -> torch.Tensor:
    """The denoising loop with three branches per step: (no text, no style), (text, no style), (text, style).
    `context` is [uncond; cond] (2n rows)."""
    n = len(latents)
    uncond, cond = context.chunk(2)
    ctx = torch.cat([uncond, cond, cond])
    tokens = torch.cat([torch.zeros_like(style), torch.zeros_like(style), style])
    for t in sched.timesteps:  # type: ignore[attr-defined]
        x = sched.scale_model_input(torch.cat([latents] * 3), t)  # type: ignore[attr-defined]
        pred = unet(x.to(dtype), t, encoder_hidden_states=ctx,
                    cross_attention_kwargs={"style_tokens": tokens}).sample.float()
        e00, et0, ets = pred.chunk(3)
        eps = e00 + g_text * (et0 - e00) + g_style * (ets - et0)
        latents = sched.step(eps, t, latents).prev_sample  # type: ignore[attr-defined]
        bar.update(n)
    return latents


def load_style_image(path: str | Path, resolution: int) -> torch.Tensor:
    """A reference image as the loader would decode it -> [1,3,R,R] in [-1, 1]."""
    from ldmscale.data import decode_image, to_tensor

    return to_tensor([decode_image(Path(path).read_bytes(), resolution, center_crop=True)])


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """float [N, 3, H, W] in [0, 1] -> uint8 [N, H, W, 3]."""
    return (images.clamp(0, 1).permute(0, 2, 3, 1).numpy() * 255).round().astype(np.uint8)


def to_pil(images: torch.Tensor) -> list[Image.Image]:
    return [Image.fromarray(a) for a in to_uint8(images)]


def labelled_grid(images: list[Image.Image], labels: list[str], cols: int, min_cell: int = 96) -> Image.Image:
    """Rows of `cols` images; each row's label (the prompt) on its left. Small images are upscaled."""
    w, h = images[0].size
    scale = max(1, -(-min_cell // max(w, h)))
    cw, ch = w * scale, h * scale
    rows = -(-len(images) // cols)
    label_w = max(120, 7 * max(len(lb) for lb in labels) + 10)
    grid = Image.new("RGB", (label_w + cols * (cw + 2), rows * (ch + 2)), "white")
    draw = ImageDraw.Draw(grid)
    for i, img in enumerate(images):
        r, c = divmod(i, cols)
        grid.paste(img.resize((cw, ch), Image.Resampling.NEAREST), (label_w + c * (cw + 2), r * (ch + 2)))
        if c == 0:
            draw.text((4, r * (ch + 2) + ch // 2 - 6), labels[i], fill="black")
    return grid


def slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")[:48]


def write_samples(images: list[Image.Image], prompts: list[str], out: Path, cols: int, meta: dict) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    records = []
    for i, (img, p) in enumerate(zip(images, prompts)):
        name = f"{i:04d}_{slug(p)}.png"
        img.save(out / name)
        records.append({"file": name, "prompt": p, "index": i, **meta})
    (out / "samples.json").write_text(json.dumps(records, indent=1))
    grid = labelled_grid(images, prompts, cols)
    grid.save(out / "grid.png")
    return out / "grid.png"


def read_prompts(args: argparse.Namespace) -> list[str]:
    prompts = list(args.prompt or [])
    if args.prompts_file:
        prompts += [ln.strip() for ln in Path(args.prompts_file).read_text().splitlines() if ln.strip()]
    if not prompts:
        raise SystemExit("ldmscale-sample: give --prompt TEXT (repeatable) or --prompts-file FILE")
    return prompts


def cli(argv: list[str] | None = None) -> None:
    from ldmscale.checkpoint import CheckpointError
    from ldmscale.export import load_trained

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
    p.add_argument("--out", default="samples")
    a = p.parse_args(argv)
    prompts = read_prompts(a)
    try:
        m = load_trained(a.checkpoint, a.weights, a.device)
    except (CheckpointError, FileNotFoundError) as e:
        print(f"ldmscale-sample: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    res = m.cfg.data.resolution if m.cfg else None
    tokens, labels, style_scale = None, [q for q in prompts for _ in range(a.num_images)], 1.0
    if a.style_image:
        if m.style is None:
            raise SystemExit(f"ldmscale-sample: {a.checkpoint} is not a style-conditioned checkpoint (style.enabled)")
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


if __name__ == "__main__":
    cli()
