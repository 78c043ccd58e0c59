"""scikit-learn's 1797 handwritten 8x8 digits as LAION-layout shards: train/ and heldout/ from one seeded,
stratified split. The held-out digits are what the digit-accuracy benchmark trains its classifier on, so a
diffusion model trained on train/ never sees them.

With `aspects` each digit is drawn on a wide (2:1), square or tall (1:2) white canvas in turn: mixed-aspect data
for aspect buckets (data.buckets)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from ldmscale.data.shard_writer import ShardSample, write_laion_shards

IMAGE_SIZE = 64


def render_digit(pixels: np.ndarray, size: int = IMAGE_SIZE) -> Image.Image:
    """8x8 ink values 0..16 -> black ink on white RGB, bicubic-upscaled so strokes are smooth."""
    gray = np.clip(255.0 - pixels.reshape(8, 8) * (255.0 / 16.0), 0, 255).astype(np.uint8)
    return Image.fromarray(gray, mode="L").resize((size, size), Image.Resampling.BICUBIC).convert("RGB")


CANVASES = {  # (width, height)
    "wide": (2 * IMAGE_SIZE, IMAGE_SIZE),
    "square": (IMAGE_SIZE, IMAGE_SIZE),
    "tall": (IMAGE_SIZE, 2 * IMAGE_SIZE),
}


def on_canvas(digit: Image.Image, canvas: str) -> Image.Image:
    """The digit in the middle of a white (width, height) canvas of CANVASES[canvas]."""
    out = Image.new("RGB", CANVASES[canvas], "white")
    out.paste(digit, ((out.width - digit.width) // 2, (out.height - digit.height) // 2))
    return out


def digit_samples(images: np.ndarray, labels: np.ndarray, indices: np.ndarray,
                  aspects: bool = False) -> list[ShardSample]:
    names = list(CANVASES)
    return [
        ShardSample(
            image=on_canvas(render_digit(images[i]), names[n % 3]) if aspects else render_digit(images[i]),
            caption=f"a handwritten digit {int(labels[i])}",
            url=f"sklearn://load_digits/{int(i)}",
            extra={"label": int(labels[i])},
        )
        for n, i in enumerate(indices)
    ]


def split_indices(seed: int, heldout_fraction: float) -> tuple[np.ndarray, np.ndarray]:
    """load_digits() indices: (train, held-out), seeded; stratified so every digit is in the held-out set in its
    natural proportion. Every digit demo (plain, palettes, colour pairs) splits this way."""
    from sklearn.datasets import load_digits  # the dev extra: only the demo and the tests need it
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    indices = np.arange(len(digits.target))
    train, heldout = train_test_split(indices, test_size=heldout_fraction, random_state=seed, stratify=digits.target)
    return train, heldout


def write_digit_shards(
    out_dir: str | Path, seed: int = 0, samples_per_shard: int = 400, heldout_fraction: float = 0.15,
    aspects: bool = False,
) -> dict[str, list[Path]]:
    """Split load_digits (stratified, seeded) and write train/ and heldout/ shards; returns tar paths. `aspects`:
    wide, square and tall canvases in turn (the module docstring)."""
    from sklearn.datasets import load_digits  # the dev extra: only the demo and the tests need it

    digits = load_digits()
    train_idx, heldout_idx = split_indices(seed, heldout_fraction)
    out = Path(out_dir)
    written = {}
    for split, idx in (("train", train_idx), ("heldout", heldout_idx)):
        samples = digit_samples(digits.images, digits.target, idx, aspects)
        written[split] = write_laion_shards(samples, out / split, samples_per_shard=samples_per_shard)
    return written


