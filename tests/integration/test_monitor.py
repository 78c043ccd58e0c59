"""W&B (offline) gets loss, lr, grad norm, throughput and sample grids; a run resumed after a crash continues the
same run id and logs the steps it replays (W&B keeps only increasing steps: the chart axis is trainer/step)."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

from tests.conftest import REPO, tiny_overrides, train_env
from tests.wandb_records import history


def _train(assets: Path, out: Path, steps: int) -> str:
    cmd = [sys.executable, "-m", "ldmscale.train", "--config", str(REPO / "configs/tiny.yaml"),
           *tiny_overrides(assets, out, **{"wandb.mode": "offline", "train.max_steps": steps,
                                           "train.sample_every": 5, "train.ckpt_every": 5})]
    r = subprocess.run(cmd, env=train_env() | {"WANDB_MODE": "offline"}, capture_output=True, text=True,
                       timeout=600, cwd=REPO)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    return r.stdout


def test_wandb_offline_run_records_metrics_and_grids_and_continues(assets: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    stdout = _train(assets, out, 10)
    assert "step 10/10 | loss" in stdout and "img/s" in stdout  # the console line carries the same figures
    run_id = (out / "wandb_run_id").read_text()
    first = list((out / "wandb").glob(f"offline-run-*-{run_id}/run-{run_id}.wandb"))
    assert len(first) == 1
    rows = {r["trainer/step"]: r for r in history(first[0])}
    assert sorted(rows) == list(range(1, 11))
    assert all({"loss", "lr", "grad_norm", "samples_seen"} <= set(r) for r in rows.values())
    assert {"images_per_s", "data_wait_frac"} <= set(rows[5]) and 0 <= rows[5]["data_wait_frac"] <= 1
    grids = [r for r in rows.values() if r.get("samples/_type") == "image-file"]
    assert len(grids) == 2  # steps 5 and 10
    assert all((first[0].parent / "files" / g["samples/path"]).exists() for g in grids)
    first_steps = [r["_step"] for r in history(first[0])]

    # a crash after step 10 whose checkpoint was lost: the requeued run resumes from step 5 and replays 6..10
    ckpts = out / "checkpoints"
    shutil.rmtree(ckpts / "step_00000010")
    (ckpts / "latest").write_text("step_00000005")
    _train(assets, out, 15)  # like a requeue: same out_dir, --resume auto
    assert (out / "wandb_run_id").read_text() == run_id
    runs = sorted((out / "wandb").glob(f"offline-run-*-{run_id}/run-{run_id}.wandb"))
    assert len(runs) == 2
    second = history(runs[-1])
    assert sorted({r["trainer/step"] for r in second}) == list(range(6, 16))  # the replayed steps are there
    wandb_steps = [r["_step"] for r in second]
    assert wandb_steps == sorted(wandb_steps) and wandb_steps[0] > max(first_steps)  # so W&B keeps them
