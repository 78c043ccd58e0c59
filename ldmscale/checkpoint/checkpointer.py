"""The checkpointer the training loop holds: built once with every object a checkpoint saves, it decides when to
save and restores them all (torchtitan's shape):

    Checkpointer(root, {"engine": engine, "ema": ema, "data": loader, "train": state}, keep_last=3, every=1000,
                 config_yaml=..., world_size=W)

Each object is kept as what it is (ema and data may be None):
  engine  a DeepSpeed engine (store.CheckpointEngine): its own files, written by every rank
  train   state_dict() / load_state_dict(dict): the loop's counters -> trainer_state.json, written by rank 0
  ema     state_dict() is a collective giving the full fp32 average on rank 0 -> ema.safetensors;
          load_state_dict(TensorSlices): each rank reads only its own share of the file
  data    state_dict() per rank -> ranks/rankNNNNN.json, written by that rank; saved_ranks_needed(saved_world)
          names the saved ranks this rank's share of the epoch comes from (its own on the same world, 2-3 on
          another world, worker count or micro-batch) and load_state_dict({saved rank: position}, saved_world)
          takes them
  posthoc_ema  the post-hoc EMA profiles (train.posthoc_ema): state_dict() collective, full on rank 0 ->
          posthoc_ema.safetensors; load_state_dict(TensorSlices): each rank reads only its share of every profile
Reads at resume are O(1) files per rank: the rank files it needs, its slices of the EMA and post-hoc profiles;
rank 0 reads the summary (trainer_state.json) and broadcasts it.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ldmscale.checkpoint.slices import TensorSlices
from ldmscale.checkpoint.store import (
    CheckpointEngine,
    CheckpointError,
    CheckpointStore,
    read_rank_state,
    read_trainer_state,
)
from ldmscale.runtime import dist

OBJECT_KEYS = ("engine", "train", "ema", "data", "posthoc_ema")


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
    """Saves and restores the objects it was built with; every rank calls both (DeepSpeed's save and load are
    collectives). `maybe_save` decides when."""

    def __init__(self, root: Path, objects: Mapping[str, Any], *, keep_last: int, every: int, config_yaml: str,
                 world_size: int) -> None:
        unknown = set(objects) - set(OBJECT_KEYS)
        if unknown or "engine" not in objects or "train" not in objects:
            raise ValueError(f"Checkpointer objects: engine and train required, ema, data and posthoc_ema optional; "
                             f"got {sorted(objects)}")
        self.engine: CheckpointEngine = objects["engine"]
        self.train = objects["train"]
        self.ema, self.data = objects.get("ema"), objects.get("data")
        self.posthoc_ema = objects.get("posthoc_ema")  # ldmscale.trainer.posthoc_ema.PostHocEMA or None
        self.store = CheckpointStore(root, keep_last)
        self.every, self.config_yaml, self.world_size = every, config_yaml, world_size
        self.saved_step = -1

    def restore(self, tag_dir: Path, universal: bool = False) -> str:
        """Everything from tag_dir (its universal conversion for the engine when `universal`). Returns the data's
        resume note."""
        summary = dist.broadcast_object(read_trainer_state(tag_dir) if dist.rank() == 0 else None)
        assert summary is not None  # rank 0 sent the state it read
        self.store.load(self.engine, tag_dir, universal=universal)
        self.train.load_state_dict(summary)
        if self.ema is not None:
            f = tag_dir / "ema.safetensors"
            if not f.exists():
                raise CheckpointError(f"{tag_dir} holds no EMA weights (it was trained with train.ema_decay=0); "
                                      f"resume with train.ema_decay=0")
            with TensorSlices(f) as slices:
                self.ema.load_state_dict(slices)  # every rank reads its own share
        if self.posthoc_ema is not None:  # its presence was checked before the process group (check_resumable)
            with TensorSlices(tag_dir / self.posthoc_ema.STATE_FILE) as slices:
                self.posthoc_ema.load_state_dict(slices)  # every rank reads its own share of every profile
        note = self._restore_data(tag_dir, int(summary.get("world_size", self.world_size)))
        self.saved_step = self.train.step  # that step is on disk already
        return note

    def _restore_data(self, tag_dir: Path, saved_world: int) -> str:
        if self.data is None:
            return ""
        # only the saved ranks this rank's share of the epoch comes from: its own on the same world, 2-3 when the
        # world, the worker count or the micro-batch changed (the rest of the epoch is re-divided in samples)
        ranks = self.data.saved_ranks_needed(saved_world)
        positions = {r: read_rank_state(tag_dir, r, saved_world)["data"] for r in ranks}
        return self.data.load_state_dict(positions, saved_world)

    def maybe_save(self, step: int, force: bool = False) -> Path | None:
        """Save at every `every`-th step, or now with force (preemption, the end); never the same step twice."""
        if step == self.saved_step or not (force or step % self.every == 0):
            return None
        state = {**self.train.state_dict(), "world_size": self.world_size, "time": time.time()}
        ema = self.ema.state_dict() if self.ema is not None else None  # collective: full on rank 0
        files = {self.posthoc_ema.STATE_FILE: self.posthoc_ema.state_dict()} if self.posthoc_ema is not None else {}
        rank_state = {"data": self.data.state_dict()} if self.data is not None else None
        tag_dir = self.store.save(self.engine, step, state, ema, self.config_yaml, rank_state=rank_state,
                                  tensor_files=files)
        self.saved_step = step
        return tag_dir
