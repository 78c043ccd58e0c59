"""`ldmscale-train` / `python -m ldmscale.train`: the command line around the training loop."""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from ldmscale.checkpoint.store import ResumeError
from ldmscale.config import load_config
from ldmscale.runtime import dist
from ldmscale.runtime.cli import ArgumentParser, run_cli
from ldmscale.runtime.startup import frozen_imports


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = ArgumentParser(prog="ldmscale-train", description="Train a latent diffusion model or its autoencoder")
    p.add_argument("--config", help="YAML file (configs/*.yaml)")
    p.add_argument("--resume", default="auto", help="auto (latest if any) | never | a checkpoint folder")
    # the deepspeed launcher passes --local_rank; LOCAL_RANK in the environment says the same
    p.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    p.add_argument("overrides", nargs="*", help="section.key=value, e.g. train.max_steps=100 (options may come "
                                               "before, between or after them)")
    return p.parse_args(argv)


def train(args: argparse.Namespace) -> None:
    # every input check runs before any process group: every rank prints the same line, nobody hangs
    cfg = load_config(args.config, args.overrides)
    if args.resume not in ("auto", "never") and not Path(args.resume).expanduser().exists():
        raise ResumeError(f"{args.resume}: no such checkpoint (--resume takes auto, never, or a run dir, its "
                          f"checkpoints/ or a step_* folder)")
    with frozen_imports():  # not at the top: a config error is answered before DeepSpeed loads
        from ldmscale.trainer.loop import main

    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main(cfg, args.resume)  # prints FINISHED step=N or PREEMPTED step=N
    dist.cleanup()


def cli(argv: list[str] | None = None) -> None:
    run_cli("ldmscale-train", lambda: train(parse_args(argv)))
