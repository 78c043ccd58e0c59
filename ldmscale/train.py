"""`python -m ldmscale.train` (torchrun, the deepspeed launcher, slurm/train.sbatch and users' job scripts start
training so) and the `ldmscale-train` console script. The loop itself is ldmscale.trainer.loop."""

from ldmscale.runtime import preemption

# First of all, before the seconds of imports below: a preemption notice (SIGUSR1/USR2/TERM) during start-up sets
# the flag the loop checks (it then exits for requeue before its first step) instead of killing the rank.
preemption.install()

from ldmscale.trainer.cli import cli  # noqa: E402
from ldmscale.trainer.loop import TrainResult, main  # noqa: E402

__all__ = ["TrainResult", "cli", "main"]

if __name__ == "__main__":
    cli()
