"""What the digit benchmarks read from an image and a prompt: load_digits-style 8x8 features (a classifier trained
on the held-out real digits tells which digit an image shows) and the digit a prompt asks for."""

from __future__ import annotations

import re

import numpy as np
from PIL import Image

DIGIT_IN_PROMPT = re.compile(r"digit\D{0,3}(\d)\b|\b(\d)\b")


def digit_features(image: Image.Image) -> np.ndarray:
    """Image -> 64 values laid out like load_digits: 8x8, ink high, 0..16.

    Box resampling averages each 8x8 cell the way load_digits' 32x32 bitmaps were counted into 4x4 blocks.
    """
    gray = image.convert("L").resize((8, 8), Image.Resampling.BOX)
    ink = 255.0 - np.asarray(gray, dtype=np.float64)
    return (ink * (16.0 / 255.0)).ravel()


def parse_digit(prompt: str) -> int | None:
    """The digit a prompt asks for ("a handwritten digit 7" -> 7); None when it names no digit."""
    match = DIGIT_IN_PROMPT.search(prompt)
    if not match:
        return None
    return int(match.group(1) or match.group(2))
