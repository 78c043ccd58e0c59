"""CLIP score as torchmetrics defines it: 100 x cosine(image embedding, caption embedding), averaged, clipped
at 0 (MLPerf's bar, 0.15 on its 0..1 scale, is 15 here), with a CLIP model from a local folder or a hub id.

torchmetrics' CLIPScore accepts only a few hub names as a string; it also accepts a callable returning
(model, processor), which is how a local folder (or any CLIP checkpoint) gets in.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torchmetrics.multimodal.clip_score import CLIPScore
from transformers import CLIPModel, CLIPProcessor

from ldmscale.runtime.errors import InputError


class ClipError(InputError, ValueError):
    """A --clip-model that is neither a local CLIP folder nor a hub id."""


def check_clip_model(name_or_path: str) -> None:
    """Before any process group: a local folder must look like a saved CLIPModel with its processor."""
    p = Path(name_or_path)
    if p.exists():
        # transformers 5 writes processor_config.json, older versions preprocessor_config.json
        processor = [f for f in ("processor_config.json", "preprocessor_config.json") if (p / f).is_file()]
        missing = [f for f in ("config.json",) if not (p / f).is_file()] + ([] if processor else ["processor_config"])
        if missing:
            raise ClipError(f"--clip-model {p}: not a CLIP folder (missing {', '.join(missing)}); save one with "
                            f"CLIPModel.save_pretrained and CLIPProcessor.save_pretrained")
    elif name_or_path.count("/") != 1 or name_or_path.startswith(("/", ".")):
        raise ClipError(f"--clip-model {name_or_path}: no such folder, and not a hub id such as "
                        f"openai/clip-vit-large-patch14")
    elif os.environ.get("HF_HUB_OFFLINE") == "1":  # else from_pretrained fails after the process group started
        raise ClipError(f"--clip-model {name_or_path} is not a local folder and HF_HUB_OFFLINE=1 forbids the hub: "
                        f"give a folder written with CLIPModel/CLIPProcessor.save_pretrained")


def embedding(out: Any) -> torch.Tensor:
    """The projected embedding from get_image_features / get_text_features: a tensor in transformers 4, an
    output object holding it as pooler_output in transformers 5."""
    return out if isinstance(out, torch.Tensor) else out.pooler_output


class TensorFeatures(nn.Module):
    """CLIPModel whose get_*_features return tensors, as torchmetrics 1.9's CLIPScore expects (with transformers
    5 it would call .norm on an output object)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model: Any = model  # a transformers CLIPModel
        self.config = model.config

    def get_image_features(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        return embedding(self.model.get_image_features(*args, **kwargs))

    def get_text_features(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        return embedding(self.model.get_text_features(*args, **kwargs))


def build_clip_score(name_or_path: str, device: torch.device) -> CLIPScore:
    def load() -> tuple[TensorFeatures, CLIPProcessor]:
        model = CLIPModel.from_pretrained(name_or_path).eval().requires_grad_(False)
        return TensorFeatures(model), CLIPProcessor.from_pretrained(name_or_path)

    return CLIPScore(model_name_or_path=load).to(device)
