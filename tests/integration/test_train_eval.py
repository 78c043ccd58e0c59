"""Evaluation inside training, two ranks (torchrun, gloo): the validation loss (train.eval_every) is logged per
timestep bucket and is bitwise the same after a resume; the sample grid is drawn by both ranks, each its share,
and is the grid one process draws from the same EMA weights (ldmscale-sample)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests.conftest import REPO, SAMPLE_CLI, free_port, tiny_overrides, train_env

VAL_KEYS = {"val/mse_low", "val/mse_mid", "val/mse_high", "val/mse", "val/loss"}


def _train(assets: Path, out: Path, *extra: str) -> None:
    overrides = tiny_overrides(assets, out, **{
        "train.max_steps": 4, "train.ckpt_every": 2, "train.eval_every": 2, "train.eval_samples": 12,
        "data.val_shards": f"[{assets / 'digits/heldout'}]", "train.keep_last": 3})
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={free_port()}",
           "-m", "ldmscale.train", "--config", str(REPO / "configs/tiny.yaml"), *extra, *overrides]
    proc = subprocess.run(cmd, env=train_env(), cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]


def _val(out: Path) -> dict[int, dict]:
    rows = [json.loads(ln) for ln in (out / "log.jsonl").read_text().splitlines()]
    return {r["step"]: {k: r[k] for k in VAL_KEYS} for r in rows if "val/mse" in r}


@pytest.fixture(scope="module")
def runs(assets: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("train_eval")
    _train(assets, root / "full")
    _train(assets, root / "resumed", "--resume", str(root / "full/checkpoints/step_00000002"))
    return {"root": root, "full": root / "full", "resumed": root / "resumed"}


def test_validation_loss_per_bucket_and_the_same_after_resume(runs: dict[str, Path]) -> None:
    full, resumed = _val(runs["full"]), _val(runs["resumed"])
    assert sorted(full) == [2, 4] and sorted(resumed) == [4]
    assert resumed[4] == full[4]  # bitwise: fixed samples, noise and timesteps, exactly resumed weights
    assert full[2] != full[4]  # it measures the weights
    assert len({full[4][k] for k in ("val/mse_low", "val/mse_mid", "val/mse_high")}) == 3


def test_grid_drawn_by_all_ranks_is_the_single_process_grid(runs: dict[str, Path]) -> None:
    """tiny.yaml: 2 prompts x 2 images, 4 steps, DDIM, guidance 7.5; rank 0 drew images 0 and 2, rank 1 1 and 3."""
    grid_dir = runs["full"] / "samples" / "step_00000004"
    ref = runs["root"] / "single"
    subprocess.run([*SAMPLE_CLI, str(runs["full"]), "--prompt", "a handwritten digit 3",
                    "--prompt", "a handwritten digit 7", "--num-images", "2", "--steps", "4", "--out", str(ref)],
                   env=train_env(), cwd=REPO, check=True, capture_output=True)
    got, want = (json.loads((d / "samples.json").read_text()) for d in (grid_dir, ref))
    assert [e["prompt"] for e in got] == [e["prompt"] for e in want]
    for g, w in zip(got, want):
        a = np.asarray(Image.open(grid_dir / g["file"]), dtype=np.int16)
        b = np.asarray(Image.open(ref / w["file"]), dtype=np.int16)
        assert np.abs(a - b).max() <= 1, g["file"]  # batch composition may move a rounding by one level
    events = [json.loads(ln).get("event", "") for ln in (runs["full"] / "log.jsonl").read_text().splitlines()]
    assert any(e.startswith(f"sample grid {grid_dir}") and "images per rank 2+2" in e for e in events)
    images = [np.asarray(Image.open(grid_dir / e["file"])) for e in got]
    assert not np.array_equal(images[0], images[1])  # each index its own noise


def test_loss_curve_png_from_the_log(runs: dict[str, Path]) -> None:
    from ldmscale.eval.curves import plot_curves, read_log

    train, val = read_log(runs["full"])
    assert sorted(train) == [1, 2, 3, 4]
    assert {k: sorted(v) for k, v in val.items()} == {f"val/mse_{b}": [2, 4] for b in ("low", "mid", "high")} | {
        "val/mse": [2, 4]}
    png = plot_curves(runs["full"], runs["root"] / "loss_curve.png")
    with Image.open(png) as img:
        assert img.format == "PNG" and img.size[0] > img.size[1]
