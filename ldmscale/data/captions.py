"""data.caption_key: which part of a sample holds its caption.

`txt` (img2dataset's caption, the default) or another member by extension; `json.<field>` (nested:
`json.a.b`) for a field of the sample's json, e.g. the alt-text `json.caption` beside a synthetic
`json.recaption`; or `{field: probability, ...}`, one field picked per sample id with those probabilities
(a pure function of seed and sample key, so every pass, rank count and resume picks alike). A sample whose
chosen field is missing or not text has no caption: the filters drop it as `no_caption`.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

from ldmscale.config.schema import CaptionKey


def chosen_field(caption_key: CaptionKey, seed: int, key: str) -> str:
    """The caption field sample `key` reads: caption_key itself, or the one its probabilities pick for this id."""
    if isinstance(caption_key, str):
        return caption_key
    digest = hashlib.blake2b(f"caption/{seed}/{key}".encode(), digest_size=8).digest()
    u = int.from_bytes(digest, "big") / 2**64
    acc = 0.0
    for name, p in caption_key.items():
        acc += p
        if u < acc:
            return name
    return name  # rounding: the probabilities sum to 1 within 1e-6


def read_field(sample: dict[str, Any], name: str) -> str | None:
    """The text of member `name` (txt, caption.txt, ...) or json field `json.a.b`; None when absent or not text."""
    if not name.startswith("json."):
        raw = sample.get(name)
        return raw.decode("utf-8", "replace").strip() if isinstance(raw, bytes) else None
    raw = sample.get("json")
    if raw is None:
        return None
    try:
        value: Any = json.loads(raw)
    except (ValueError, UnicodeDecodeError):
        return None
    for part in name[len("json."):].split("."):
        if not isinstance(value, dict) or part not in value:
            return None
        value = value[part]
    return value.strip() if isinstance(value, str) else None


def caption_of(sample: dict[str, Any], caption_key: CaptionKey, seed: int) -> str | None:
    """The sample's caption by caption_key, or None (counted as `no_caption`)."""
    return read_field(sample, chosen_field(caption_key, seed, sample.get("__key__", "")))
