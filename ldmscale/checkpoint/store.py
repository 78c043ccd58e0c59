"""Checkpoints on disk: DeepSpeed's own save/load on every rank, plus the trainer's state, EMA and config.

Layout under <out_dir>/checkpoints:
  step_00001000/   DeepSpeed's files (model, optimizer and scheduler shards of every rank)
                   ema.safetensors, trainer_state.json, config.yaml
                   posthoc_ema.safetensors   the post-hoc EMA profiles (train.posthoc_ema), to resume them
                   ranks/rank00000.json ...   each rank's own state (its data position), written by that rank:
                   DeepSpeed's client_state is written by data-parallel rank 0 only under ZeRO 0-2
                   COMPLETE   the manifest (integrity.py): this save's id, step, world size, every file's size
  step_00001000_universal/   made from step_00001000 (ds_to_universal) to resume on another world size; its
                   COMPLETE names the id of the save it was made from (elastic.py)
  latest           the tag of the newest COMPLETE checkpoint (the same file DeepSpeed's tools read)
  .step_00001000.saving/     a save in progress; renamed to step_00001000 once complete

A save is written into a fresh folder and renamed into place only when it is complete: every rank has written
and fsynced its files, then rank 0 writes the manifest. Re-saving a step (a run rolled back with
`--resume .../step_N` re-reaches a later step) therefore replaces the old folder as a whole: no file of the old
save, no rank file of a larger world, no stale universal conversion survives into the new one. `latest` only
ever names a complete folder; before a folder it names is replaced, it is pointed at the previous one.
DeepSpeed's own `latest` write is turned off.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Protocol

import torch

from ldmscale.checkpoint.integrity import COMPLETE, is_complete, new_save_id, write_manifest
from ldmscale.runtime import dist
from ldmscale.runtime.atomic import atomic_save_tensors, atomic_write_text, fsync_path
from ldmscale.runtime.errors import InputError

TAG_RE = re.compile(r"^step_(\d{8})$")


class CheckpointError(InputError, RuntimeError):
    """A checkpoint that cannot be used as asked; the message names the folder or file and what to do."""

    kind = "checkpoint error"


class ResumeError(CheckpointError):
    """--resume names no checkpoint that can be resumed."""

    kind = "resume error"


class CheckpointEngine(Protocol):
    """What the store uses of a DeepSpeed engine (ldmscale.trainer.engine.Engine is the loop's wider view)."""

    checkpoint_engine: Any  # DeepSpeed's writer: `save(state_dict, path)` is every file the engine writes

    def save_checkpoint(self, save_dir: str, tag: str | None = None, client_state: dict[str, Any] = ...,
                        save_latest: bool = True, exclude_frozen_parameters: bool = False) -> Any: ...

    def load_checkpoint(self, load_dir: str, tag: str | None = None, load_module_strict: bool = True,
                        load_optimizer_states: bool = True, load_lr_scheduler_states: bool = True,
                        load_module_only: bool = False) -> tuple[str | None, dict[str, Any] | None]: ...


def tag_for(step: int) -> str:
    return f"step_{step:08d}"


def step_of(tag: str) -> int:
    m = TAG_RE.match(tag)
    return int(m.group(1)) if m else -1


def staging_dir(root: Path, tag: str) -> Path:
    return root / f".{tag}.saving"


def universal_dir(tag_dir: Path) -> Path:
    return tag_dir.with_name(f"{tag_dir.name}_universal")


def rank_state_file(tag_dir: Path, rank: int) -> Path:
    return tag_dir / "ranks" / f"rank{rank:05d}.json"


def complete_tags(root: Path) -> list[str]:
    """Every complete checkpoint's tag under root, oldest first."""
    if not root.is_dir():
        return []
    return sorted(p.name for p in root.iterdir() if TAG_RE.match(p.name) and is_complete(p))


def read_latest(root: Path) -> str | None:
    f = root / "latest"
    return f.read_text().strip() if f.exists() else None


def remove_checkpoint(folder: Path) -> None:
    """COMPLETE first (and that made durable), then the rest: a half-deleted folder is never complete."""
    if not folder.exists():
        return
    marker = folder / COMPLETE
    if marker.exists():
        marker.unlink()
        fsync_path(folder)
    shutil.rmtree(folder, ignore_errors=True)


def write_rank_state(tag_dir: Path, rank: int, state: dict[str, Any]) -> None:
    """This rank's own state (e.g. its data position), atomically; every rank calls it for itself."""
    path = rank_state_file(tag_dir, rank)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, json.dumps(state))


