"""LAION metadata filters: why a raw sample is dropped, read from its txt/json before anything is decoded."""

from __future__ import annotations

import json
from typing import Any

from ldmscale.config import FilterConfig
from ldmscale.config.schema import CaptionKey
from ldmscale.data.captions import caption_of
from ldmscale.data.latent_format import LATENT_EXT

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")


def _meta(sample: dict[str, Any]) -> dict[str, Any] | None:
    raw = sample.get("json")
    if raw is None:
        return None
    try:
        return json.loads(raw)
    except (ValueError, UnicodeDecodeError):
        return None


def reject_reason(sample: dict[str, Any], f: FilterConfig, caption_key: CaptionKey = "txt", seed: int = 0
                  ) -> str | None:
    """Why a raw sample is dropped, or None to keep it. Reads only txt/json: nothing is decoded. The caption
    filters look at the caption `caption_key` picks (captions.py; `seed` keys a per-sample pick)."""
    if not any(ext in sample for ext in IMAGE_EXTS) and LATENT_EXT not in sample:  # latent shards: no JPEG
        return "no_image"
    caption = caption_of(sample, caption_key, seed)
    if caption is None:
        return "no_caption"
    if len(caption) < f.min_caption_chars:
        return "caption_short"
    if f.max_caption_chars and len(caption) > f.max_caption_chars:
        return "caption_long"
    needs_meta = (
        f.min_width or f.min_height or f.min_aspect or f.max_aspect or f.min_similarity or f.allowed_nsfw
        or f.max_pwatermark < 1.0 or f.max_punsafe < 1.0
    )
    if not needs_meta:
        return None
    meta = _meta(sample)
    if meta is None:
        return "no_json"
    # as the json has them: a size that is not a number fails the comparison below and counts as bad_json
    w: Any = meta.get("original_width") or meta.get("width")
    h: Any = meta.get("original_height") or meta.get("height")
    if (f.min_width or f.min_height or f.min_aspect or f.max_aspect) and not (w and h):
        return "no_size"
    if f.min_width and w < f.min_width:
        return "too_narrow"
    if f.min_height and h < f.min_height:
        return "too_short"
    if f.min_aspect and w / h < f.min_aspect:
        return "aspect"
    if f.max_aspect and w / h > f.max_aspect:
        return "aspect"
    if f.min_similarity and (meta.get("similarity") is None or meta["similarity"] < f.min_similarity):
        return "similarity"
    if f.allowed_nsfw and meta.get("NSFW") not in f.allowed_nsfw:
        return "nsfw"
    # pwatermark / punsafe exist only in LAION-5B-derived sets: absent means "not filtered on"
    if f.max_pwatermark < 1.0 and meta.get("pwatermark") is not None and meta["pwatermark"] > f.max_pwatermark:
        return "watermark"
    if f.max_punsafe < 1.0 and meta.get("punsafe") is not None and meta["punsafe"] > f.max_punsafe:
        return "unsafe"
    return None
