"""Resuming on another world size: ZeRO 1-3 partition the optimizer by rank, so DeepSpeed's universal checkpoint
(`ds_to_universal`) is made once beside the original and loaded with `checkpoint.load_universal`."""

from __future__ import annotations

import shutil
import subprocess
import sys
import time
from pathlib import Path

from ldmscale.checkpoint.store import COMPLETE, CheckpointError, is_complete, read_trainer_state, universal_dir
from ldmscale.runtime import dist
from ldmscale.runtime.atomic import atomic_write_text


def convert_to_universal(tag_dir: Path) -> float:
    """DeepSpeed's universal checkpoint of tag_dir, beside it (once: a finished conversion is reused).
    Returns the seconds it took (0 when reused). Run by one process; the others wait for it."""
    out = universal_dir(tag_dir)
    if is_complete(out):
        return 0.0
    shutil.rmtree(out, ignore_errors=True)  # an interrupted conversion starts over
    t0 = time.perf_counter()
    # a subprocess: the converter starts worker pools, which must not fork a process holding a process group;
    # --inject_missing_state: ZeRO-1/2 checkpoints lack the universal metadata it needs
    cmd = [sys.executable, "-m", "deepspeed.checkpoint.ds_to_universal", "--input_folder", str(tag_dir),
           "--output_folder", str(out), "--inject_missing_state", "--num_extract_workers", "1",
           "--num_merge_workers", "1"]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise CheckpointError(f"ds_to_universal failed on {tag_dir} (exit {proc.returncode}): "
                              f"{(proc.stdout + proc.stderr).strip()[-600:]}")
    atomic_write_text(out / COMPLETE, "")
    return time.perf_counter() - t0


def prepare_universal(tag_dir: Path) -> float:
    """Collective: rank 0 converts tag_dir to a universal checkpoint, the others wait. Returns its seconds."""
    seconds = convert_to_universal(tag_dir) if dist.rank() == 0 else 0.0
    dist.barrier()
    if not is_complete(universal_dir(tag_dir)):
        raise CheckpointError(f"{universal_dir(tag_dir)} is not complete after the conversion")
    return seconds


def prepare_elastic(tag_dir: Path | None, world: int, zero_stage: int) -> tuple[bool, str]:
    """Collective. Resuming tag_dir on `world` ranks: (load its universal conversion?, the line to print).
    ZeRO 1-3 partition the optimizer by rank, so another world size needs DeepSpeed's universal checkpoint;
    ZeRO-0 keeps everything whole in rank 0's file and loads as it is."""
    if tag_dir is None:
        return False, ""
    saved = int(read_trainer_state(tag_dir).get("world_size", world))
    if saved == world:
        return False, ""
    if zero_stage == 0:
        return False, f"resuming a {saved}-rank checkpoint on {world} ranks (ZeRO-0: no conversion needed)"
    seconds = prepare_universal(tag_dir)
    return True, f"resuming a {saved}-rank checkpoint on {world} ranks: converting ({seconds:.1f} s)"
