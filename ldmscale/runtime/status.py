"""The run's state for the job script around it, written by rank 0 alone.

slurm/train.sbatch decides from this file whether to requeue, instead of grepping the interleaved output of
every rank for a word. `LDMSCALE_STATUS_FILE` names it (the sbatch sets it); without it nothing is written.
Lines of `key=value`, replaced atomically:

    state=running | finished | preempted
    step=1200                        the step the run stands at (the last one saved, once it stops)
    checkpoints=/abs/run/checkpoints where the run saves
    resumed_from=step_00001000       the checkpoint this job started from (empty: a fresh start)

The sbatch requeues on `preempted`, and on anything but `finished` when `checkpoints/latest` names a complete
checkpoint other than `resumed_from` (the job saved progress before it failed).
"""

from __future__ import annotations

import os
from pathlib import Path

from ldmscale.runtime.atomic import atomic_write_text

ENV = "LDMSCALE_STATUS_FILE"


class RunStatus:
    def __init__(self, path: Path | None, checkpoints: Path, is_main: bool) -> None:
        self.path = path if is_main else None
        self.checkpoints = checkpoints.resolve()
        self.resumed_from = ""

    @classmethod
    def from_env(cls, checkpoints: Path, is_main: bool) -> RunStatus:
        value = os.environ.get(ENV, "")
        return cls(Path(value) if value else None, checkpoints, is_main)

    def write(self, state: str, step: int | None = None) -> None:
        if self.path is None:
            return
        lines = [f"state={state}", f"step={'' if step is None else step}", f"checkpoints={self.checkpoints}",
                 f"resumed_from={self.resumed_from}"]
        self.path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(self.path, "\n".join(lines) + "\n")
