"""The GPU configuration's options together, on CPU: bf16, SDPA, gradient checkpointing, channels_last
activations, torch.compile (the aot_eager backend: dynamo + AOT autograd, no code generation) and spawn loader
workers, under ZeRO-2 and ZeRO-3.

This is the run that found channels_last weights breaking ZeRO's parameter flattening ("stride(-1) must be 1").
Compiling must not change the math: the compiled run's losses match the eager run's. The two ZeRO stages take the
two compile paths (ldmscale/trainer/stages.py): ZeRO 0-2 compile the network in place, which does not depend on the
world size, so that run has one rank; ZeRO-3 compiles through DeepSpeed's engine around the hooks that gather each
rank's parameter shards, so those runs have two. (Two-rank ZeRO-2 bf16 training: tests/integration/test_zero_paths.py.)
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors import safe_open

from tests.conftest import REPO, free_port, tiny_overrides, train_env

STEPS = 3
GPU_OPTIONS = {
    "deepspeed.precision": "bf16", "model.attention": "sdpa", "model.gradient_checkpointing": "true",
    "model.channels_last": "true", "data.start_method": "spawn", "model.compile_backend": "aot_eager",
    "train.max_steps": STEPS, "train.log_every": 1, "train.ema_decay": 0.9,
}


def _train(assets: Path, out: Path, zero: int, compiled: bool, ranks: int, **changes: object) -> list[float]:
    extra = {**GPU_OPTIONS, "deepspeed.zero_stage": zero, "model.compile": str(compiled).lower(), **changes}
    launcher = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={ranks}",
                f"--master_port={free_port()}"] if ranks > 1 else [sys.executable]
    cmd = [*launcher, "-m", "ldmscale.train", "--config", str(REPO / "configs/tiny.yaml"), "--resume", "never",
           *tiny_overrides(assets, out, **extra)]
    r = subprocess.run(cmd, env=train_env(), cwd=REPO, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0 and f"FINISHED step={STEPS}" in r.stdout, (r.stdout + r.stderr)[-4000:]
    rows = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    losses = [row["loss"] for row in rows if "loss" in row]
    assert len(losses) == STEPS and all(math.isfinite(v) for v in losses)
    return losses


def _ema_names(out: Path) -> list[str]:
    """The parameter names the run's last checkpoint saved its EMA under."""
    with safe_open(out / f"checkpoints/step_{STEPS:08d}/ema.safetensors", "pt") as f:
        return sorted(f.keys())


def test_gpu_options_train_together_compiled_in_place_under_zero2(assets: Path, tmp_path: Path) -> None:
    _train(assets, tmp_path / "compiled", zero=2, compiled=True, ranks=1)
    names = _ema_names(tmp_path / "compiled")
    # compiled in place: the checkpoint names the parameters as an eager run does (no torch.compile wrapper prefix)
    assert names and all(n.startswith("unet.") and "_orig_mod" not in n for n in names)


def test_gpu_options_train_together_under_zero3_and_compile_keeps_the_losses(assets: Path, tmp_path: Path) -> None:
    compiled = _train(assets, tmp_path / "compiled", zero=3, compiled=True, ranks=2)
    # the eager reference forks its loader workers (a spawned one imports torch first): the same samples in the same
    # order either way (tests/integration/test_spawn_workers.py), so the losses must still match
    eager = _train(assets, tmp_path / "eager", zero=3, compiled=False, ranks=2, **{"data.start_method": "fork"})
    assert compiled == pytest.approx(eager, rel=1e-3)
    assert _ema_names(tmp_path / "compiled") == _ema_names(tmp_path / "eager")
