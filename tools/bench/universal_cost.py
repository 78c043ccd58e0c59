"""What DeepSpeed's universal conversion (ds_to_universal, as ldmscale runs it) costs, measured on a real ZeRO
checkpoint of a U-Net preset written by `--world` ranks, and projected to sd15 at 1,024 ranks.

    OMP_NUM_THREADS=1 python tools/bench/universal_cost.py --preset small --world 2 --zero 3

It saves one checkpoint (torchrun, `--world` CPU ranks), converts it with 1 worker and with `--workers` workers
(side by side, alternating, medians), times the converter child's start alone (its imports: a fixed cost), counts
the files the conversion writes (fragments: one per parameter, optimizer state and rank holding part of it; merged:
one per parameter and state), and prints the cost per file and the projection:

    ZeRO-3 files(R ranks) = tensors x states x R (fragments) + tensors x states (merged)
    ZeRO-1/2 files(R)     ~ (tensors + R) x (states + step) (a rank's partition cuts at most two tensors)
    seconds ~ start + files x (measured seconds per file) / workers
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]

STATES = 3  # fp32 master, exp_avg, exp_avg_sq (ZeRO-3 fragments; ZeRO-1/2 also write a `step` per fragment)

WORKER = """
import sys, torch, deepspeed
from pathlib import Path
from ldmscale.runtime import dist
from ldmscale.models.networks import build_unet
from ldmscale.checkpoint import CheckpointStore
dist.init_distributed()
preset, zero, out = sys.argv[1], int(sys.argv[2]), sys.argv[3]
torch.manual_seed(0)
unet = build_unet(preset, 4, 768 if preset == "sd15" else 32, 8)
ds = {"train_micro_batch_size_per_gpu": 1, "gradient_accumulation_steps": 1, "steps_per_print": 10**9,
      "optimizer": {"type": "AdamW", "params": {"lr": 1e-4, "torch_adam": True}}, "zero_optimization": {"stage": zero}}
engine, *_ = deepspeed.initialize(model=unet, model_parameters=list(unet.parameters()), config=ds)
x = torch.randn(1, 4, 8, 8)
ctx = torch.randn(1, 16, 768 if preset == "sd15" else 32)
engine.backward(engine(x, torch.tensor([10]), encoder_hidden_states=ctx).sample.pow(2).mean())
engine.step()
state = {"step": 1, "world_size": dist.world_size()}
CheckpointStore(Path(out), keep_last=1).save(engine, 1, state, None, "")
"""


def tensors_of(preset: str) -> tuple[int, int]:
    """(parameter tensors, elements) of a U-Net preset, counted on the meta device."""
    import torch

    from ldmscale.models.networks import build_unet

    with torch.device("meta"):
        unet = build_unet(preset, 4, 768 if preset == "sd15" else 32, 64)
    params = list(unet.parameters())
    return len(params), sum(p.numel() for p in params)


def make_checkpoint(preset: str, world: int, zero: int, root: Path) -> Path:
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    script = root.parent / "worker.py"
    script.write_text(WORKER)
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={world}", "--master_port=29671",
           str(script), preset, str(zero), str(root)]
    subprocess.run(cmd, env=env, check=True, capture_output=True, timeout=3600)
    return root / "step_00000001"


def convert(tag_dir: Path, workers: int) -> tuple[float, int]:
    """Seconds of one conversion with `workers` workers, and the files of its output (merged + copied)."""
    from ldmscale.checkpoint.elastic import convert_to_universal
    from ldmscale.checkpoint.store import universal_dir

    shutil.rmtree(universal_dir(tag_dir), ignore_errors=True)
    seconds = convert_to_universal(tag_dir, workers)
    files = sum(len(names) for _, _, names in os.walk(universal_dir(tag_dir)))
    return seconds, files


def child_start_seconds() -> float:
    """The converter child's fixed cost: a Python that imports ds_to_universal and exits."""
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-c", "import deepspeed.checkpoint.ds_to_universal"], check=True,
                   capture_output=True)
    return time.perf_counter() - t0


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="small")
    p.add_argument("--world", type=int, default=2)
    p.add_argument("--zero", type=int, default=3)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--project-ranks", type=int, default=1024)
    args = p.parse_args()
    work = Path(tempfile.mkdtemp(prefix="universal_cost_"))
    try:
        tag_dir = make_checkpoint(args.preset, args.world, args.zero, work / "checkpoints")
        runs: dict[int, list[float]] = {1: [], args.workers: []}
        starts: list[float] = []
        merged_files = 0
        for _ in range(args.repeats):
            starts.append(child_start_seconds())
            for w in runs:
                seconds, merged_files = convert(tag_dir, w)
                runs[w].append(seconds)
        tensors, elements = tensors_of(args.preset)
        fragments = tensors * STATES * args.world if args.zero == 3 else (tensors + args.world) * (STATES + 1)
        files = fragments + tensors * STATES
        start = statistics.median(starts)
        t1, tw = statistics.median(runs[1]), statistics.median(runs[args.workers])
        per_file = max(t1 - start, 0.0) / files
        sd_tensors, sd_elements = tensors_of("sd15")
        r = args.project_ranks
        zero3 = sd_tensors * STATES * r + sd_tensors * STATES  # every tensor split over every rank
        zero2 = (sd_tensors + r) * (STATES + 1) + sd_tensors * STATES
        report = {
            "preset": args.preset, "tensors": tensors, "elements": elements, "world": args.world, "zero": args.zero,
            "files_written": files, "output_files": merged_files, "seconds_child_start": round(start, 2),
            "seconds_1_worker": round(t1, 2), f"seconds_{args.workers}_workers": round(tw, 2),
            "ratio_1_to_n_workers": round(t1 / tw, 2), "seconds_per_file_1_worker": round(per_file, 5),
            "projection_sd15": {
                "tensors": sd_tensors, "elements": sd_elements, "ranks": r,
                "optimizer_state_gb": round(sd_elements * 4 * STATES / 1e9, 1),
                "zero3_files": zero3, "zero3_hours_1_worker": round(zero3 * per_file / 3600, 1),
                "zero3_minutes_32_workers": round(zero3 * per_file / 32 / 60, 1),
                "zero2_files": zero2, "zero2_minutes_1_worker": round(zero2 * per_file / 60, 1)},
        }
        print(json.dumps(report, indent=1))
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
