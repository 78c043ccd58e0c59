"""Checkpoints: DeepSpeed's own save/load on every rank, plus the trainer's state, EMA and config.

Layout under <out_dir>/checkpoints:
  step_00001000/   DeepSpeed's files (model, optimizer and scheduler shards of every rank)
                   ema.safetensors, trainer_state.json, config.yaml, COMPLETE
                   ranks/rank00000.json ...   each rank's own state (its data position), written by that rank:
                   DeepSpeed's client_state is written by data-parallel rank 0 only under ZeRO 0-2
  step_00001000_universal/   made once from step_00001000 (ds_to_universal) to resume on another world size
  latest           the tag of the newest COMPLETE checkpoint (the same file DeepSpeed's tools read)

`latest` is replaced atomically, only after every rank finished writing and COMPLETE exists, so a
kill at any moment of a save leaves the previous checkpoint as `latest`. DeepSpeed's own `latest`
write is turned off for that reason.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path
from typing import Any

import torch

from ldmscale.runtime import dist
from ldmscale.runtime.atomic import atomic_save_tensors, atomic_write_text
from ldmscale.runtime.errors import InputError

COMPLETE = "COMPLETE"
TAG_RE = re.compile(r"^step_(\d{8})$")


class CheckpointError(InputError, RuntimeError):
    """A checkpoint that cannot be used as asked; the message names the folder or file and what to do."""

    kind = "checkpoint error"


class ResumeError(CheckpointError):
    """--resume names no checkpoint that can be resumed."""

    kind = "resume error"


def tag_for(step: int) -> str:
    return f"step_{step:08d}"


def is_complete(tag_dir: Path) -> bool:
    return (tag_dir / COMPLETE).exists()


def latest_tag(root: Path) -> str | None:
    """The tag `latest` names, or None for a fresh run. A `latest` naming an incomplete save is an error."""
    f = root / "latest"
    if not f.exists():
        return None
    tag = f.read_text().strip()
    if not is_complete(root / tag):
        raise CheckpointError(
            f"{f} names {tag}, which has no {COMPLETE} marker: the save did not finish. Give an earlier complete "
            f"step_* folder of {root} instead (ls it), or point `latest` at one"
        )
    return tag


def resolve_resume(root: Path, resume: str) -> Path | None:
    """`auto`: latest if any; `never`: None; otherwise a checkpoint tag folder (or a root holding `latest`)."""
    if resume == "never":
        return None
    if resume == "auto":
        tag = latest_tag(root)
        return root / tag if tag else None
    return find_tag_dir(Path(resume))


def find_tag_dir(path: Path) -> Path:
    """A checkpoint root (with `latest`), a run dir (with checkpoints/), or a tag folder -> the tag folder."""
    if (path / "checkpoints").is_dir():
        path = path / "checkpoints"
    if (path / "latest").exists():
        tag = latest_tag(path)
        assert tag is not None
        path = path / tag
    if not path.is_dir():
        raise CheckpointError(f"{path}: no such checkpoint; give a run dir, its checkpoints/ or a step_* folder")
    if not is_complete(path) and not any(path.glob("*model_states.pt")) and not (path / "trainer_state.json").exists():
        raise CheckpointError(f"{path} is not a checkpoint (no DeepSpeed files, no trainer_state.json); give a run "
                              f"dir, its checkpoints/ or a step_* folder")
    if not is_complete(path):
        raise CheckpointError(
            f"{path} is a partial checkpoint (no COMPLETE marker: its save was interrupted); use an earlier step"
        )
    return path


def read_trainer_state(tag_dir: Path) -> dict[str, Any]:
    return json.loads((tag_dir / "trainer_state.json").read_text())


def rank_state_file(tag_dir: Path, rank: int) -> Path:
    return tag_dir / "ranks" / f"rank{rank:05d}.json"


def write_rank_state(tag_dir: Path, rank: int, state: dict[str, Any]) -> None:
    """This rank's own state (e.g. its data position), atomically; every rank calls it for itself."""
    path = rank_state_file(tag_dir, rank)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, json.dumps(state))


def read_rank_state(tag_dir: Path, rank: int, world: int) -> dict[str, Any]:
    """One saved rank's own state; a missing one is an error (a partial or foreign save)."""
    path = rank_state_file(tag_dir, rank)
    if not path.exists():
        raise CheckpointError(f"{tag_dir} lacks the per-rank state of rank {rank} of {world}: it was not written "
                              f"by every rank; resume from an earlier step")
    return json.loads(path.read_text())


