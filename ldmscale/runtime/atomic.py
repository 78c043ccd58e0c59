"""Atomic, durable local writes: a reader (or a resumed job) sees the old file or the whole new one, never half.

Write to a hidden temporary name in the same folder, fsync it, rename over the target, fsync the folder (so
the rename itself survives a power loss or a node reboot), and remove the temporary file on any failure.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors.torch import save_file


def fsync_path(path: Path) -> None:
    """Flush a file's bytes (or a folder's entries) to stable storage: what another writer (torch.save in
    DeepSpeed) left in the page cache survives a node crash only after this."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(path: Path, write: Callable[[Path], object]) -> None:
    """`write(tmp)` fills a temporary file; it then replaces `path` in one rename."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        write(tmp)
        fsync_path(tmp)
        os.replace(tmp, path)
        fsync_path(path.parent)
    finally:
        tmp.unlink(missing_ok=True)


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write(path, lambda tmp: tmp.write_text(text))


def atomic_save_tensors(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> None:
    """A safetensors file of CPU copies of `tensors` (and string `metadata` in its header), written atomically."""
    cpu = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    atomic_write(path, lambda tmp: save_file(cpu, str(tmp), metadata=metadata))
