"""`python -m ldmscale.train` (torchrun, the deepspeed launcher, slurm/train.sbatch and users' job scripts start
training so) and the `ldmscale-train` console script. The loop itself is ldmscale.trainer.loop."""

from typing import Any

from ldmscale.trainer.cli import cli

__all__ = ["TrainResult", "cli", "main"]  # noqa: F822  (main, TrainResult: module __getattr__)


def __getattr__(name: str) -> Any:
    # main and TrainResult import DeepSpeed: loaded when asked for, so a bad command line is answered without it
    if name in ("main", "TrainResult"):
        from ldmscale.trainer import loop

        return getattr(loop, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


if __name__ == "__main__":
    cli()
