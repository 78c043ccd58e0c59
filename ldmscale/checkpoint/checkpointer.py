"""The checkpointer the training loop holds: built once with every object a checkpoint saves, it decides when to
save and restores them all (torchtitan's shape)."""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ldmscale.checkpoint.loading import load_ema
from ldmscale.checkpoint.store import CheckpointStore, read_rank_state


@dataclass
class TrainState:
    """The loop's own counters, saved in trainer_state.json."""

    step: int = 0
    samples_seen: int = 0

    def state_dict(self) -> dict[str, Any]:
        return {"step": self.step, "samples_seen": self.samples_seen}

    def load_state_dict(self, d: dict[str, Any]) -> None:
        self.step, self.samples_seen = int(d["step"]), int(d["samples_seen"])


class Checkpointer:
    """Built once with everything a checkpoint holds: the DeepSpeed engine (weights, optimizer, LR schedule),
    the EMA, the loader's data position and the train state. It decides when to save (`maybe_save`) and
    restores all of them (`restore`). Every rank calls both: DeepSpeed's save and load are collectives."""

    def __init__(self, root: Path, *, keep_last: int, every: int, engine: Any, ema: Any, loader: Any,
                 train_state: TrainState, config_yaml: str, world_size: int) -> None:
        self.store = CheckpointStore(root, keep_last)
        self.every, self.engine, self.ema, self.loader = every, engine, ema, loader
        self.train_state, self.config_yaml, self.world_size = train_state, config_yaml, world_size
        self.saved_step = -1

    def restore(self, tag_dir: Path, universal: bool = False) -> str:
        """Everything from tag_dir (its universal conversion for the engine when `universal`); every rank takes
        its own data position, or a share of all of them on another world size. Returns the data's resume note."""
        state = self.store.load(self.engine, tag_dir, universal=universal)
        self.train_state.load_state_dict(state)
        if self.ema is not None:
            self.ema.load_state_dict(load_ema(tag_dir))  # every rank takes its share
        saved_world = int(state.get("world_size", self.world_size))
        # only the saved ranks this rank's share of the epoch comes from: its own on the same world, 2-3 otherwise
        positions = {r: read_rank_state(tag_dir, r, saved_world)["data"]
                     for r in self.loader.saved_ranks_needed(saved_world)}
        note = self.loader.load_state_dict(positions, saved_world)
        self.saved_step = self.train_state.step  # that step is on disk already
        return note

    def maybe_save(self, step: int, force: bool = False) -> Path | None:
        """Save at every `every`-th step, or now with force (preemption, the end); never the same step twice."""
        if step == self.saved_step or not (force or step % self.every == 0):
            return None
        state = {**self.train_state.state_dict(), "world_size": self.world_size, "time": time.time()}
        ema = self.ema.state_dict() if self.ema is not None else None  # collective: full on rank 0
        tag_dir = self.store.save(self.engine, step, state, ema, self.config_yaml,
                                  rank_state={"data": self.loader.state_dict()})
        self.saved_step = step
        return tag_dir
