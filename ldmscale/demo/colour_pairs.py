"""Continuous-style demo data: each digit image in its own random (ink, background) colour pair.

Every image is its own style (as at LAION scale). One band of ink hues (UNSEEN_HUES) never appears in training,
for either colour: held-out references from that band measure how a model follows a style it has never seen. One
colour of each pair is dark and the other light (random which is the ink), so the digit stays readable and the
colour benchmark can tell ink from background. tools/make_style_colour_shards.py is its command line."""

from __future__ import annotations

import colorsys
import random

import numpy as np

from ldmscale.data.shard_writer import ShardSample
from ldmscale.demo.styled_digits import render_styled

UNSEEN_HUES = (0.40, 0.50)  # hue in [0, 1): 144-180 degrees (green to cyan), never in training


def in_band(hue: float) -> bool:
    """Whether an ink hue lies in the band kept out of training."""
    return UNSEEN_HUES[0] <= hue < UNSEEN_HUES[1]


def seen_hue(rng: random.Random) -> float:
    """Uniform over the hue circle minus the unseen band."""
    width = 1.0 - (UNSEEN_HUES[1] - UNSEEN_HUES[0])
    h = rng.uniform(0.0, width)
    return h if h < UNSEEN_HUES[0] else h + (UNSEEN_HUES[1] - UNSEEN_HUES[0])


def colour_pair(rng: random.Random, unseen: bool) -> tuple[tuple[int, ...], tuple[int, ...], float]:
    """(ink RGB, background RGB, ink hue): one dark and one light colour; the ink hue from the band if unseen."""
    ink_hue = rng.uniform(*UNSEEN_HUES) if unseen else seen_hue(rng)
    hues = (ink_hue, seen_hue(rng))
    dark_first = rng.random() < 0.5
    out = []
    for k, h in enumerate(hues):
        dark = (k == 0) == dark_first
        v = rng.uniform(0.15, 0.45) if dark else rng.uniform(0.75, 1.0)
        s = rng.uniform(0.4, 1.0)
        out.append(tuple(int(round(255 * c)) for c in colorsys.hsv_to_rgb(h, s, v)))
    return out[0], out[1], ink_hue


def colour_samples(images: np.ndarray, labels: np.ndarray, indices: np.ndarray, per_digit: int, unseen: bool,
                   rng: random.Random) -> list[ShardSample]:
    """`per_digit` images of each digit of `indices`, each in its own colour pair (named in its json `style`)."""
    out = []
    for i in indices:
        for _ in range(per_digit):
            ink, bg, hue = colour_pair(rng, unseen)
            name = "ink{:02x}{:02x}{:02x}_bg{:02x}{:02x}{:02x}".format(*ink, *bg)
            out.append(ShardSample(
                image=render_styled(images[i], ink, bg),
                caption=f"a handwritten digit {int(labels[i])}",
                url=f"sklearn://load_digits/{int(i)}#{name}",
                extra={"label": int(labels[i]), "style": name, "ink": list(ink), "bg": list(bg),
                       "ink_hue": round(hue, 4)},
            ))
    rng.shuffle(out)
    return out
