"""Write and read LAION-400M WebDataset shards in img2dataset's layout.

Per shard: ``NNNNN.tar`` holding ``{key}.jpg``, ``{key}.txt`` and ``{key}.json``, plus ``NNNNN.parquet``
(one row per sample, same fields as the json) and ``NNNNN_stats.json``. Keys are ``f"{shard:05d}{i:04d}"``
as img2dataset writes them, so the data pipeline sees exactly what a real LAION download looks like.
"""

from __future__ import annotations

import hashlib
import io
import json
import tarfile
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image
from tqdm import tqdm

from ldmscale.runtime.atomic import atomic_write

# img2dataset's key has 4 digits for the index inside a shard; more samples would collide with the next shard.
MAX_SAMPLES_PER_SHARD = 10_000

# LAION-400M's similarity column is a CLIP image-text cosine. No CLIP model exists offline here, and callers
# that build shards from ground-truth captions (digits, labelled folders) know the caption matches, so the
# default says "matching"; pass extra={"similarity": x} to store a measured value instead.
DEFAULT_SIMILARITY = 1.0


@dataclass
class ShardSample:
    image: Image.Image
    caption: str
    url: str = ""
    extra: dict = field(default_factory=dict)


def border_resize(image: Image.Image, size: int) -> Image.Image:
    """img2dataset's default "border" resize: keep aspect, longer side -> size, pad to a white square."""
    image = image.convert("RGB")
    w, h = image.size
    scale = size / max(w, h)
    new_w, new_h = max(1, round(w * scale)), max(1, round(h * scale))
    # img2dataset uses area interpolation to shrink and Lanczos to enlarge; PIL's BOX is area averaging.
    resample = Image.Resampling.BOX if scale < 1 else Image.Resampling.LANCZOS
    resized = image.resize((new_w, new_h), resample)
    canvas = Image.new("RGB", (size, size), (255, 255, 255))
    canvas.paste(resized, ((size - new_w) // 2, (size - new_h) // 2))
    return canvas


def _encode_sample(sample: ShardSample, key: str, image_size: int | None, quality: int) -> tuple[bytes, dict]:
    original_w, original_h = sample.image.size
    image = border_resize(sample.image, image_size) if image_size else sample.image.convert("RGB")
    buf = io.BytesIO()
    image.save(buf, format="JPEG", quality=quality)
    jpg = buf.getvalue()
    meta: dict[str, Any] = {
        "url": sample.url,
        "caption": sample.caption,
        "key": key,
        "status": "success",
        "error_message": None,
        "width": image.size[0],
        "height": image.size[1],
        "original_width": original_w,
        "original_height": original_h,
        "exif": None,
        "sha256": hashlib.sha256(jpg).hexdigest(),
        "NSFW": "UNLIKELY",
        "similarity": DEFAULT_SIMILARITY,
        "LICENSE": "?",
    }
    meta.update(sample.extra)
    return jpg, meta


def _add_member(tar: tarfile.TarFile, name: str, data: bytes, mtime: float) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mtime = int(mtime)
    info.mode = 0o644
    tar.addfile(info, io.BytesIO(data))


def _write_parquet(path: Path, rows: list[dict]) -> None:
    # Rows may carry different extra keys; use the union so no column is silently dropped.
    columns: dict[str, None] = {}
    for row in rows:
        columns.update(dict.fromkeys(row))
    table = pa.Table.from_pylist([{c: row.get(c) for c in columns} for row in rows])
    pq.write_table(table, path)


def _write_shard(out_dir: Path, shard: int, items: list[tuple[str, bytes, str, dict]], start: float) -> Path:
    name = f"{shard:05d}"
    tar_path = out_dir / f"{name}.tar"

    def write_tar(tmp: Path) -> None:
        with tarfile.open(tmp, "w") as tar:
            for key, jpg, caption, meta in items:
                _add_member(tar, f"{key}.jpg", jpg, start)
                _add_member(tar, f"{key}.txt", caption.encode("utf-8"), start)
                _add_member(tar, f"{key}.json", json.dumps(meta).encode("utf-8"), start)

    atomic_write(tar_path, write_tar)
    rows = [meta for _, _, _, meta in items]
    atomic_write(out_dir / f"{name}.parquet", lambda tmp: _write_parquet(tmp, rows))
    end = time.time()
    stats = {
        "count": len(items),
        "successes": len(items),
        "failed_to_download": 0,
        "failed_to_resize": 0,
        "duration": end - start,
        "bytes_downloaded": sum(len(jpg) for _, jpg, _, _ in items),
        "start_time": start,
        "end_time": end,
        "status_dict": {"success": len(items)},
    }
    # Stats last: its presence marks a finished shard, as with img2dataset.
    atomic_write(out_dir / f"{name}_stats.json", lambda tmp: tmp.write_text(json.dumps(stats, indent=4)))
    return tar_path


def write_laion_shards(
    samples: Iterable[ShardSample],
    out_dir: str | Path,
    samples_per_shard: int = 1000,
    image_size: int | None = None,
    jpeg_quality: int = 95,
    start_key: int = 0,
    progress: bool = True,
) -> list[Path]:
    """Write samples as img2dataset-layout shards; returns the tar paths in order.

    start_key is the index of the first shard (file names and keys start there), so several calls can
    write into one folder without colliding.
    """
    if not 0 < samples_per_shard <= MAX_SAMPLES_PER_SHARD:
        raise ValueError(f"samples_per_shard must be in 1..{MAX_SAMPLES_PER_SHARD}, got {samples_per_shard}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    total = len(samples) if hasattr(samples, "__len__") else None  # type: ignore[arg-type]
    written: list[Path] = []
    items: list[tuple[str, bytes, str, dict]] = []  # key, JPEG, caption, json
    shard, start = start_key, time.time()
    for sample in tqdm(samples, total=total, desc=f"shards -> {out}", unit="img", disable=not progress):
        key = f"{shard:05d}{len(items):04d}"
        jpg, meta = _encode_sample(sample, key, image_size, jpeg_quality)
        items.append((key, jpg, sample.caption, meta))
        if len(items) == samples_per_shard:
            written.append(_write_shard(out, shard, items, start))
            shard, items, start = shard + 1, [], time.time()
    if items:
        written.append(_write_shard(out, shard, items, start))
    return written


def read_shard_index(shard_dir: str | Path) -> list[dict]:
    """All parquet rows of a shard folder, shards in name order."""
    rows: list[dict] = []
    for path in sorted(Path(shard_dir).glob("[0-9]*.parquet")):
        rows.extend(pq.read_table(path).to_pylist())
    return rows


def iter_tar_samples(tar_path: str | Path) -> Iterator[dict[str, bytes | str]]:
    """Group a tar's members by key: yields {"__key__": key, "jpg": bytes, "txt": bytes, "json": bytes}.

    A sample cut short (a tar truncated at a member boundary) is yielded with whatever members it has.
    """
    current: dict[str, bytes | str] = {}
    with tarfile.open(tar_path, "r") as tar:
        for member in tar:
            if not member.isfile():
                continue
            key, _, ext = member.name.partition(".")
            if current and current["__key__"] != key:
                yield current
                current = {}
            fobj = tar.extractfile(member)
            assert fobj is not None  # isfile() members always have data
            current["__key__"] = key
            current[ext] = fobj.read()
    if current:
        yield current
