"""What building the DeepSpeed engine costs each rank at start-up: `build_engine` (ldmscale.trainer.engine) against
plain `deepspeed.initialize` on the same model and ZeRO config, each in a fresh process (the costs that matter are
first-time imports), alternating, medians of the CPU seconds the call took.

    OMP_NUM_THREADS=1 python tools/bench/engine_start.py --repeats 3 --zero 2

Prints one line per variant and the ratio build_engine / deepspeed.initialize. The difference is what every rank of
every launch pays (DeepSpeed's ZeRO check imports its Muon optimizer, whose torch.compile decorators import
Inductor's compiler).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys

WORKER = """
import json, sys, time, torch, deepspeed
from ldmscale.runtime import dist
from ldmscale.trainer.engine import build_engine
dist.init_distributed()
variant, zero = sys.argv[1], int(sys.argv[2])
torch.manual_seed(0)
model = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.SiLU(), torch.nn.Linear(64, 8))
config = {"train_batch_size": 4, "train_micro_batch_size_per_gpu": 4, "zero_optimization": {"stage": zero},
          "optimizer": {"type": "AdamW", "params": {"lr": 1e-3, "torch_adam": True}}}
start = time.process_time()
if variant == "build_engine":
    build_engine(model, list(model.parameters()), config)
else:
    deepspeed.initialize(model=model, model_parameters=list(model.parameters()), config=config)
print(json.dumps({"cpu_s": time.process_time() - start}))
"""


def _one(variant: str, zero: int) -> float:
    env = {**os.environ, "WANDB_MODE": "disabled", "DS_ACCELERATOR": "cpu"}
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(var, None)
    out = subprocess.run([sys.executable, "-c", WORKER, variant, str(zero)], env=env, capture_output=True,
                         text=True, check=True).stdout
    return float(json.loads(out.strip().splitlines()[-1])["cpu_s"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--zero", type=int, default=2, choices=[0, 1, 2, 3])
    args = parser.parse_args()
    times: dict[str, list[float]] = {"deepspeed.initialize": [], "build_engine": []}
    for _ in range(args.repeats):
        for variant in times:
            times[variant].append(_one(variant, args.zero))
    medians = {variant: statistics.median(values) for variant, values in times.items()}
    for variant, values in times.items():
        each = ", ".join(f"{v:.2f}" for v in values)
        print(f"{variant:22s} ZeRO-{args.zero}: median {medians[variant]:.2f} CPU s  ({each})")
    print(f"ratio build_engine / deepspeed.initialize: {medians['build_engine'] / medians['deepspeed.initialize']:.2f}")


if __name__ == "__main__":
    main()
