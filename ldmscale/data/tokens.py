"""Captions -> token ids, as the loader's workers make them (the frozen text encoder runs on the trainer's device)."""

from __future__ import annotations

from typing import Any

import torch


def tokenize(tokenizer: Any, captions: list[str]) -> torch.Tensor:
    """Pad/truncate to the tokenizer's max length (CLIP's 77 for SD); returns int64 ids [B, L]."""
    return tokenizer(
        captions, padding="max_length", truncation=True, max_length=tokenizer.model_max_length, return_tensors="pt"
    ).input_ids
