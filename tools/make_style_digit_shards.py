"""Style demo data: scikit-learn's handwritten digits rendered in several ink-on-background colour palettes.

Every digit appears in every palette, so style (the palette) and content (the digit) vary independently;
the json of each sample names its palette under `style` (plus `ink`, `bg`, `label`), the caption stays
"a handwritten digit N": the text never tells the palette, only a style reference can. Same seeded
train/held-out split as tools/make_digit_shards.py.

    python tools/make_style_digit_shards.py --out DIR [--seed 0] [--samples-per-shard 400]
"""

from __future__ import annotations

import argparse
import random
import sys
from pathlib import Path

import numpy as np
from PIL import Image
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from ldmscale.data.shard_writer import ShardSample, write_laion_shards

IMAGE_SIZE = 64
# (name, ink RGB, background RGB): far apart in both colours so the nearest palette is unambiguous
PALETTES: list[tuple[str, tuple[int, int, int], tuple[int, int, int]]] = [
    ("black_on_white", (20, 20, 20), (245, 245, 245)),
    ("red_on_yellow", (200, 30, 30), (250, 230, 120)),
    ("white_on_blue", (240, 240, 240), (30, 60, 160)),
    ("green_on_black", (40, 200, 60), (15, 15, 15)),
    ("purple_on_mint", (120, 40, 160), (180, 240, 200)),
    ("orange_on_teal", (250, 140, 20), (20, 110, 120)),
]


def render_styled(pixels: np.ndarray, ink: tuple[int, ...], bg: tuple[int, ...], size: int = IMAGE_SIZE) -> Image.Image:
    """8x8 ink values 0..16 -> ink colour blended over the background, bicubic-upscaled like make_digit_shards."""
    gray = Image.fromarray(np.clip(pixels.reshape(8, 8) * (255.0 / 16.0), 0, 255).astype(np.uint8), mode="L")
    t = np.asarray(gray.resize((size, size), Image.Resampling.BICUBIC), dtype=np.float64)[..., None] / 255.0
    rgb = np.asarray(bg, dtype=np.float64) * (1 - t) + np.asarray(ink, dtype=np.float64) * t
    return Image.fromarray(np.clip(rgb, 0, 255).round().astype(np.uint8), mode="RGB")


def styled_samples(images: np.ndarray, labels: np.ndarray, indices: np.ndarray, seed: int) -> list[ShardSample]:
    out = []
    for i in indices:
        for name, ink, bg in PALETTES:
            out.append(ShardSample(
                image=render_styled(images[i], ink, bg),
                caption=f"a handwritten digit {int(labels[i])}",
                url=f"sklearn://load_digits/{int(i)}#{name}",
                extra={"label": int(labels[i]), "style": name, "ink": list(ink), "bg": list(bg)},
            ))
    random.Random(seed).shuffle(out)  # shards mix palettes and digits
    return out


def split_indices(seed: int, heldout_fraction: float) -> tuple[np.ndarray, np.ndarray]:
    """load_digits() indices: (train, held-out), seeded and stratified like tools/make_digit_shards.py."""
    digits = load_digits()
    idx = np.arange(len(digits.target))
    train, heldout = train_test_split(idx, test_size=heldout_fraction, random_state=seed, stratify=digits.target)
    return train, heldout


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
