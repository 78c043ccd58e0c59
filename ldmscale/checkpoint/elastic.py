"""Resuming on another world size: ZeRO 1-3 partition the optimizer by rank, so DeepSpeed's universal checkpoint
(`ds_to_universal`) is made beside the original and loaded with `checkpoint.load_universal`.

- Tied to its source: the conversion's COMPLETE records the id of the save it was made from (integrity.py). A
  conversion of an older save of the same step (a rolled-back run re-saved it) is stale and made again; a
  finished, intact one is reused by every later resume.
- Written into a fresh folder (.step_N_universal.converting) and renamed into place: a kill mid-way leaves no
  half conversion under the real name.
- In parallel: DeepSpeed's extract and merge worker pools, as many workers as CPUs this process may use.
- Nobody waits in a collective: rank 0 converts while the other ranks poll a marker file, then all meet in one
  broadcast. A conversion longer than the process group's timeout no longer kills the job.
- The converter child (and its pools) ignores SIGUSR1/USR2/TERM: a preemption notice is the trainer's to act on.
- Offline, for the largest jobs (ZeRO-3 at hundreds of ranks writes millions of fragment files):
  `ldmscale-universal RUN_DIR` (universal_cli.py) makes the same conversion as a job of its own before the
  resized job starts, which then finds it made. docs/checkpoints.md gives the measured cost.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from ldmscale.checkpoint.integrity import damage, is_complete, read_manifest, save_id, write_manifest
from ldmscale.checkpoint.store import CheckpointError, read_trainer_state, universal_dir
from ldmscale.runtime import dist, preemption
from ldmscale.runtime.atomic import atomic_write_text


def available_cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def is_converted(tag_dir: Path) -> bool:
    """A finished, intact conversion of exactly the save in tag_dir."""
    out = universal_dir(tag_dir)
    if not is_complete(out):
        return False
    return read_manifest(out).get("source") == save_id(tag_dir) and damage(out) is None


def _finished_marker(tag_dir: Path) -> Path:
    return tag_dir.with_name(f".{tag_dir.name}_universal.finished")


def convert_to_universal(tag_dir: Path, workers: int | None = None) -> float:
    """DeepSpeed's universal checkpoint of tag_dir, beside it, unless an intact one of this very save exists.
    Returns the seconds it took (0 when reused). One process runs it; `workers` processes convert (default: the
    CPUs this process may use)."""
    out = universal_dir(tag_dir)
    if is_converted(tag_dir):
        return 0.0
    staging = tag_dir.with_name(f".{out.name}.converting")
    shutil.rmtree(staging, ignore_errors=True)  # an interrupted conversion starts over
    workers = max(1, workers or available_cpus())
    t0 = time.perf_counter()
    # a subprocess: the converter starts worker pools, which must not fork a process holding a process group;
    # --inject_missing_state: ZeRO-1/2 checkpoints lack the universal metadata it needs
    args = ["--input_folder", str(tag_dir), "--output_folder", str(staging), "--inject_missing_state",
            "--num_extract_workers", str(workers), "--num_merge_workers", str(workers)]
    cmd = preemption.child_ignores_preemption(sys.executable, "deepspeed.checkpoint.ds_to_universal", args)
    with preemption.blocked():  # no notice lands before the child ignores it
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    output, _ = proc.communicate()
    (tag_dir.parent / "latest_universal").unlink(missing_ok=True)  # the converter names its staging folder there
    if proc.returncode != 0:
        shutil.rmtree(staging, ignore_errors=True)
        raise CheckpointError(f"ds_to_universal failed on {tag_dir} (exit {proc.returncode}): "
                              f"{output.strip()[-600:]}")
    write_manifest(staging, save_id=f"universal-of-{save_id(tag_dir)}", source=save_id(tag_dir))
    if out.exists():  # a stale conversion (of an older save of this step, or damaged): replaced as a whole
        (out / "COMPLETE").unlink(missing_ok=True)
        shutil.rmtree(out)
    os.rename(staging, out)
    return time.perf_counter() - t0


def prepare_universal(tag_dir: Path, poll_s: float | None = None) -> float:
    """Collective: rank 0 converts tag_dir (or finds it converted), the others wait outside any collective by
    polling a marker file. Returns rank 0's seconds on every rank."""
    world = dist.world_size()
    marker = _finished_marker(tag_dir)
    if dist.rank() == 0:
        marker.unlink(missing_ok=True)  # a marker of an earlier attempt must not release the others early
    needed = dist.broadcast_object(not is_converted(tag_dir) if dist.rank() == 0 else None)
    error, seconds = None, 0.0
    if needed and dist.rank() == 0:
        try:
            seconds = convert_to_universal(tag_dir)
        except CheckpointError as e:
            error = str(e)
        atomic_write_text(marker, "failed" if error else "ok")
    elif needed:
        poll_s = poll_s or max(0.5, min(5.0, world / 200))  # ~200 stats/s on the filesystem at most
        while not marker.exists():
            time.sleep(poll_s)
    outcome = dist.broadcast_object((error, seconds) if dist.rank() == 0 else None)
    assert outcome is not None  # rank 0 sent its (error, seconds)
    error, seconds = outcome
    if dist.rank() == 0:
        marker.unlink(missing_ok=True)
    if error:
        raise CheckpointError(error)
    return seconds


def prepare_elastic(tag_dir: Path | None, world: int, zero_stage: int, saved_world: int) -> tuple[bool, str]:
    """Collective. Resuming tag_dir (saved by `saved_world` ranks) on `world` ranks: (load its universal
    conversion?, the line to print). ZeRO 1-3 partition the optimizer by rank, so another world size needs
    DeepSpeed's universal checkpoint; ZeRO-0 keeps everything whole in rank 0's file and loads as it is."""
    if tag_dir is None or saved_world == world:
        return False, ""
    if zero_stage == 0:
        return False, f"resuming a {saved_world}-rank checkpoint on {world} ranks (ZeRO-0: no conversion needed)"
    seconds = prepare_universal(tag_dir)
    how = f"converted in {seconds:.1f} s" if seconds else "its universal conversion was made already"
    return True, f"resuming a {saved_world}-rank checkpoint on {world} ranks: {how}"


def saved_world_size(tag_dir: Path) -> int:
    """The world size that saved tag_dir (the manifest has it; older checkpoints: trainer_state.json)."""
    world = read_manifest(tag_dir).get("world_size")
    return int(world) if world else int(read_trainer_state(tag_dir).get("world_size", 1))
