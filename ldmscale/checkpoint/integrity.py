"""What makes a checkpoint folder complete and intact: its COMPLETE marker is a manifest.

COMPLETE is written last, by rank 0, once every rank has written and fsynced its files. It holds

    {"format": 1, "id": "<uuid of this save>", "step": N, "world_size": W, "files": {"<relative path>": bytes}}

- `id` ties anything derived from the save (its universal conversion) to exactly this save: a folder re-saved
  under the same step gets a new id, and a conversion of the old one is recognised as stale.
- `files` lets a reader find a truncated or deleted file with one stat per file, before torch, safetensors or
  json fail on it with a traceback. Damage that keeps the size (bit rot) is out of its reach.
Checkpoints written before the manifest existed have an empty COMPLETE: they count as complete, unchecked.
"""

from __future__ import annotations

import json
import os
import uuid
from pathlib import Path
from typing import Any

from ldmscale.runtime.atomic import atomic_write_text

COMPLETE = "COMPLETE"
MANIFEST_FORMAT = 1


def is_complete(tag_dir: Path) -> bool:
    return (tag_dir / COMPLETE).exists()


def new_save_id() -> str:
    return uuid.uuid4().hex


def list_files(folder: Path) -> dict[str, int]:
    """Every file under `folder` (but COMPLETE) -> its size, by path relative to `folder`."""
    out: dict[str, int] = {}
    for dirpath, _, names in os.walk(folder):
        for name in names:
            path = Path(dirpath) / name
            rel = path.relative_to(folder).as_posix()
            if rel != COMPLETE:
                out[rel] = path.stat().st_size
    return dict(sorted(out.items()))


def write_manifest(folder: Path, save_id: str, **fields: Any) -> None:
    """COMPLETE for `folder` as its files are now (atomic and fsynced): the last write of a save."""
    manifest = {"format": MANIFEST_FORMAT, "id": save_id, **fields, "files": list_files(folder)}
    atomic_write_text(folder / COMPLETE, json.dumps(manifest, indent=0))


def read_manifest(folder: Path) -> dict[str, Any]:
    """The manifest in folder/COMPLETE; {} for a checkpoint written before manifests (an empty marker)."""
    text = (folder / COMPLETE).read_text().strip()
    if not text:
        return {}
    try:
        manifest = json.loads(text)
    except json.JSONDecodeError:
        return {"files": None}  # a damaged marker: nothing it says can be trusted
    return manifest if isinstance(manifest, dict) else {"files": None}


def save_id(folder: Path) -> str:
    """The identity of the save in `folder` (a pre-manifest checkpoint: its marker's modification time)."""
    manifest = read_manifest(folder)
    if manifest.get("id"):
        return str(manifest["id"])
    return f"unrecorded-{(folder / COMPLETE).stat().st_mtime_ns}"


def damage(folder: Path) -> str | None:
    """None if every file the manifest lists is there with its recorded size; else the first problem, naming
    the file (e.g. "ranks/rank00001.json is 12 bytes, the save wrote 455")."""
    manifest = read_manifest(folder)
    files = manifest.get("files", {}) if manifest else {}
    if files is None:
        return f"{COMPLETE} is not the manifest this trainer writes"
    for rel, size in files.items():
        path = folder / rel
        try:
            actual = path.stat().st_size
        except FileNotFoundError:
            return f"{rel} is missing"
        if actual != size:
            return f"{rel} is {actual} bytes, the save wrote {size}"
    return None