def read_json(path: Path) -> Any:
    """A checkpoint's JSON file; a missing or unreadable one is a CheckpointError naming it."""
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise CheckpointError(f"{path} is missing: the checkpoint is damaged; resume from an earlier step") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path} is damaged ({e}); resume from an earlier step") from None


def read_trainer_state(tag_dir: Path) -> dict[str, Any]:
    return read_json(tag_dir / "trainer_state.json")


def read_rank_state(tag_dir: Path, rank: int, world: int) -> dict[str, Any]:
    """One saved rank's own state; a missing one is an error (a partial or foreign save)."""
    path = rank_state_file(tag_dir, rank)
    if not path.exists():
        raise CheckpointError(f"{tag_dir} lacks the per-rank state of rank {rank} of {world}: it was not written "
                              f"by every rank; resume from an earlier step")
    return read_json(path)


def read_rank_states(tag_dir: Path, world: int) -> list[dict[str, Any]]:
    """Every saved rank's own state, in rank order, for inspecting a checkpoint. A resume never reads them all:
    each rank reads only the saved ranks its share comes from (Checkpointer.restore, loader.saved_ranks_needed)."""
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(max_workers=min(32, max(1, world))) as pool:  # latency-bound on shared filesystems
        return list(pool.map(lambda r: read_rank_state(tag_dir, r, world), range(world)))


@contextmanager
def recording_writes(engine: CheckpointEngine) -> Iterator[list[str]]:
    """The paths DeepSpeed's checkpoint writer saves while inside (torch.save, no fsync of its own)."""
    writer = engine.checkpoint_engine
    if getattr(writer, "is_decoupled", lambda: False)():
        raise CheckpointError("a decoupled (asynchronous) DeepSpeed checkpoint engine cannot be made durable before "
                              "COMPLETE; remove deepspeed.extra.checkpoint's writer/decoupled settings")
    written: list[str] = []
    save = writer.save

    def save_and_record(state_dict: Any, path: str) -> Any:
        out = save(state_dict, path)
        written.append(path)
        return out

    writer.save = save_and_record
    try:
        yield written
    finally:
        del writer.save  # the class's own method again


