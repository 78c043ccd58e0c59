"""Self-supervised style references: what the style encoder sees for each training image.

`augment`: another view of the same image that keeps its style (colours, stroke texture) and breaks its
content: a random crop resized back, its tiles permuted on a g x g grid, random flips. The draw is a pure
function of (seed, sample key), so a resumed run rebuilds the very same reference.

`metadata`: another image whose json names the same style (e.g. {"style": "red_on_yellow"}). Pairing runs
on the undecoded per-worker stream BEFORE the resume skip: each sample takes a partner among the last
`window` samples of its style seen in that stream, carrying the partner's raw bytes along. A replayed
stream therefore rebuilds every pair exactly, although the skipped samples are never decoded.
"""

from __future__ import annotations

import hashlib
import json
import random
from collections import Counter, deque
from collections.abc import Iterator
from typing import Any

import numpy as np
from PIL import Image

REF_BYTES = "__style_ref__"  # the partner's encoded image, set by pair_by_style
REF_KEY = "__style_ref_key__"


def key_rng(seed: int, key: str) -> random.Random:
    """A generator per (seed, key): Python's hash() of a str is salted per process, so hash bytes instead."""
    digest = hashlib.blake2b(f"{seed}/{key}".encode(), digest_size=8).digest()
    return random.Random(int.from_bytes(digest, "little"))


def augment_view(image: np.ndarray, seed: int, key: str, crop_scale: tuple[float, float], grid: int) -> np.ndarray:
    """uint8 HWC -> uint8 HWC of the same size: crop, resize back, permute tiles, flip."""
    rng = key_rng(seed, key)
    h, w = image.shape[:2]
    area = rng.uniform(*crop_scale)
    ch, cw = max(1, round(h * area**0.5)), max(1, round(w * area**0.5))
    top, left = rng.randint(0, h - ch), rng.randint(0, w - cw)
    view = Image.fromarray(image[top : top + ch, left : left + cw]).resize((w, h), Image.Resampling.BICUBIC)
    out = np.asarray(view).copy()
    if grid > 1 and h % grid == 0 and w % grid == 0:
        th, tw = h // grid, w // grid
        tiles = [out[i * th : (i + 1) * th, j * tw : (j + 1) * tw] for i in range(grid) for j in range(grid)]
        rng.shuffle(tiles)
        out = np.concatenate([np.concatenate(tiles[r * grid : (r + 1) * grid], axis=1) for r in range(grid)], axis=0)
    if rng.random() < 0.5:
        out = out[:, ::-1]
    if rng.random() < 0.5:
        out = out[::-1]
    return np.ascontiguousarray(out)


def style_of(sample: dict[str, Any], meta_key: str) -> str | None:
    raw = sample.get("json")
    if raw is None:
        return None
    try:
        value = json.loads(raw).get(meta_key)
    except (ValueError, UnicodeDecodeError, AttributeError):
        return None
    return None if value is None else str(value)


def pair_by_style(stream: Iterator[dict[str, Any]], meta_key: str, window: int, rng: random.Random,
                  image_ext: tuple[str, ...], counts: Counter[str]) -> Iterator[dict[str, Any]]:
    """Attach to every sample the raw image of an earlier sample with the same style (a pure function of
    the stream and rng). The first sample of a style, or one without the key, gets no partner and is
    counted (`style_self_ref`): the loader then falls back to an augmented view of the image itself."""
    recent: dict[str, deque[tuple[str, bytes]]] = {}
    for sample in stream:
        style = style_of(sample, meta_key)
        ext = next((e for e in image_ext if e in sample), None)
        pool = recent.get(style) if style is not None else None
        if pool:
            key, data = pool[rng.randrange(len(pool))]
            sample = {**sample, REF_BYTES: data, REF_KEY: key}
        else:
            counts["style_self_ref"] += 1
        if style is not None and ext is not None:
            recent.setdefault(style, deque(maxlen=window)).append((sample["__key__"], sample[ext]))
        yield sample
