"""Mistakes a new user makes, each a one-line error before any process group, exit 2 (no traceback)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from ldmscale.config import load_config
from ldmscale.trainer.ds_config import build_ds_config
from tests.conftest import REPO, tiny_overrides, train_env

TINY = REPO / "configs/tiny.yaml"


def _run(cmd: list[str], env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    # port 1 would fail loudly if a process group were attempted
    env = {**train_env(), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "1", **(env or {})}
    return subprocess.run([sys.executable, *cmd], capture_output=True, text=True, env=env, timeout=180, cwd=REPO)


@pytest.mark.subprocess
@pytest.mark.parametrize("case", ["workers", "resume", "unet", "sample"])
def test_start_up_mistakes_exit_2_with_one_line(assets: Path, tmp_path: Path, case: str) -> None:
    train = ["-m", "ldmscale.train", "--config", str(TINY), *tiny_overrides(assets, tmp_path / "run")]
    env = None
    if case == "workers":  # 8 shards for 2 ranks x 5 workers
        cmd, env = [*train, "data.num_workers=5"], {"RANK": "0", "WORLD_SIZE": "2", "LOCAL_RANK": "0"}
        expected = "ldmscale-train: data error: 8 shards cannot feed 2 ranks x 5 loader workers"
    elif case == "resume":
        cmd, expected = [*train, "--resume", str(tmp_path / "no/such/dir")], "ldmscale-train: resume error: "
        expected += f"{tmp_path / 'no/such/dir'}: no such checkpoint"
    elif case == "unet":
        cmd, expected = [*train, "model.unet=tinyy"], "config error: model.unet='tinyy' is no preset (tiny"
    else:
        (tmp_path / "photos").mkdir()
        (tmp_path / "photos" / "cat.txt").write_text("not a checkpoint")
        cmd = ["-m", "ldmscale.inference.sample", str(tmp_path / "photos"), "--prompt", "a cat"]
        expected = "ldmscale-sample: " + f"{tmp_path / 'photos'} is not a checkpoint"
    r = _run(cmd, env)
    assert r.returncode == 2, r.stderr[-3000:]
    lines = [ln for ln in r.stderr.splitlines() if expected in ln]
    assert len(lines) == 1 and "Traceback" not in r.stderr, r.stderr[-3000:]
    assert not (tmp_path / "run" / "log.jsonl").exists()


def test_warmup_zero_means_no_warm_up(assets: Path, tmp_path: Path) -> None:
    from deepspeed.runtime.lr_schedules import WarmupCosineLR

    cfg = load_config(TINY, [*tiny_overrides(assets, tmp_path), "optim.warmup_steps=0", "optim.lr=0.01"])
    params = build_ds_config(cfg, 1)["scheduler"]["params"]
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.01)
    sched = WarmupCosineLR(opt, **params)  # DeepSpeed refused warmup_num_steps=0 after the process group was up
    lrs = [opt.param_groups[0]["lr"]]  # what the first optimizer step uses
    for _ in range(3):
        sched.step()
        lrs.append(opt.param_groups[0]["lr"])
    assert lrs[0] == lrs[1] == pytest.approx(0.01) and 0.009 < lrs[3] < lrs[2] < 0.01  # full LR, then cosine
