"""How well a style model follows its reference, measured on the digit demos: the colours of an image (background,
ink, ink intensity), its digit features read through those colours, the nearest demo palette, the colour error to
true colours, a linear probe of style tokens for the colours, and drawing with or without references.
tools/bench/style_follow.py (palettes) and tools/bench/style_colour.py (colour pairs) are the command lines;
add_sampling_args and bench_main are the plumbing they share."""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from ldmscale.demo.digit_features import digit_features
from ldmscale.demo.styled_digits import PALETTES
from ldmscale.style.attention import parse_block_scales


def colours(rgb: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """uint8 HWC -> (background colour, ink colour, ink intensity map in [0, 1]).

    The background is the median border colour, the ink the mean of the 10% of pixels farthest from it; a pixel's
    ink intensity is its distance from the background relative to the ink's."""
    x = rgb.astype(np.float64)
    border = np.concatenate([x[:2].reshape(-1, 3), x[-2:].reshape(-1, 3), x[:, :2].reshape(-1, 3),
                             x[:, -2:].reshape(-1, 3)])
    bg = np.median(border, axis=0)
    dist = np.linalg.norm(x - bg, axis=-1)
    far = dist >= np.quantile(dist, 0.9)
    ink = x[far].mean(axis=0)
    scale = max(float(np.linalg.norm(ink - bg)), 1e-6)
    return bg, ink, np.clip(dist / scale, 0.0, 1.0)


def content_features(rgb: np.ndarray) -> np.ndarray:
    """Coloured digit -> load_digits-style 8x8 features via a black-on-white rendering of its ink."""
    _, _, t = colours(rgb)
    return digit_features(Image.fromarray((255.0 * (1.0 - t)).round().astype(np.uint8), mode="L"))


def nearest_palette(rgb: np.ndarray) -> int:
    """Index into PALETTES of the palette closest to the image's (ink, background) colours."""
    bg, ink, _ = colours(rgb)
    d = [np.sum((ink - np.array(pi)) ** 2) + np.sum((bg - np.array(pb)) ** 2) for _, pi, pb in PALETTES]
    return int(np.argmin(d))


def colour_error(rgb: np.ndarray, ink: np.ndarray, bg: np.ndarray) -> float:
    """Mean of the ink and background colour distances of an image to the given true colours."""
    g_bg, g_ink, _ = colours(rgb)
    return 0.5 * float(np.linalg.norm(g_ink - ink) + np.linalg.norm(g_bg - bg))


def probe_error(tokens: dict[str, np.ndarray], refs: dict[str, list[dict[str, Any]]]) -> dict[str, float]:
    """Colour error of a ridge regression from flattened tokens to (ink, bg) RGB: fit on the first half of the
    seen images, scored on the other half and on all the unseen ones: whether a style encoder's tokens hold the
    colours at all, apart from whether the U-Net follows them."""
    from sklearn.linear_model import Ridge  # the dev extra: only the benchmarks need it

    half = len(refs["seen"]) // 2
    y = {k: np.stack([np.concatenate([r["ink"], r["bg"]]) for r in refs[k]]) for k in ("seen", "unseen")}
    model = Ridge(alpha=1.0).fit(tokens["seen"][:half], y["seen"][:half])
    out = {}
    for k, sl in (("seen", slice(half, None)), ("unseen", slice(None))):
        p = model.predict(tokens[k][sl])
        out[k] = float(np.mean(0.5 * (np.linalg.norm(p[:, :3] - y[k][sl, :3], axis=1)
                                      + np.linalg.norm(p[:, 3:] - y[k][sl, 3:], axis=1))))
    return out


def draw(run: Path, prompts: list[str], refs: list[np.ndarray] | None, args: argparse.Namespace) -> list[np.ndarray]:
    """uint8 HWC images of a trained run for the prompts, each with its style reference if `refs` is given (the
    run's `args.weights`), else text only (the run's EMA); sampling settings from add_sampling_args."""
    # Imported here: the measurements above are used without loading a model.
    from ldmscale.checkpoint import load_trained
    from ldmscale.data import to_tensor
    from ldmscale.inference.generate import generate
    from ldmscale.style.attention import set_style_scales

    m = load_trained(run, args.weights if refs is not None else "ema", args.device)  # the text run: its EMA
    res = m.cfg.data.resolution if m.cfg else None
    set_style_scales(m.unet, args.style_scale_blocks)
    tokens = None
    if refs is not None:
        assert m.style is not None, f"{run} is not a style-conditioned run"
        pix = to_tensor([np.asarray(Image.fromarray(r).resize((res, res), Image.Resampling.BICUBIC)) for r in refs])
        tokens = m.style.tokens(pix)
    images = generate(m.unet, m.encoders, m.scheduler_config, prompts, seed=args.seed, steps=args.steps,
                      guidance_scale=args.guidance_scale, sampler="dpmsolver++", resolution=res, batch_size=60,
                      style_tokens=tokens, style_scale=args.style_scale)
    return list((images.clamp(0, 1).permute(0, 2, 3, 1).numpy() * 255).round().astype(np.uint8))


def add_sampling_args(p: argparse.ArgumentParser) -> None:
    """The sampling settings both style benchmarks share (draw() reads them), and --json."""
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--guidance-scale", type=float, default=4.0)
    p.add_argument("--style-scale", type=float, default=3.0)
    p.add_argument("--style-scale-blocks", type=parse_block_scales, default=None, metavar="down=S,mid=S,up=S",
                   help="style attention weight per block group (ldmscale-sample's flag)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--weights", choices=["ema", "raw"], default="ema", help="the style runs' weights")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--json", type=Path)


def bench_main(p: argparse.ArgumentParser, argv: list[str] | None, run: Callable[[argparse.Namespace], dict[str, Any]],
               report: Callable[[dict[str, Any], argparse.Namespace], None],
               grid: Callable[[dict[str, Any], Path], None]) -> int:
    """Parse, run, print, save the grid (--grid) and the numbers (--json: every key but the *_images)."""
    args = p.parse_args(argv)
    r = run(args)
    report(r, args)
    if args.grid:
        grid(r, args.grid)
    if args.json:
        args.json.write_text(json.dumps({k: v for k, v in r.items() if not k.endswith("_images")}, indent=2))
    return 0
