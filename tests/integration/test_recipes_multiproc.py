"""Every training recipe at once (logit-normal timesteps, immiscible noise, v-prediction with zero terminal SNR) and
post-hoc EMA, with two DeepSpeed processes under ZeRO-3: a run killed mid-way and resumed is bitwise the one that
never stopped (losses, EMA, post-hoc snapshots written after the resume), and `ldmscale-ema`'s checkpoint feeds
ldmscale-sample, ldmscale-eval and ldmscale-export, whose scheduler keeps the zero-SNR schedule."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.conftest import REPO, SAMPLE_CLI, free_port, tiny_overrides, train_env
from tests.runs import finish, kill_after_step, step_rows

MAX_STEPS = 12
RECIPE = {"model.timestep_sampling": "logit_normal", "model.immiscible": "true",
          "model.prediction_type": "v_prediction", "model.zero_terminal_snr": "true", "model.snr_gamma": 5.0,
          "train.posthoc_ema.sigma_rels": "[0.05,0.1]", "train.posthoc_ema.every": 4, "deepspeed.zero_stage": 3,
          "train.max_steps": MAX_STEPS, "train.ckpt_every": 4, "train.keep_last": 2}


def _start(assets: Path, out: Path) -> subprocess.Popen:
    args = ["--config", str(REPO / "configs/tiny.yaml"), "--resume", "auto", *tiny_overrides(assets, out, **RECIPE)]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={free_port()}",
           "-m", "ldmscale.train", *args]
    log = open(out.parent / f"{out.name}.log", "a")
    return subprocess.Popen(cmd, env=train_env(), stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                            cwd=REPO)


@pytest.fixture(scope="module")
def runs(assets: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("recipes")
    reference, killed = root / "reference", root / "killed"
    ref = _start(assets, reference)
    proc = _start(assets, killed)  # the two runs share the cores
    kill_after_step(proc, killed, 6)  # after the step-4 checkpoint and snapshot, before the next ones
    finish(ref, reference)
    finish(_start(assets, killed), killed)
    return {"reference": reference, "killed": killed, "root": root}


def test_a_resumed_run_is_bitwise_the_uninterrupted_one_with_every_recipe_on(runs: dict[str, Path]) -> None:
    ref, resumed = runs["reference"], runs["killed"]
    assert {r["step"]: r["loss"] for r in step_rows(resumed)} == {r["step"]: r["loss"] for r in step_rows(ref)}
    tag = f"checkpoints/step_{MAX_STEPS:08d}"
    for name in ("ema.safetensors", "posthoc_ema.safetensors"):
        a, b = load_file(str(ref / tag / name)), load_file(str(resumed / tag / name))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name
    # snapshots 8 and 12 were written after the resume, from the profiles the step-4 checkpoint restored
    snaps = sorted(p.name for p in (ref / "posthoc_ema").iterdir())
    assert len(snaps) == 6 and snaps == sorted(p.name for p in (resumed / "posthoc_ema").iterdir())
    for name in snaps:
        a, b = load_file(str(ref / "posthoc_ema" / name)), load_file(str(resumed / "posthoc_ema" / name))
        assert all(torch.equal(a[k], b[k]) for k in a), name


def test_the_reconstructed_ema_samples_evaluates_and_exports_with_the_zero_snr_schedule(
        runs: dict[str, Path], assets: Path) -> None:
    root, env = runs["root"], train_env()
    ema = root / "ema_0.07"
    r = subprocess.run([sys.executable, "-m", "ldmscale.checkpoint.posthoc_cli", str(runs["reference"]),
                        "--sigma-rel", "0.07", "--out", str(ema)], env=env, capture_output=True, text=True, cwd=REPO)
    assert r.returncode == 0 and "at step 12 from 6 snapshots" in r.stdout, r.stderr[-3000:]

    r = subprocess.run([*SAMPLE_CLI, str(ema), "--prompt", "a handwritten digit 3", "--num-images", "2", "--steps",
                        "3", "--out", str(root / "samples")], env=env, capture_output=True, text=True, cwd=REPO)
    assert r.returncode == 0, r.stderr[-3000:]
    assert len(json.loads((root / "samples" / "samples.json").read_text())) == 2

    heldout = str(assets / "digits/heldout")
    r = subprocess.run([sys.executable, "-m", "ldmscale.eval.cli", str(ema), "--prompts", heldout,
                        "--reference", heldout, "--features", "pixels:8", "--num-images", "8",
                        "--guidance", "2", "--steps", "3", "--out", str(root / "eval")],
                       env=env, capture_output=True, text=True, cwd=REPO)
    assert r.returncode == 0, r.stderr[-3000:]
    assert json.loads((root / "eval" / "eval.json").read_text())["step"] == MAX_STEPS

    r = subprocess.run([sys.executable, "-m", "ldmscale.inference.export", str(ema), str(root / "pipe")], env=env,
                       capture_output=True, text=True, cwd=REPO)
    assert r.returncode == 0, r.stderr[-3000:]
    sched = json.loads((root / "pipe" / "scheduler" / "scheduler_config.json").read_text())
    assert sched["rescale_betas_zero_snr"] is True and sched["timestep_spacing"] == "trailing"
    assert sched["prediction_type"] == "v_prediction"
    r = subprocess.run([*SAMPLE_CLI, str(ema), "--weights", "raw", "--prompt", "x", "--out", str(root / "raw")],
                       env=env, capture_output=True, text=True, cwd=REPO)
    assert r.returncode == 2 and "holds EMA weights only" in r.stderr
