"""Real demo data: scikit-learn's 1797 handwritten 8x8 digits as LAION-layout shards.

Writes OUT/train/ and OUT/heldout/ from one seeded split; the held-out digits are what the digit-accuracy
benchmark trains its classifier on, so the diffusion model never sees them.

    python tools/make_digit_shards.py --out DIR [--seed 0] [--samples-per-shard 400] [--aspects]

--aspects draws the digits on wide (2:1), square and tall (1:2) canvases in turn: data for aspect buckets.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ldmscale.demo.digits import write_digit_shards


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", required=True, type=Path)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--samples-per-shard", type=int, default=400)
    parser.add_argument("--heldout-fraction", type=float, default=0.15)
    parser.add_argument("--aspects", action="store_true", help="wide, square and tall canvases in turn")
    args = parser.parse_args(argv)
    written = write_digit_shards(args.out, args.seed, args.samples_per_shard, args.heldout_fraction, args.aspects)
    for split, tars in written.items():
        print(f"{split}: {len(tars)} shards in {args.out / split}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
