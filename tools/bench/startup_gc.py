"""What a rank saves by importing with the garbage collector paused and then frozen (ldmscale/runtime/startup.py).

Each round starts the same short training run (configs/tiny.yaml on the digit shards and random-init models this
script writes, one rank) twice, in fresh processes, alternating: `python -m ldmscale.train` as shipped, and the
baseline, the same command in an interpreter whose `gc.disable` and `gc.freeze` do nothing (the collector runs as
Python runs it by default). Reports the medians of the CPU seconds each process used (user + system, the run's
whole life: imports, engine, steps, checkpoint, sample grid) and of its wall time.

    OMP_NUM_THREADS=1 python tools/bench/startup_gc.py --repeats 5 --steps 2

Prints one line per variant and the ratio frozen / baseline. Measure with nothing else running: the two variants
share the machine's cores with whatever else runs.
"""

from __future__ import annotations

import argparse
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from ldmscale.demo.digits import write_digit_shards
from ldmscale.models.offline import captions_from_shards, write_offline_models

REPO = Path(__file__).resolve().parents[2]
# the trainer's own entry point, in an interpreter where the two calls that frozen_imports makes are no-ops
BASELINE = ("import gc, runpy, sys; gc.disable = gc.freeze = lambda: None; sys.argv[0] = 'ldmscale.train'; "
            "runpy.run_module('ldmscale.train', run_name='__main__', alter_sys=True)")


def _run(variant: str, args: list[str]) -> tuple[float, float]:
    """One training run in a child process: (CPU seconds of the child, wall seconds)."""
    entry = ["-m", "ldmscale.train"] if variant == "frozen" else ["-c", BASELINE]
    env = {**os.environ, "WANDB_MODE": "disabled", "HF_HUB_OFFLINE": "1", "DS_ACCELERATOR": "cpu",
           "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(var, None)
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    r = subprocess.run([sys.executable, *entry, *args], env=env, cwd=REPO, capture_output=True, text=True)
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if r.returncode != 0 or "FINISHED" not in r.stdout:
        raise SystemExit(f"{variant} run failed:\n{(r.stdout + r.stderr)[-3000:]}")
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return cpu, wall


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--steps", type=int, default=2)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        shards = write_digit_shards(root / "digits", samples_per_shard=200)
        write_offline_models(list(captions_from_shards(shards["train"])), root / "models")
        times: dict[str, list[tuple[float, float]]] = {"baseline": [], "frozen": []}
        for i in range(args.repeats):
            for variant in times:
                out = root / f"run-{variant}-{i}"
                train_args = [
                    "--config", str(REPO / "configs/tiny.yaml"), "--resume", "never", f"train.out_dir={out}",
                    f"data.shards=[{root / 'digits/train'}]", f"model.vae={root / 'models/vae'}",
                    f"model.text_encoder={root / 'models/text_encoder'}",
                    f"model.tokenizer={root / 'models/tokenizer'}", f"train.max_steps={args.steps}",
                    "train.global_batch_size=4", "deepspeed.zero_stage=0"]
                times[variant].append(_run(variant, train_args))
    medians = {v: (statistics.median(c for c, _ in t), statistics.median(w for _, w in t)) for v, t in times.items()}
    for variant, values in times.items():
        each = ", ".join(f"{c:.2f}" for c, _ in values)
        print(f"{variant:9s} {args.steps}-step run: median {medians[variant][0]:.2f} CPU s, "
              f"{medians[variant][1]:.2f} s wall  (CPU s: {each})")
    print(f"ratio frozen / baseline: CPU {medians['frozen'][0] / medians['baseline'][0]:.2f}, "
          f"wall {medians['frozen'][1] / medians['baseline'][1]:.2f}")


if __name__ == "__main__":
    main()
