"""Reference images for FID: LAION-layout shards or an image folder, decoded and resized as training does.

Every reference image goes through the loader's own decode (short side to the generation resolution, centre
crop), so real and generated images reach the feature extractor at the same size. Rank r takes the images
whose position in the sorted listing is r modulo the world size.
"""

from __future__ import annotations

import glob
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
import webdataset as wds

from ldmscale.data import IMAGE_EXTS, decode_image, stack_uint8
from ldmscale.data.buckets import Bucket
from ldmscale.data.decode import decode_to_bucket
from ldmscale.data.storage import register_gopen_schemes
from ldmscale.runtime.errors import InputError

FOLDER_EXTS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


class ReferenceError(InputError, ValueError):
    """A --reference that holds no images or statistics."""


def reference_kind(spec: str) -> str:
    """'stats' (.npz), 'shards' (.tar files: a folder of them or a glob) or 'folder' (image files)."""
    if spec.endswith(".npz"):
        if not Path(spec).is_file():
            raise ReferenceError(f"--reference {spec}: no such statistics file (write one with --save-reference-stats)")
        return "stats"
    if _tars(spec):
        return "shards"
    if Path(spec).is_dir() and _images(Path(spec)):
        return "folder"
    raise ReferenceError(f"--reference {spec}: no .tar shards, image files or .npz statistics there")


def shard_samples(urls: list[str], storage_options: dict | None = None) -> Iterator[dict]:
    """Every sample of the shards, in order, on every rank (webdataset, through the project's fsspec openers
    for object stores). Evaluation sets are small and must be the same whatever the world size."""
    register_gopen_schemes(storage_options)
    yield from wds.WebDataset(urls, shardshuffle=False, nodesplitter=None, workersplitter=None, empty_check=False)


def _tars(spec: str) -> list[str]:
    if Path(spec).is_dir():
        return sorted(str(p) for p in Path(spec).glob("*.tar"))
    return sorted(p for p in glob.glob(spec) if p.endswith(".tar"))


def _images(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.suffix.lower() in FOLDER_EXTS)


def _encoded(spec: str) -> Iterator[bytes]:
    """Every reference image's encoded bytes, in a fixed order."""
    if reference_kind(spec) == "folder":
        for p in _images(Path(spec)):
            yield p.read_bytes()
        return
    for sample in shard_samples(_tars(spec)):
        ext = next((e for e in IMAGE_EXTS if e in sample), None)
        if ext is not None:
            yield sample[ext]


def rank_batches(spec: str, canvas: int | tuple[int, int], rank: int, world: int, batch_size: int,
                 limit: int | None = None) -> Iterator[torch.Tensor]:
    """This rank's share of the first `limit` reference images as uint8 [B, 3, H, W] batches, each image resized
    to cover the canvas ((height, width), or a square's side) and centre-cropped to it."""
    height, width = (canvas, canvas) if isinstance(canvas, int) else canvas
    batch: list[np.ndarray] = []
    for i, data in enumerate(_encoded(spec)):
        if limit is not None and i >= limit:
            break
        if i % world != rank:
            continue
        if height == width:
            batch.append(decode_image(data, height, center_crop=True))
        else:
            batch.append(decode_to_bucket(data, [Bucket(height, width)], True, 0, "")[0])
        if len(batch) == batch_size:
            yield stack_uint8(batch)
            batch = []
    if batch:
        yield stack_uint8(batch)
