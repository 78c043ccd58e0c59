"""What model.immiscible costs per training step: the demo's step (stage.loss + backward + AdamW) with and without
the noise assignment, at batch 64 and 256, runs alternating (A B A B ...) in one process; and the assignment's own
parts (the score matmul on the device, scipy's linear_sum_assignment on the host) at the demo's latent size and at
Stable Diffusion's (4 x 64 x 64).

    python tools/bench/immiscible_bench.py [--batches 64,256] [--repeats 5] [--work /tmp/immiscible_bench]

Prints per batch size the median step time of each mode and their ratio (with / without). On a CPU the host
solve competes with the step for the same cores, so the ratio is an upper bound for that part; on a GPU the step
is far shorter, and what the host solve adds is its own time (printed apart), partly hidden behind the text
encoder that is queued before the host waits (ldmscale/models/immiscible.py).
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment

from ldmscale.config import load_config
from ldmscale.models import immiscible, noise
from ldmscale.trainer.stages import build_stage

REPO = Path(__file__).resolve().parents[2]


def models(work: Path) -> Path:
    """Digit shards and random-init offline models (VAE, text encoder, tokenizer), once."""
    folder = work / "models"
    if not (folder / "vae").exists():
        shards = work / "digits"
        subprocess.run([sys.executable, "tools/make_digit_shards.py", "--out", str(shards)], cwd=REPO, check=True,
                       capture_output=True)
        subprocess.run([sys.executable, "tools/make_offline_models.py", "--shards", str(shards / "train/*.tar"),
                        "--out", str(folder)], cwd=REPO, check=True, capture_output=True)
    return folder


def median_time(fn, repeats: int) -> float:  # type: ignore[no-untyped-def]
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def step_ratio(folder: Path, batch: int, repeats: int) -> tuple[float, float]:
    """Median seconds of the demo's training step without and with model.immiscible, alternating."""
    cfg = load_config(REPO / "configs/demo.yaml", [
        f"model.vae={folder / 'vae'}", f"model.text_encoder={folder / 'text_encoder'}",
        f"model.tokenizer={folder / 'tokenizer'}", f"train.micro_batch_size={batch}",
        f"train.global_batch_size={batch}", "data.shards=[unused]"])
    stage = build_stage(cfg, torch.device("cpu"), torch.float32)
    module = stage.module
    opt = torch.optim.AdamW([p for p in module.parameters() if p.requires_grad], lr=1e-4)
    res = cfg.data.resolution
    g = torch.Generator().manual_seed(0)
    batch_ = {"pixels": torch.randint(0, 256, (batch, 3, res, res), dtype=torch.uint8, generator=g),
              "input_ids": torch.zeros(batch, stage.tokenizer.model_max_length, dtype=torch.long),
              "keys": [str(i) for i in range(batch)]}
    step = [0]

    def train_step() -> None:
        first = step[0] * batch
        loss, _ = stage.loss(module, batch_, range(first, first + batch), step[0])
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        step[0] += 1

    train_step()  # warm-up: first-use allocations, the schedule moved to the device
    off, on = [], []
    for _ in range(repeats):
        for flag, out in ((False, off), (True, on)):
            stage.cfg.model.immiscible = flag
            out.append(median_time(train_step, 1))
    return statistics.median(off), statistics.median(on)


def assignment_parts(batch: int, shape: tuple[int, ...], repeats: int) -> tuple[float, float]:
    """(score matmul seconds, linear_sum_assignment seconds) for one micro-batch of latents of `shape`."""
    latents = torch.randn(batch, *shape, generator=torch.Generator().manual_seed(1))
    eps = noise.randn(0, range(batch), shape, noise.Stream.NOISE)
    scores = immiscible.start(latents, eps).scores.double().numpy()
    matmul = median_time(lambda: immiscible.start(latents, eps), repeats)
    solve = median_time(lambda: linear_sum_assignment(np.ascontiguousarray(scores), maximize=True), repeats)
    return matmul, solve


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batches", default="64,256")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--work", type=Path, default=Path("/tmp/immiscible_bench"))
    a = ap.parse_args(argv)
    folder = models(a.work)
    print(f"torch threads {torch.get_num_threads()}; the demo's step: U-Net small, 32 px, CPU")
    print(f"{'batch':>5} {'step without':>13} {'step with':>10} {'ratio':>6} | {'scores':>9} {'LSA solve':>10} "
          f"(demo latent)  {'scores':>9} {'LSA solve':>10} (SD 4x64x64)")
    for b in (int(x) for x in a.batches.split(",")):
        off, on = step_ratio(folder, b, a.repeats)
        demo = assignment_parts(b, (4, 8, 8), 20)
        sd = assignment_parts(b, (4, 64, 64), 5)
        print(f"{b:>5} {off * 1e3:>11.1f}ms {on * 1e3:>8.1f}ms {on / off:>6.3f} | {demo[0] * 1e3:>7.2f}ms "
              f"{demo[1] * 1e3:>8.2f}ms {'':>14}{sd[0] * 1e3:>7.2f}ms {sd[1] * 1e3:>8.2f}ms", flush=True)


if __name__ == "__main__":
    main()
