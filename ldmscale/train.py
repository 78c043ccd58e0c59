"""`python -m ldmscale.train` (torchrun, the deepspeed launcher, slurm/train.sbatch and users' job scripts start
training so) and the `ldmscale-train` console script. The loop itself is ldmscale.trainer.loop."""

from ldmscale.trainer.cli import cli
from ldmscale.trainer.loop import TrainResult, main

__all__ = ["TrainResult", "cli", "main"]

if __name__ == "__main__":
    cli()
