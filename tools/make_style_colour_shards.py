"""Continuous-style data: scikit-learn's digits, each image in its own random (ink, background) colour pair.

Every image is its own style (as at LAION scale), so the metadata pairing of the palette demo has nothing to
pair: step 2 trains on augmented views (`style.reference: augment`). One band of ink hues (UNSEEN_HUES) never
appears in training, for either colour: held-out references from that band measure how a model follows a
style it has never seen. One colour of each pair is dark and the other light (random which is the ink), so
the digit stays readable and the benchmark can tell ink from background.

    python tools/make_style_colour_shards.py --out DIR [--seed 0] [--colours-per-digit 6]

Writes DIR/train (seen hues), DIR/heldout (held-out digits, seen hues) and DIR/heldout_unseen (held-out digits,
ink hue in the unseen band); json: label, ink, bg (RGB), ink_hue, style (a name unique to the colour pair).
"""

from __future__ import annotations

import argparse
import colorsys
import random
import sys
from pathlib import Path

import numpy as np
from sklearn.datasets import load_digits

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from make_style_digit_shards import render_styled, split_indices  # noqa: E402

from ldmscale.data.shard_writer import ShardSample, write_laion_shards  # noqa: E402

UNSEEN_HUES = (0.40, 0.50)  # hue in [0, 1): 144-180 degrees (green to cyan), never in training


def in_band(hue: float) -> bool:
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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, type=Path)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--colours-per-digit", type=int, default=6, help="training images per digit image")
    parser.add_argument("--heldout-colours", type=int, default=2, help="held-out images per digit image and set")
    parser.add_argument("--samples-per-shard", type=int, default=400)
    parser.add_argument("--heldout-fraction", type=float, default=0.15)
    args = parser.parse_args(argv)
    digits = load_digits()
    train_idx, heldout_idx = split_indices(args.seed, args.heldout_fraction)
    rng = random.Random(args.seed)
    for split, ids, per, unseen in (("train", train_idx, args.colours_per_digit, False),
                                    ("heldout", heldout_idx, args.heldout_colours, False),
                                    ("heldout_unseen", heldout_idx, args.heldout_colours, True)):
        samples = colour_samples(digits.images, digits.target, ids, per, unseen, rng)
        tars = write_laion_shards(samples, args.out / split, samples_per_shard=args.samples_per_shard)
        print(f"{split}: {len(samples)} samples in {len(tars)} shards at {args.out / split}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
