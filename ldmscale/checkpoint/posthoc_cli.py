"""`ldmscale-ema RUN --sigma-rel S [--step T] --out DIR`: the EMA of relative length S at step T (default: the last
snapshot), reconstructed after training from the run's post-hoc EMA snapshots (train.posthoc_ema), written as a
checkpoint folder that ldmscale-sample, ldmscale-eval and ldmscale-export take (its weights are the EMA weights,
the default of all three).

Every input is checked before a snapshot's weights are read: the run folder, its snapshots (their headers only),
the length and step asked, and the output folder."""

from __future__ import annotations

import argparse
from pathlib import Path

from ldmscale.checkpoint.posthoc_ema import MAX_SIGMA_REL, write_checkpoint
from ldmscale.checkpoint.store import read_trainer_state
from ldmscale.runtime.cli import ArgumentParser, at_least, finite_float, run_cli


def sigma_rel_arg(text: str) -> float:
    """An argparse type: a finite number in (0, MAX_SIGMA_REL]."""
    value = finite_float(text)
    if not 0 < value <= MAX_SIGMA_REL:
        raise argparse.ArgumentTypeError(f"{value} is out of range: give a value in (0, {MAX_SIGMA_REL}] "
                                         f"(EDM2 uses 0.05-0.20)")
    return value


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = ArgumentParser(prog="ldmscale-ema", description=__doc__.splitlines()[0])
    p.add_argument("run", type=Path, help="the run's train.out_dir (it holds posthoc_ema/ and config.yaml)")
    p.add_argument("--sigma-rel", type=sigma_rel_arg, required=True,
                   help=f"EMA length relative to the training time, in (0, {MAX_SIGMA_REL}]; EDM2 found 0.05-0.20 best")
    p.add_argument("--step", type=at_least(1), help="a snapshot step (default: the last one)")
    p.add_argument("--out", type=Path, required=True, help="the checkpoint folder to write")
    return p.parse_args(argv)


def main(a: argparse.Namespace) -> None:
    out = write_checkpoint(a.run, a.out, a.sigma_rel, a.step)  # checks every input before reading a weight
    state = read_trainer_state(out)
    info = state["posthoc_ema"]
    print(f"ldmscale-ema: wrote {out} (sigma_rel {a.sigma_rel} at step {state['step']} from "
          f"{len(info['snapshots'])} snapshots; profile fit residual {info['profile_fit_residual']:.2e})")


def cli(argv: list[str] | None = None) -> None:
    run_cli("ldmscale-ema", lambda: main(parse_args(argv)))


if __name__ == "__main__":
    cli()