def read_rank_states(tag_dir: Path, world: int) -> list[dict[str, Any]]:
    """Every saved rank's own state, in rank order; a missing one is an error (a partial or foreign save)."""
    missing = [r for r in range(world) if not rank_state_file(tag_dir, r).exists()]
    if missing:
        raise CheckpointError(f"{tag_dir} lacks the per-rank state of rank(s) {missing[:5]} of {world}: it was not "
                              f"written by every rank; resume from an earlier step")
    return [json.loads(rank_state_file(tag_dir, r).read_text()) for r in range(world)]


def universal_dir(tag_dir: Path) -> Path:
    return tag_dir.with_name(f"{tag_dir.name}_universal")


class CheckpointStore:
    """The files of checkpoints under one root: an atomic, all-rank save, a checked load, keep-last-K."""

    def __init__(self, root: Path, keep_last: int) -> None:
        self.root = root
        self.keep_last = keep_last

    def save(
        self,
        engine: Any,
        step: int,
        trainer_state: dict[str, Any],
        ema_state: dict[str, torch.Tensor] | None,
        config_yaml: str,
        rank_state: dict[str, Any] | None = None,
    ) -> Path:
        """Collective: every rank must call it, with its own `rank_state`. Returns the tag folder."""
        tag = tag_for(step)
        tag_dir = self.root / tag
        if dist.rank() == 0:
            self.root.mkdir(parents=True, exist_ok=True)
            # a half-written folder from an interrupted save of the same step must not look complete
            (tag_dir / COMPLETE).unlink(missing_ok=True)
        dist.barrier()
        engine.save_checkpoint(str(self.root), tag=tag, client_state={"trainer": trainer_state}, save_latest=False)
        if rank_state is not None:
            write_rank_state(tag_dir, dist.rank(), rank_state)
        if dist.rank() == 0:
            if ema_state is not None:
                atomic_save_tensors(tag_dir / "ema.safetensors", ema_state)
            atomic_write_text(tag_dir / "trainer_state.json", json.dumps(trainer_state, indent=1))
            atomic_write_text(tag_dir / "config.yaml", config_yaml)
        dist.barrier()  # every rank's shards are on disk before the save is declared complete
        if dist.rank() == 0:
            atomic_write_text(tag_dir / COMPLETE, "")
            atomic_write_text(self.root / "latest", tag)
            self.prune(keep=tag)
        dist.barrier()
        return tag_dir

    def load(self, engine: Any, tag_dir: Path, load_optimizer: bool = True, universal: bool = False) -> dict[str, Any]:
        """Collective. Restores engine (weights, optimizer, LR schedule) and returns the trainer state.
        universal: load the converted folder beside tag_dir (prepare_universal; the engine's DeepSpeed config
        must say checkpoint.load_universal)."""
        if not any(tag_dir.glob("*model_states.pt")) or not (tag_dir / "trainer_state.json").exists():
            # DeepSpeed would fail with a bare AssertionError here
            raise CheckpointError(f"{tag_dir} lacks DeepSpeed's model states or trainer_state.json; it is not a "
                                  f"checkpoint this trainer wrote (or its files were deleted)")
        path, _ = engine.load_checkpoint(
            str(tag_dir.parent), tag=universal_dir(tag_dir).name if universal else tag_dir.name,
            load_optimizer_states=load_optimizer,
            load_lr_scheduler_states=load_optimizer,
        )
        if path is None:  # DeepSpeed only warns; a silent fresh start would waste the run
            raise CheckpointError(f"DeepSpeed could not load {tag_dir}; its files are missing or unreadable")
        return read_trainer_state(tag_dir)

    def prune(self, keep: str) -> None:
        """Keep the newest `keep_last` complete checkpoints; remove older ones and older partial saves."""
        tags = sorted(p.name for p in self.root.iterdir() if p.is_dir() and TAG_RE.match(p.name))
        complete = [t for t in tags if is_complete(self.root / t)]
        survivors = set(complete[-self.keep_last :]) | {keep}
        newest = max(survivors)
        for t in tags:
            if t not in survivors and t < newest:
                shutil.rmtree(self.root / t, ignore_errors=True)
                shutil.rmtree(universal_dir(self.root / t), ignore_errors=True)
