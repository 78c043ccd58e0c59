"""Drawing images with classifier-free guidance (text, and dual text + style guidance for style checkpoints).

Each image's starting noise is a function of (seed, image index), so an image does not change with the batch size,
the number of ranks, or how many other images are drawn.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from diffusers import UNet2DConditionModel
from PIL import Image
from tqdm import tqdm

from ldmscale.data import decode_image, to_tensor
from ldmscale.data.buckets import SizeCond
from ldmscale.inference.samplers import make_scheduler
from ldmscale.models import noise
from ldmscale.models.encoders import FrozenEncoders
from ldmscale.models.networks import vae_downsample_factor
from ldmscale.models.size_conditioning import added_cond_kwargs, has_size_conditioning, size_cond_tensor
from ldmscale.runtime.errors import InputError


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
    height: int | None = None,
    width: int | None = None,
    size_cond: SizeCond | None = None,
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
    all-zero tokens as in training. An empty prompt gives style-only guidance, no tokens text-only.

    The canvas is `height` x `width` pixels (each defaults to `resolution`, else the U-Net's sample size; the
    caller checks them, inference/sizes.py). A size-conditioned U-Net gets `size_cond` (default SDXL's: original =
    target = the canvas, crop 0,0) in every guidance branch, as in training, where it is never dropped."""
    if style_tokens is not None and len(style_tokens) != len(prompts):
        raise ValueError(f"style_tokens has {len(style_tokens)} rows for {len(prompts)} prompts")
    if indices is not None and len(indices) != len(prompts):
        raise ValueError(f"{len(indices)} image indices for {len(prompts)} prompts")
    device = next(unet.parameters()).device
    dtype = next(unet.parameters()).dtype
    f = vae_downsample_factor(encoders.vae.config)
    square = resolution or int(unet.config.sample_size) * f
    height, width = height or square, width or square
    shape = (int(unet.config.in_channels), height // f, width // f)
    conditioned = has_size_conditioning(unet)
    micro = size_cond or SizeCond.default(height, width)
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
        rows = n * (3 if style_tokens is not None else 2 if guidance_scale != 1 else 1)
        added = {}
        if conditioned:  # every guidance branch gets the same size conditioning, as in training
            added["added_cond_kwargs"] = added_cond_kwargs(size_cond_tensor([micro] * rows, device))
        if style_tokens is not None:
            s = style_tokens[start : start + n].to(device, dtype)
            latents = _sample_dual(unet, sched, latents, context if guidance_scale != 1 else torch.cat([cond, cond]),
                                   s, guidance_scale, style_scale, dtype, bar, added)
            out.append((encoders.decode_latents(latents).cpu() + 1) / 2)
            continue
        for t in sched.timesteps:
            x = torch.cat([latents] * 2) if guidance_scale != 1 else latents
            x = sched.scale_model_input(x, t)
            pred = unet(x.to(dtype), t, encoder_hidden_states=context, **added).sample.float()
            if guidance_scale != 1:
                uncond, c = pred.chunk(2)
                pred = uncond + guidance_scale * (c - uncond)
            latents = sched.step(pred, t, latents).prev_sample
            bar.update(n)
        out.append((encoders.decode_latents(latents).cpu() + 1) / 2)
    bar.close()
    return torch.cat(out)


def _sample_dual(unet: UNet2DConditionModel, sched: object, latents: torch.Tensor, context: torch.Tensor,
                 style: torch.Tensor, g_text: float, g_style: float, dtype: torch.dtype, bar: tqdm,
                 added: dict[str, Any]) -> torch.Tensor:
    """The denoising loop with three branches per step: (no text, no style), (text, no style), (text, style).
    `context` is [uncond; cond] (2n rows)."""
    n = len(latents)
    uncond, cond = context.chunk(2)
    ctx = torch.cat([uncond, cond, cond])
    tokens = torch.cat([torch.zeros_like(style), torch.zeros_like(style), style])
    for t in sched.timesteps:  # type: ignore[attr-defined]
        x = sched.scale_model_input(torch.cat([latents] * 3), t)  # type: ignore[attr-defined]
        pred = unet(x.to(dtype), t, encoder_hidden_states=ctx,
                    cross_attention_kwargs={"style_tokens": tokens}, **added).sample.float()
        e00, et0, ets = pred.chunk(3)
        eps = e00 + g_text * (et0 - e00) + g_style * (ets - et0)
        latents = sched.step(eps, t, latents).prev_sample  # type: ignore[attr-defined]
        bar.update(n)
    return latents


def check_style_image(path: str | Path) -> None:
    """A style reference must be an image file PIL can read (checked before any model loads)."""
    p = Path(path)
    if not p.is_file():
        raise InputError(f"--style-image {p}: no such file; give a reference image (PNG, JPEG, WebP)")
    try:
        with Image.open(p) as img:
            img.verify()
    except Exception as e:  # PIL raises UnidentifiedImageError, OSError, SyntaxError... for what it cannot read
        raise InputError(f"--style-image {p}: not an image PIL can read ({type(e).__name__}); give a PNG, JPEG or "
                         f"WebP file") from None


def load_style_image(path: str | Path, resolution: int) -> torch.Tensor:
    """A reference image as the loader would decode it -> [1,3,R,R] in [-1, 1]."""
    return to_tensor([decode_image(Path(path).read_bytes(), resolution, center_crop=True)])


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """float [N, 3, H, W] in [0, 1] -> uint8 [N, H, W, 3]."""
    return (images.clamp(0, 1).permute(0, 2, 3, 1).numpy() * 255).round().astype(np.uint8)


def to_pil(images: torch.Tensor) -> list[Image.Image]:
    return [Image.fromarray(a) for a in to_uint8(images)]


