"""`python -m ldmscale.train` (torchrun, the deepspeed launcher, slurm/train.sbatch and users' job scripts start
training so) and the `ldmscale-train` console script. The loop itself is ldmscale.trainer.loop."""

from __future__ import annotations

from typing import Any

from ldmscale.runtime import preemption
from ldmscale.runtime.startup import frozen_imports

# First of all, before the seconds of imports the trainer needs: a preemption notice (SIGUSR1/USR2/TERM) during
# start-up sets the flag the loop checks (it then exits for requeue before its first step) instead of killing the rank.
preemption.install()


def cli() -> None:
    # imported here, not at the top: spawned loader workers import this module again (as __mp_main__) and need
    # none of the trainer (DeepSpeed, diffusers), which would cost each of them seconds to minutes of start-up
    with frozen_imports():
        from ldmscale.trainer.cli import cli as train_cli

    train_cli()


def __getattr__(name: str) -> Any:  # `from ldmscale.train import main, TrainResult`
    if name in ("main", "TrainResult"):
        from ldmscale.trainer import loop

        return getattr(loop, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["TrainResult", "cli", "main"]  # noqa: F822  (main, TrainResult: module __getattr__)


if __name__ == "__main__":
    cli()
