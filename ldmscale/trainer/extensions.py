"""DeepSpeed's JIT-built ops (FusedAdam on GPUs, DeepSpeedCPUAdam with optimizer offload), loaded before
`deepspeed.initialize`, one process at a time per extensions folder.

torch builds a JIT extension in TORCH_EXTENSIONS_DIR/<name>/ under a `lock` file (torch.utils.file_baton): a process
killed while holding it (a preemption during the 1-2 minute FusedAdam build, or during the quick check of a built
op) leaves the file behind, and every later process that loads the op waits on it forever, in this job and in
every job sharing the folder. Here each rank first takes an flock on TORCH_EXTENSIONS_DIR/.ldmscale-ops.lock, which
the kernel releases when its holder dies however it dies. Holding it, a torch `lock` in an op's folder is known
stale (every ldmscale process goes through the flock before torch's baton) and is removed. The first rank of a
node (or of a folder shared by nodes) builds; the others then load the built op in a second or two.
Where the filesystem refuses flock, ops load as DeepSpeed loads them (no stale-lock repair).
"""

from __future__ import annotations

import fcntl
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch


def extensions_dir(op_name: str) -> Path:
    """Where torch builds JIT extensions (TORCH_EXTENSIONS_DIR, else its per-user, per-Python/CUDA default)."""
    from torch.utils.cpp_extension import _get_build_directory

    return Path(_get_build_directory(op_name, verbose=False)).parent


def ops_for(ds_config: dict[str, Any], cuda: bool) -> list[Any]:
    """The op builders `deepspeed.initialize` will JIT-load for this DeepSpeed config."""
    zero = ds_config.get("zero_optimization", {})
    optimizer = ds_config.get("optimizer", {})
    if zero.get("offload_optimizer", {}).get("device") == "cpu":
        from deepspeed.ops.op_builder import CPUAdamBuilder

        return [CPUAdamBuilder()]
    if cuda and optimizer.get("type") in ("Adam", "AdamW") and not optimizer.get("params", {}).get("torch_adam"):
        from deepspeed.ops.op_builder import FusedAdamBuilder

        return [FusedAdamBuilder()]
    return []


@contextmanager
def ops_lock(folder: Path) -> Iterator[bool]:
    """An exclusive flock on folder/.ldmscale-ops.lock for the duration; yields False where flock is refused."""
    folder.mkdir(parents=True, exist_ok=True)
    fd = os.open(folder / ".ldmscale-ops.lock", os.O_RDWR | os.O_CREAT, 0o666)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
        except OSError:
            yield False
            return
        yield True
    finally:
        os.close(fd)  # closing drops the flock (and the kernel drops it if this process dies first)


def load_ops(builders: list[Any], folder: Path | None = None) -> list[str]:
    """Load (building if needed) each op under the flock, removing a stale torch lock first. Returns the names
    of the stale locks removed."""
    if not builders:
        return []
    folder = folder or extensions_dir(builders[0].name)
    removed = []
    with ops_lock(folder) as exclusive:
        for builder in builders:
            stale = folder / builder.name / "lock"
            if exclusive and stale.exists():
                stale.unlink()
                removed.append(builder.name)
            builder.load()
    return removed


def prepare_ops(ds_config: dict[str, Any]) -> list[str]:
    """What the trainer calls before deepspeed.initialize."""
    return load_ops(ops_for(ds_config, torch.cuda.is_available()))
