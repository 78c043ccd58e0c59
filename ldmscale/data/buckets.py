"""Aspect-ratio buckets (`data.buckets`): the set of training canvases, which one a sample goes to, and the fixed
(bucket, samples) lists that validation and sample grids use. Pure functions of their arguments.

The set holds canvases of near-equal area around data.resolution^2, each side a multiple of data.buckets.step:
for every width w >= resolution in steps of `step`, the tallest height h (a multiple of `step`) with
w * h <= resolution^2, kept while w / h <= max_aspect, and its transpose. No canvas has more pixels than the
square, so a micro-batch of any bucket fits the memory the square one needs (kohya's and SDXL's rule).

A sample goes to the bucket nearest its aspect ratio in log space (a 2:1 and a 1:2 image are equally far from
the square), from the original size in its json when present (img2dataset's original_width/original_height:
known before decode), else from the decoded image.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True, order=True)
class Bucket:
    """A training canvas in pixels."""

    height: int
    width: int

    @property
    def aspect(self) -> float:
        return self.width / self.height

    @property
    def name(self) -> str:
        return f"{self.width}x{self.height}"


@dataclass(frozen=True)
class SizeCond:
    """SDXL's micro-conditioning of one image, in pixels: its original size, the crop's top-left corner in the
    resized image, and the size it was trained (or is drawn) at. `as_list` is the order SDXL's time ids use and
    the order of a batch's "size_cond" rows: (original h, w, crop top, left, target h, w)."""

    original: tuple[int, int]  # (height, width)
    crop: tuple[int, int]  # (top, left)
    target: tuple[int, int]  # (height, width)

    @classmethod
    def default(cls, height: int, width: int) -> SizeCond:
        """SDXL's default at sampling time: an uncropped image drawn at its original size."""
        return cls((height, width), (0, 0), (height, width))

    def as_list(self) -> list[int]:
        return [*self.original, *self.crop, *self.target]

    @classmethod
    def from_list(cls, values: Sequence[int]) -> SizeCond:
        oh, ow, top, left, th, tw = (int(v) for v in values)
        return cls((oh, ow), (top, left), (th, tw))


def bucket_set(resolution: int, step: int, max_aspect: float) -> tuple[Bucket, ...]:
    """The canvases, tallest first, widest last (see the module docstring)."""
    area = resolution * resolution
    wide: list[Bucket] = []
    width = -(-resolution // step) * step  # the first multiple of step >= resolution
    while True:
        height = (area // width) // step * step
        if height < step or width / height > max_aspect + 1e-9:
            break
        wide.append(Bucket(height=height, width=width))
        width += step
    if not wide:  # resolution not a multiple of step and max_aspect ~1: the square's nearest step
        side = max(step, resolution // step * step)
        wide.append(Bucket(side, side))
    both = set(wide) | {Bucket(height=b.width, width=b.height) for b in wide}
    return tuple(sorted(both, key=lambda b: (b.aspect, b.width)))


def nearest_bucket(buckets: Sequence[Bucket], width: int, height: int) -> Bucket:
    """The bucket whose aspect ratio is nearest width / height in log space; ties go to the squarer one."""
    if width <= 0 or height <= 0:
        raise ValueError(f"image size {width}x{height} is not positive")
    log_aspect = math.log(width / height)
    return min(buckets, key=lambda b: (round(abs(math.log(b.aspect) - log_aspect), 12), abs(math.log(b.aspect))))


def original_size(meta: Mapping[str, Any] | None) -> tuple[int, int] | None:
    """(height, width) of the image before img2dataset resized it, from a LAION json; None when absent."""
    if not meta:
        return None
    try:
        h, w = int(meta["original_height"]), int(meta["original_width"])
    except (KeyError, TypeError, ValueError):
        return None
    return (h, w) if h > 0 and w > 0 else None


def grid_buckets(buckets: Sequence[Bucket]) -> tuple[Bucket, ...]:
    """The canvases in-training sample grids draw on: the tallest, the squarest and the widest (fewer when the
    set is smaller). A function of the set alone, so grids stay comparable across resumes and world sizes."""
    squarest = min(buckets, key=lambda b: (abs(math.log(b.aspect)), b.width))
    picks = [buckets[0], squarest, buckets[-1]]
    return tuple(dict.fromkeys(picks))  # in order, without repeats


def fixed_per_bucket(assigned: Iterable[Bucket], per_bucket: int) -> list[tuple[Bucket, list[int]]]:
    """The validation samples per bucket: the first `per_bucket` positions j of the held-out stream (in its fixed
    shard order) that fall in each bucket, as (bucket, [j, ...]) in bucket order. A function of the stream's
    order and the bucket set alone, so the validation loss is comparable across resumes and world sizes; a
    bucket the held-out set never reaches is absent."""
    chosen: dict[Bucket, list[int]] = {}
    for j, b in enumerate(assigned):
        picks = chosen.setdefault(b, [])
        if len(picks) < per_bucket:
            picks.append(j)
    return sorted(chosen.items(), key=lambda item: (item[0].aspect, item[0].width))
