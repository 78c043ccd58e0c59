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
import random
import sys
from pathlib import Path

from sklearn.datasets import load_digits

from ldmscale.data.shard_writer import write_laion_shards
from ldmscale.demo.colour_pairs import colour_samples
from ldmscale.demo.digits import split_indices


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
