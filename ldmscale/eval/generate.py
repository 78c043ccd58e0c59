"""Images for the evaluation prompts, written one PNG per image as they come, so a killed eval resumes.

Each image is a pure function of (checkpoint, seed, image index, guidance scale, sampler, steps): a rerun
finds the PNGs already there and draws only the missing ones. A PNG appears under its final name only once
complete (written to a temporary name, then renamed). `generation.json` records the settings the images were
drawn with; a rerun with other settings is refused rather than mixing two sets of images.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from ldmscale.data import stack_uint8
from ldmscale.data.buckets import SizeCond
from ldmscale.inference.generate import generate, to_pil
from ldmscale.inference.prompts import prompt_for
from ldmscale.runtime.errors import InputError


@dataclass(frozen=True)
class GenerationSettings:
    checkpoint: str
    step: int | None
    weights: str
    seed: int
    steps: int
    sampler: str
    height: int
    width: int
    size_cond: list[int] | None = None  # size-conditioned models: original h, w, crop top, left, target h, w


class SettingsMismatch(InputError, ValueError):
    """Images already in the output folder were drawn with other settings."""


def image_path(out: Path, guidance: float, index: int) -> Path:
    return out / "images" / f"guidance_{guidance:g}" / f"{index:06d}.png"


def check_settings(out: Path, settings: GenerationSettings) -> None:
    """Refuse to reuse images drawn with other settings (before any process group: every rank checks)."""
    f = out / "generation.json"
    if f.exists():
        old = json.loads(f.read_text())
        if "resolution" in old:  # written before canvases had two sides: a square
            side = old.pop("resolution")
            old.update(height=side, width=side, size_cond=None)
        if old != asdict(settings):
            diff = {k: (old.get(k), v) for k, v in asdict(settings).items() if old.get(k) != v}
            raise SettingsMismatch(f"{out} holds images drawn with other settings {diff} (old, new); "
                                   f"give another --out or delete {out / 'images'}")


def write_settings(out: Path, settings: GenerationSettings) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "generation.json").write_text(json.dumps(asdict(settings), indent=1))


def save_png(image: Image.Image, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    image.save(tmp, format="PNG")
    os.replace(tmp, path)


def draw_missing(model: object, prompts: list[str], indices: list[int], out: Path, guidance: float,
                 settings: GenerationSettings, batch_size: int) -> int:
    """Draw this rank's images that are not on disk yet; returns how many were drawn."""
    todo = [i for i in indices if not image_path(out, guidance, i).exists()]
    for start in range(0, len(todo), batch_size):
        chunk = todo[start : start + batch_size]
        images = generate(
            model.unet, model.encoders, model.scheduler_config,  # type: ignore[attr-defined]
            [prompt_for(prompts, i) for i in chunk], seed=settings.seed, steps=settings.steps,
            guidance_scale=guidance, sampler=settings.sampler, height=settings.height, width=settings.width,
            size_cond=SizeCond.from_list(settings.size_cond) if settings.size_cond else None,
            batch_size=batch_size, indices=chunk,
        )
        for i, img in zip(chunk, to_pil(images)):
            save_png(img, image_path(out, guidance, i))
    return len(todo)


def write_index(out: Path, guidance: float, prompts: list[str], num_images: int) -> Path:
    """samples.json beside one guidance scale's PNGs: {file, prompt, index, guidance} per image, the layout
    ldmscale-sample writes, so tools that read samples folders (tools/bench/digit_accuracy.py) read these."""
    folder = image_path(out, guidance, 0).parent
    rows = [{"file": image_path(out, guidance, i).name, "prompt": prompt_for(prompts, i), "index": i,
             "guidance": guidance} for i in range(num_images)]
    (folder / "samples.json").write_text(json.dumps(rows, indent=1))
    return folder / "samples.json"


def load_uint8(paths: list[Path]) -> torch.Tensor:
    """PNG files -> uint8 [N, 3, H, W]. Scores are always computed from the files, so a resumed eval and an
    uninterrupted one score the very same pixels."""
    arrays = []
    for p in paths:
        with Image.open(p) as img:
            arrays.append(np.asarray(img.convert("RGB")))
    return stack_uint8(arrays)
