"""The style demo's data: scikit-learn's handwritten digits rendered in several ink-on-background colour palettes.

Every digit appears in every palette, so style (the palette) and content (the digit) vary independently; the json
of each sample names its palette under `style` (plus `ink`, `bg`, `label`), the caption stays "a handwritten digit
N": the text never tells the palette, only a style reference can. tools/make_style_digit_shards.py is its command
line; the style benchmarks render and classify with the same palettes."""

from __future__ import annotations

import random

import numpy as np
from PIL import Image

from ldmscale.data.shard_writer import ShardSample
from ldmscale.demo.digits import IMAGE_SIZE

# (name, ink RGB, background RGB): far apart in both colours so the nearest palette is unambiguous
PALETTES: list[tuple[str, tuple[int, int, int], tuple[int, int, int]]] = [
    ("black_on_white", (20, 20, 20), (245, 245, 245)),
    ("red_on_yellow", (200, 30, 30), (250, 230, 120)),
    ("white_on_blue", (240, 240, 240), (30, 60, 160)),
    ("green_on_black", (40, 200, 60), (15, 15, 15)),
    ("purple_on_mint", (120, 40, 160), (180, 240, 200)),
    ("orange_on_teal", (250, 140, 20), (20, 110, 120)),
]


def render_styled(pixels: np.ndarray, ink: tuple[int, ...] | np.ndarray, bg: tuple[int, ...] | np.ndarray,
                  size: int = IMAGE_SIZE) -> Image.Image:
    """8x8 ink values 0..16 -> ink colour blended over the background, bicubic-upscaled like render_digit."""
    gray = Image.fromarray(np.clip(pixels.reshape(8, 8) * (255.0 / 16.0), 0, 255).astype(np.uint8), mode="L")
    t = np.asarray(gray.resize((size, size), Image.Resampling.BICUBIC), dtype=np.float64)[..., None] / 255.0
    rgb = np.asarray(bg, dtype=np.float64) * (1 - t) + np.asarray(ink, dtype=np.float64) * t
    return Image.fromarray(np.clip(rgb, 0, 255).round().astype(np.uint8), mode="RGB")


def styled_samples(images: np.ndarray, labels: np.ndarray, indices: np.ndarray, seed: int) -> list[ShardSample]:
    """Every digit of `indices` in every palette, shuffled (seeded) so shards mix palettes and digits."""
    out = []
    for i in indices:
        for name, ink, bg in PALETTES:
            out.append(ShardSample(
                image=render_styled(images[i], ink, bg),
                caption=f"a handwritten digit {int(labels[i])}",
                url=f"sklearn://load_digits/{int(i)}#{name}",
                extra={"label": int(labels[i]), "style": name, "ink": list(ink), "bg": list(bg)},
            ))
    random.Random(seed).shuffle(out)
    return out
