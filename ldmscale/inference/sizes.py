"""The canvas a command draws on (`--width`, `--height`) and SDXL's size conditioning (`--original-size`, `--crop`,
`--target-size`): the options ldmscale-sample and ldmscale-eval share, checked against what the model can draw
before any weights load."""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass
from pathlib import Path

from ldmscale.checkpoint.resume import find_tag_dir
from ldmscale.config import config_from_yaml_text
from ldmscale.config.checks import pixel_multiple
from ldmscale.data.buckets import SizeCond
from ldmscale.runtime.errors import InputError


class CanvasError(InputError, ValueError):
    """A canvas the model cannot draw, or size conditioning it was not trained with."""


@dataclass(frozen=True)
class Drawable:
    """What a model can draw: canvas sides are multiples of `multiple` px (`why` says which factors), square
    `side` by default (its training resolution); `size_conditioned` when it takes SDXL's size conditioning."""

    multiple: int
    why: str
    side: int
    size_conditioned: bool


def _factor(config: dict) -> int:
    return 2 ** (len(config["block_out_channels"]) - 1)


def drawable(path: str | Path) -> Drawable:
    """From a checkpoint's config.yaml, or an exported diffusers folder's unet/ and vae/ configs: no weights read."""
    path = Path(path)
    if (path / "model_index.json").exists():
        unet = json.loads((path / "unet" / "config.json").read_text())
        vae_f, unet_f = _factor(json.loads((path / "vae" / "config.json").read_text())), _factor(unet)
        sample = unet["sample_size"]
        side = (sample if isinstance(sample, int) else sample[0]) * vae_f
        return Drawable(vae_f * unet_f, f"VAE factor {vae_f} x U-Net downsampling {unet_f}", side,
                        unet.get("addition_embed_type") == "text_time")
    cfg = config_from_yaml_text((find_tag_dir(path) / "config.yaml").read_text())
    found = pixel_multiple(cfg)
    if found is None:  # the model folders moved: the weights will tell, any multiple of 8 passes here
        found = (8, "VAE factor 8 assumed: the model folders are not on disk")
    return Drawable(found[0], found[1], cfg.data.resolution, cfg.model.size_conditioning)


def add_size_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--width", type=int, help="canvas width in pixels (default: the model's training resolution)")
    p.add_argument("--height", type=int, help="canvas height in pixels (default: the model's training resolution)")
    add_size_cond_args(p)


def add_size_cond_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--original-size", type=int, nargs=2, metavar=("HEIGHT", "WIDTH"),
                   help="size conditioning (model.size_conditioning): the original image size to ask for "
                        "(default: the canvas)")
    p.add_argument("--crop", type=int, nargs=2, metavar=("TOP", "LEFT"),
                   help="size conditioning: the crop's top-left corner to ask for (default: 0 0, uncropped)")
    p.add_argument("--target-size", type=int, nargs=2, metavar=("HEIGHT", "WIDTH"),
                   help="size conditioning: the target size to ask for (default: the canvas)")


def canvas_from_args(a: argparse.Namespace, model: Drawable, source: str) -> tuple[int, int, SizeCond | None]:
    """(height, width, size conditioning or None) from the options; CanvasError names the option and the fix."""
    sides = {}
    for name in ("width", "height"):
        value = getattr(a, name)
        value = model.side if value is None else value
        if value <= 0 or value % model.multiple:
            near = max(model.multiple, round(value / model.multiple) * model.multiple)
            raise CanvasError(f"--{name} {value}: {source} draws sides that are multiples of {model.multiple} px "
                              f"({model.why}); try --{name} {near}")
        sides[name] = value
    height, width = sides["height"], sides["width"]
    return height, width, size_cond_from_args(a, model, source, height, width)


def size_cond_from_args(a: argparse.Namespace, model: Drawable, source: str, height: int, width: int
                        ) -> SizeCond | None:
    """The size conditioning the options ask for (SDXL's defaults: original = target = the canvas, crop 0,0);
    None for a model without it, which must then be given none of the options."""
    given = {k: getattr(a, k) for k in ("original_size", "crop", "target_size") if getattr(a, k) is not None}
    if given and not model.size_conditioned:
        names = ", ".join(f"--{k.replace('_', '-')}" for k in given)
        raise CanvasError(f"{names}: {source} was trained without model.size_conditioning; drop {names}")
    for k, v in given.items():
        least = 0 if k == "crop" else 1
        if min(v) < least:
            raise CanvasError(f"--{k.replace('_', '-')} {v[0]} {v[1]}: give pixel counts >= {least}")
    if not model.size_conditioned:
        return None
    default = SizeCond.default(height, width)
    return SizeCond(original=tuple(given.get("original_size", default.original)),
                    crop=tuple(given.get("crop", default.crop)),
                    target=tuple(given.get("target_size", default.target)))
