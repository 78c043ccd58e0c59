"""Reference images for FID: LAION-layout shards (local or on an object store) or an image folder, decoded and
resized as training does.

Every reference image goes through the loader's own decode (short side to the generation resolution, centre
crop), so real and generated images reach the feature extractor at the same size. Rank r takes the images
whose position in the sorted listing is r modulo the world size.

`find_reference` resolves --reference once, before any process group: a remote spec (s3://bucket/prefix/, a brace
pattern) is listed and its first shard opened, so a wrong bucket or endpoint is one line, not "no shards".
"""

from __future__ import annotations

import glob
import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import fsspec
import numpy as np
import torch
import webdataset as wds

from ldmscale.data import IMAGE_EXTS, decode_image, stack_uint8
from ldmscale.data.buckets import Bucket
from ldmscale.data.decode import decode_to_bucket
from ldmscale.data.shardlist import check_shards_reachable, expand_shard_urls, is_local
from ldmscale.data.storage import register_gopen_schemes, storage_options_for
from ldmscale.runtime.errors import InputError

FOLDER_EXTS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


class ReferenceError(InputError, ValueError):
    """A --reference that holds no images or statistics."""


@dataclass
class Reference:
    """What --reference names: kind "stats" (.npz), "shards" (.tar URLs) or "folder" (image files)."""

    spec: str
    kind: str
    items: list[str] = field(default_factory=list)  # shard URLs or image paths, in order
    count: int | None = None  # images it holds, where that is known without reading them


def reference_kind(spec: str) -> str:
    """'stats' (.npz), 'shards' (.tar files: a folder of them, a glob, an object-store prefix) or 'folder'."""
    return find_reference(spec).kind


def find_reference(spec: str) -> Reference:
    """--reference resolved and checked: local paths are looked at, object stores are asked."""
    if spec.endswith(".npz"):
        if not Path(spec).is_file():
            raise ReferenceError(f"--reference {spec}: no such statistics file (write one with --save-reference-stats)")
        return Reference(spec, "stats")
    if not is_local(spec):  # s3://bucket/prefix/ or a brace pattern: the store must answer now
        urls = expand_shard_urls(spec)  # a StorageError names what failed and how to fix it
        check_shards_reachable(urls, None)
        return Reference(spec, "shards", urls, _stats_count(urls))
    tars = _tars(spec)
    if tars:
        return Reference(spec, "shards", tars, _stats_count(tars))
    if Path(spec).is_dir() and _images(Path(spec)):
        images = [str(p) for p in _images(Path(spec))]
        return Reference(spec, "folder", images, len(images))
    raise ReferenceError(f"--reference {spec}: no .tar shards, image files or .npz statistics there")


def _stats_count(urls: list[str]) -> int | None:
    """Samples in the shards by their img2dataset *_stats.json (`successes`); None if any is missing."""
    total = 0
    for url in urls:
        stats_url = url[: -len(".tar")] + "_stats.json"
        try:
            with fsspec.open(stats_url, "rt", **storage_options_for(stats_url, None)) as f:
                total += int(json.load(f)["successes"])
        except Exception:  # no stats (shards written by other tools): the count stays unknown
            return None
    return total


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


def _encoded(ref: Reference) -> Iterator[bytes]:
    """Every reference image's encoded bytes, in a fixed order."""
    if ref.kind == "folder":
        for p in ref.items:
            yield Path(p).read_bytes()
        return
    for sample in shard_samples(ref.items):
        ext = next((e for e in IMAGE_EXTS if e in sample), None)
        if ext is not None:
            yield sample[ext]


def rank_batches(spec: str | Reference, canvas: int | tuple[int, int], rank: int, world: int, batch_size: int,
                 limit: int | None = None) -> Iterator[torch.Tensor]:
    """This rank's share of the first `limit` reference images as uint8 [B, 3, H, W] batches, each image resized
    to cover the canvas ((height, width), or a square's side) and centre-cropped to it."""
    ref = spec if isinstance(spec, Reference) else find_reference(spec)
    height, width = (canvas, canvas) if isinstance(canvas, int) else canvas
    batch: list[np.ndarray] = []
    for i, data in enumerate(_encoded(ref)):
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
