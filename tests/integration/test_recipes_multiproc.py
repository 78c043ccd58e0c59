"""Every training recipe at once (logit-normal timesteps, immiscible noise, v-prediction with zero terminal SNR) and
post-hoc EMA, with two DeepSpeed processes under ZeRO-3: a copy resumed from the reference's own step-4 checkpoint,
beside the still-running reference, is bitwise the run that never stopped (losses, EMA, post-hoc snapshots written
after the resume), and `ldmscale-ema`'s checkpoint feeds ldmscale-sample, ldmscale-eval and ldmscale-export, whose
scheduler keeps the zero-SNR schedule. (A resume after kill -9 under ZeRO-3: tests/integration/test_multiproc.py.)"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.conftest import REPO, train_env
from tests.runs import (
    cli_in_process,
    finish,
    kill_tree,
    sample_in_process,
    start_training,
    step_rows,
    wait_for_checkpoint,
)

MAX_STEPS = 12
RESUME_AT = 4  # a checkpoint and a post-hoc snapshot every 4 steps
RECIPE = {"model.timestep_sampling": "logit_normal", "model.immiscible": "true",
          "model.prediction_type": "v_prediction", "model.zero_terminal_snr": "true", "model.snr_gamma": 5.0,
          "train.posthoc_ema.sigma_rels": "[0.05,0.1]", "train.posthoc_ema.every": 4, "deepspeed.zero_stage": 3,
          "train.max_steps": MAX_STEPS, "train.ckpt_every": 4,
          "train.keep_last": 3}  # step 4 stays while the copy loads it


@pytest.fixture(scope="module")
def runs(assets: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("recipes")
    reference, resumed = root / "reference", root / "resumed"
    ref = start_training(assets, reference, **RECIPE)
    try:  # the copy starts from the step-4 checkpoint and snapshots; the two runs share the cores
        checkpoint = wait_for_checkpoint(ref, reference, RESUME_AT)
        res = start_training(assets, resumed, resume=str(checkpoint), **RECIPE)
    except BaseException:
        kill_tree(ref.pid)
        raise
    finish(ref, reference)
    finish(res, resumed)
    return {"reference": reference, "resumed": resumed, "root": root}


def test_a_resumed_run_is_bitwise_the_uninterrupted_one_with_every_recipe_on(runs: dict[str, Path]) -> None:
    ref, resumed = runs["reference"], runs["resumed"]
    events = [r.get("event", "") for r in map(json.loads, (resumed / "log.jsonl").read_text().splitlines())]
    assert any(e.startswith(f"resumed from {ref / 'checkpoints'}/step_{RESUME_AT:08d}") for e in events)
    losses = {r["step"]: r["loss"] for r in step_rows(ref) if "loss" in r}
    assert sorted(losses) == list(range(1, MAX_STEPS + 1))
    assert {r["step"]: r["loss"] for r in step_rows(resumed) if "loss" in r} == {
        s: v for s, v in losses.items() if s > RESUME_AT}
    tag = f"checkpoints/step_{MAX_STEPS:08d}"
    for name in ("ema.safetensors", "posthoc_ema.safetensors"):
        a, b = load_file(str(ref / tag / name)), load_file(str(resumed / tag / name))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name
    # snapshots 8 and 12 were written after the resume, from the profiles the step-4 checkpoint restored
    snaps = sorted(p.name for p in (ref / "posthoc_ema").iterdir())
    after = sorted(p.name for p in (resumed / "posthoc_ema").iterdir())
    assert len(snaps) == 6 and after == [n for n in snaps if not n.startswith(f"step_{RESUME_AT:08d}.")]
    for name in after:
        a, b = load_file(str(ref / "posthoc_ema" / name)), load_file(str(resumed / "posthoc_ema" / name))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name


def test_the_reconstructed_ema_samples_evaluates_and_exports_with_the_zero_snr_schedule(
        runs: dict[str, Path], assets: Path, capsys: pytest.CaptureFixture) -> None:
    """ldmscale-ema, -sample and -export run their entry functions in this process; ldmscale-eval, which starts and
    ends a process group, runs in a child process."""
    from ldmscale.checkpoint.posthoc_cli import cli as ema_cli
    from ldmscale.inference.export import cli as export_cli

    root = runs["root"]
    ema = root / "ema_0.07"
    code, out, err = cli_in_process(ema_cli, [str(runs["reference"]), "--sigma-rel", "0.07", "--out", str(ema)],
                                    capsys)
    assert code == 0 and "at step 12 from 6 snapshots" in out, err[-3000:]

    code, err = sample_in_process([str(ema), "--prompt", "a handwritten digit 3", "--num-images", "2", "--steps", "3",
                                   "--out", str(root / "samples")], capsys)
    assert code == 0, err[-3000:]
    assert len(json.loads((root / "samples" / "samples.json").read_text())) == 2

    heldout = str(assets / "digits/heldout")
    r = subprocess.run([sys.executable, "-m", "ldmscale.eval.cli", str(ema), "--prompts", heldout,
                        "--reference", heldout, "--features", "pixels:8", "--num-images", "8",
                        "--guidance", "2", "--steps", "3", "--out", str(root / "eval")],
                       env=train_env(), capture_output=True, text=True, cwd=REPO)
    assert r.returncode == 0, r.stderr[-3000:]
    assert json.loads((root / "eval" / "eval.json").read_text())["step"] == MAX_STEPS

    code, _, err = cli_in_process(export_cli, [str(ema), str(root / "pipe")], capsys)
    assert code == 0, err[-3000:]
    sched = json.loads((root / "pipe" / "scheduler" / "scheduler_config.json").read_text())
    assert sched["rescale_betas_zero_snr"] is True and sched["timestep_spacing"] == "trailing"
    assert sched["prediction_type"] == "v_prediction"
    code, err = sample_in_process([str(ema), "--weights", "raw", "--prompt", "x", "--out", str(root / "raw")], capsys)
    assert code == 2 and "holds EMA weights only" in err
