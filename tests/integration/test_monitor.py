"""W&B (offline) gets loss, lr, grad norm, throughput and sample grids; a run resumed after a crash continues the
same run id and logs the steps it replays (W&B keeps only increasing steps: the chart axis is trainer/step)."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

from tests.conftest import REPO, tiny_overrides, train_env
from tests.wandb_records import history

EVERY = 2  # log line, sample grid and checkpoint
STEPS = 2 * EVERY  # the first run; the requeued one resumes from step EVERY and goes on to STEPS + EVERY


def _train(assets: Path, out: Path, steps: int) -> str:
    cmd = [sys.executable, "-m", "ldmscale.train", "--config", str(REPO / "configs/tiny.yaml"),
           *tiny_overrides(assets, out, **{"wandb.mode": "offline", "train.max_steps": steps,
                                           "train.log_every": EVERY, "train.sample_every": EVERY,
                                           "train.ckpt_every": EVERY})]
    r = subprocess.run(cmd, env=train_env() | {"WANDB_MODE": "offline"}, capture_output=True, text=True,
                       timeout=600, cwd=REPO)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    return r.stdout


def test_wandb_offline_run_records_metrics_and_grids_and_continues(assets: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    stdout = _train(assets, out, STEPS)
    assert f"step {STEPS}/{STEPS} | loss" in stdout and "img/s" in stdout  # the console line carries the same figures
    run_id = (out / "wandb_run_id").read_text()
    first = list((out / "wandb").glob(f"offline-run-*-{run_id}/run-{run_id}.wandb"))
    assert len(first) == 1
    rows = {r["trainer/step"]: r for r in history(first[0])}
    assert sorted(rows) == list(range(1, STEPS + 1))
    assert all({"loss", "lr", "grad_norm", "samples_seen"} <= set(r) for r in rows.values())
    assert {"images_per_s", "data_wait_frac"} <= set(rows[EVERY]) and 0 <= rows[EVERY]["data_wait_frac"] <= 1
    grids = [r for r in rows.values() if r.get("samples/_type") == "image-file"]
    assert len(grids) == 2  # steps EVERY and STEPS
    assert all((first[0].parent / "files" / g["samples/path"]).exists() for g in grids)
    first_steps = [r["_step"] for r in history(first[0])]

    # a crash after the last step whose checkpoint was lost: the requeued run resumes from step EVERY and replays
    # the steps after it
    ckpts = out / "checkpoints"
    shutil.rmtree(ckpts / f"step_{STEPS:08d}")
    (ckpts / "latest").write_text(f"step_{EVERY:08d}")
    _train(assets, out, STEPS + EVERY)  # like a requeue: same out_dir, --resume auto
    assert (out / "wandb_run_id").read_text() == run_id
    runs = sorted((out / "wandb").glob(f"offline-run-*-{run_id}/run-{run_id}.wandb"))
    assert len(runs) == 2
    second = history(runs[-1])
    assert sorted({r["trainer/step"] for r in second}) == list(range(EVERY + 1, STEPS + EVERY + 1))  # replayed too
    wandb_steps = [r["_step"] for r in second]
    assert wandb_steps == sorted(wandb_steps) and wandb_steps[0] > max(first_steps)  # so W&B keeps them
