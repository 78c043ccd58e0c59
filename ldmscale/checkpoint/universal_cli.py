"""`ldmscale-universal`: DeepSpeed's universal conversion of a checkpoint, offline, for the largest jobs.

    ldmscale-universal runs/laion-256 --workers 64        # the run's latest checkpoint
    ldmscale-universal runs/laion-256/checkpoints/step_00120000

A job resumed on another number of ranks converts its checkpoint itself (rank 0, while the other ranks wait).
For ZeRO-3 at hundreds of ranks that is millions of fragment files: run this first, as a CPU job with many
cores, and the resized job finds the conversion made (it is tied to the exact save it came from, so a later
re-save of the same step is converted again). docs/checkpoints.md has the measured cost.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from ldmscale.checkpoint.elastic import available_cpus, convert_to_universal, is_converted
from ldmscale.checkpoint.resume import find_tag_dir
from ldmscale.checkpoint.store import universal_dir
from ldmscale.runtime.cli import ArgumentParser, at_least, run_cli


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = ArgumentParser(prog="ldmscale-universal", description=__doc__.split("\n\n")[0])
    p.add_argument("checkpoint", help="a run dir, its checkpoints/ folder (latest) or a step_* folder")
    p.add_argument("--workers", type=at_least(0), default=0,
                   help="converter processes (default 0: the CPUs available)")
    return p.parse_args(argv)


def main(args: argparse.Namespace) -> int:
    tag_dir = find_tag_dir(Path(args.checkpoint))
    if is_converted(tag_dir):
        print(f"{universal_dir(tag_dir)} is made already (from this very save)")
        return 0
    workers = args.workers or available_cpus()
    seconds = convert_to_universal(tag_dir, workers)
    print(f"{universal_dir(tag_dir)}: converted in {seconds:.1f} s with {workers} workers")
    return 0


def cli(argv: list[str] | None = None) -> None:
    run_cli("ldmscale-universal", lambda: main(parse_args(argv)))


if __name__ == "__main__":
    cli()
