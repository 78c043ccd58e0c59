"""Style demo data: scikit-learn's handwritten digits rendered in several ink-on-background colour palettes.

Every digit appears in every palette, so style (the palette) and content (the digit) vary independently;
the json of each sample names its palette under `style` (plus `ink`, `bg`, `label`), the caption stays
"a handwritten digit N": the text never tells the palette, only a style reference can. Same seeded
train/held-out split as tools/make_digit_shards.py.

    python tools/make_style_digit_shards.py --out DIR [--seed 0] [--samples-per-shard 400]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from sklearn.datasets import load_digits

from ldmscale.data.shard_writer import write_laion_shards
from ldmscale.demo.digits import split_indices
from ldmscale.demo.styled_digits import PALETTES, styled_samples


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, type=Path)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--samples-per-shard", type=int, default=400)
    parser.add_argument("--heldout-fraction", type=float, default=0.15)
    args = parser.parse_args(argv)
    digits = load_digits()
    train_idx, heldout_idx = split_indices(args.seed, args.heldout_fraction)
    for split, ids in (("train", train_idx), ("heldout", heldout_idx)):
        samples = styled_samples(digits.images, digits.target, ids, args.seed)
        tars = write_laion_shards(samples, args.out / split, samples_per_shard=args.samples_per_shard)
        print(f"{split}: {len(samples)} samples ({len(PALETTES)} palettes) in {len(tars)} shards at {args.out / split}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
