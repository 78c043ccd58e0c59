"""Real demo data: scikit-learn's 1797 handwritten 8x8 digits as LAION-layout shards.

Writes OUT/train/ and OUT/heldout/ from one seeded split; the held-out digits are what the digit-accuracy
benchmark trains its classifier on, so the diffusion model never sees them.

    python tools/make_digit_shards.py --out DIR [--seed 0] [--samples-per-shard 400]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
from PIL import Image
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from ldmscale.data.shard_writer import ShardSample, write_laion_shards

IMAGE_SIZE = 64


def render_digit(pixels: np.ndarray, size: int = IMAGE_SIZE) -> Image.Image:
    """8x8 ink values 0..16 -> black ink on white RGB, bicubic-upscaled so strokes are smooth."""
    gray = np.clip(255.0 - pixels.reshape(8, 8) * (255.0 / 16.0), 0, 255).astype(np.uint8)
    return Image.fromarray(gray, mode="L").resize((size, size), Image.Resampling.BICUBIC).convert("RGB")


def digit_samples(images: np.ndarray, labels: np.ndarray, indices: np.ndarray) -> list[ShardSample]:
    return [
        ShardSample(
            image=render_digit(images[i]),
            caption=f"a handwritten digit {int(labels[i])}",
            url=f"sklearn://load_digits/{int(i)}",
            extra={"label": int(labels[i])},
        )
        for i in indices
    ]


def write_digit_shards(
    out_dir: str | Path, seed: int = 0, samples_per_shard: int = 400, heldout_fraction: float = 0.15
) -> dict[str, list[Path]]:
    """Split load_digits (stratified, seeded) and write train/ and heldout/ shards; returns tar paths."""
    digits = load_digits()
    indices = np.arange(len(digits.target))
    # Stratified so every digit is in the held-out set in its natural proportion.
    train_idx, heldout_idx = train_test_split(
        indices, test_size=heldout_fraction, random_state=seed, stratify=digits.target
    )
    out = Path(out_dir)
    written = {}
    for split, idx in (("train", train_idx), ("heldout", heldout_idx)):
        samples = digit_samples(digits.images, digits.target, idx)
        written[split] = write_laion_shards(samples, out / split, samples_per_shard=samples_per_shard)
    return written


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", required=True, type=Path)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--samples-per-shard", type=int, default=400)
    parser.add_argument("--heldout-fraction", type=float, default=0.15)
    args = parser.parse_args(argv)
    written = write_digit_shards(args.out, args.seed, args.samples_per_shard, args.heldout_fraction)
    for split, tars in written.items():
        print(f"{split}: {len(tars)} shards in {args.out / split}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