class CheckpointStore:
    """The files of checkpoints under one root: an atomic, durable, all-rank save, a checked load, keep-last-K."""

    def __init__(self, root: Path, keep_last: int) -> None:
        self.root = root
        self.keep_last = keep_last

    def save(
        self,
        engine: CheckpointEngine,
        step: int,
        trainer_state: dict[str, Any],
        ema_state: dict[str, torch.Tensor] | None,
        config_yaml: str,
        rank_state: dict[str, Any] | None = None,
        tensor_files: dict[str, dict[str, torch.Tensor]] | None = None,
    ) -> Path:
        """Collective: every rank must call it, with its own `rank_state`. `tensor_files`: more safetensors files
        (name -> tensors, e.g. the post-hoc EMA profiles) that rank 0 writes. Returns the tag folder."""
        tag = tag_for(step)
        staging = staging_dir(self.root, tag)
        if dist.rank() == 0:
            self.root.mkdir(parents=True, exist_ok=True)
            shutil.rmtree(staging, ignore_errors=True)  # an interrupted save of this step: start afresh
        dist.barrier()
        with recording_writes(engine) as written:
            engine.save_checkpoint(str(self.root), tag=staging.name, client_state={"trainer": trainer_state},
                                   save_latest=False)
        for path in written:  # durable before COMPLETE: torch.save leaves the bytes in the page cache
            fsync_path(Path(path))
        if rank_state is not None:
            write_rank_state(staging, dist.rank(), rank_state)  # atomic and fsynced
        if dist.rank() == 0:
            if ema_state is not None:
                atomic_save_tensors(staging / "ema.safetensors", ema_state)
            for name, tensors in (tensor_files or {}).items():
                atomic_save_tensors(staging / name, tensors)
            atomic_write_text(staging / "trainer_state.json", json.dumps(trainer_state, indent=1))
            atomic_write_text(staging / "config.yaml", config_yaml)
        dist.barrier()  # every rank's files are durable before the save is declared complete
        tag_dir = self.root / tag
        if dist.rank() == 0:
            for folder in (staging / "ranks", staging):
                if folder.is_dir():
                    fsync_path(folder)
            write_manifest(staging, new_save_id(), step=step, world_size=trainer_state.get("world_size"))
            self._publish(staging, tag_dir)
            atomic_write_text(self.root / "latest", tag)
            self.prune(keep=tag)
        dist.barrier()
        return tag_dir

    def _publish(self, staging: Path, tag_dir: Path) -> None:
        """Rename the complete staging folder into place, replacing an older save of the same step."""
        if tag_dir.exists():
            if read_latest(self.root) == tag_dir.name:  # never let `latest` name a folder being replaced
                older = [t for t in complete_tags(self.root) if t < tag_dir.name]
                if older:
                    atomic_write_text(self.root / "latest", older[-1])
                else:
                    (self.root / "latest").unlink()
            replaced = self.root / f".{tag_dir.name}.replaced"
            shutil.rmtree(replaced, ignore_errors=True)
            marker = tag_dir / COMPLETE
            if marker.exists():
                marker.unlink()
                fsync_path(tag_dir)
            os.rename(tag_dir, replaced)
            os.rename(staging, tag_dir)
            fsync_path(self.root)
            shutil.rmtree(replaced, ignore_errors=True)
        else:
            os.rename(staging, tag_dir)
            fsync_path(self.root)
        remove_checkpoint(universal_dir(tag_dir))  # made from the replaced save (and tied to its id anyway)

    def load(self, engine: CheckpointEngine, tag_dir: Path, load_optimizer: bool = True,
             universal: bool = False) -> None:
        """Collective. Restores engine (weights, optimizer, LR schedule) from tag_dir, or from its universal
        conversion (prepare_universal; the engine's DeepSpeed config must say checkpoint.load_universal)."""
        if not any(tag_dir.glob("*model_states.pt")):
            # DeepSpeed would fail with a bare AssertionError here
            raise CheckpointError(f"{tag_dir} lacks DeepSpeed's model states; it is not a checkpoint this trainer "
                                  f"wrote (or its files were deleted)")
        try:
            path, _ = engine.load_checkpoint(
                str(tag_dir.parent), tag=universal_dir(tag_dir).name if universal else tag_dir.name,
                load_optimizer_states=load_optimizer, load_lr_scheduler_states=load_optimizer,
            )
        except RuntimeError as e:
            raise _weights_mismatch(tag_dir, e) from None
        if path is None:  # DeepSpeed only warns; a silent fresh start would waste the run
            raise CheckpointError(f"DeepSpeed could not load {tag_dir}; its files are missing or unreadable")

    def prune(self, keep: str) -> None:
        """Keep the newest `keep_last` complete checkpoints up to `keep` (the save just made); remove older ones
        and older partial saves, each with its universal conversion. Tags after `keep` belong to a branch this
        run rolled back from: they stay until this run re-saves their steps (and so replaces them)."""
        tags = sorted(p.name for p in self.root.iterdir() if p.is_dir() and TAG_RE.match(p.name))
        lineage = [t for t in tags if t <= keep]
        complete = [t for t in lineage if is_complete(self.root / t)]
        survivors = set(complete[-self.keep_last:]) | {keep}
        for t in lineage:
            if t not in survivors:
                remove_checkpoint(universal_dir(self.root / t))
                remove_checkpoint(self.root / t)
                shutil.rmtree(self.root / f".{t}_universal.converting", ignore_errors=True)
        # interrupted saves and replaced folders (only this process saves; a conversion of a kept checkpoint that
        # `ldmscale-universal` may be making right now is left alone)
        for leftover in [*self.root.glob(".step_*.saving"), *self.root.glob(".step_*.replaced")]:
            shutil.rmtree(leftover, ignore_errors=True)


def _weights_mismatch(tag_dir: Path, e: RuntimeError) -> Exception:
    """DeepSpeed's load_state_dict error (hundreds of key names) as one line, or the error itself."""
    text = str(e)
    if "Error(s) in loading state_dict" not in text:
        return e
    missing = re.findall(r'Missing key\(s\) in state_dict: (.*?)(?:\. \n|\.\s*$|\n)', text)
    unexpected = re.findall(r'Unexpected key\(s\) in state_dict: (.*?)(?:\. \n|\.\s*$|\n)', text)
    n_missing = missing[0].count('"') // 2 if missing else 0
    n_unexpected = unexpected[0].count('"') // 2 if unexpected else 0
    shapes = text.count("size mismatch")
    return CheckpointError(
        f"the weights in {tag_dir} do not fit this config's model ({n_missing} missing, {n_unexpected} unexpected, "
        f"{shapes} of another shape): it was trained with the model section of {tag_dir / 'config.yaml'}; resume "
        f"with that model section, or start a new run (another train.out_dir, or --resume never)"
    )
