"""Mistakes a new user makes, each a one-line error before any process group, exit 2 (no traceback)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO, tiny_overrides, train_env

TINY = REPO / "configs/tiny.yaml"


def _run(cmd: list[str], env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    # port 1 would fail loudly if a process group were attempted
    env = {**train_env(), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "1", **(env or {})}
    return subprocess.run([sys.executable, *cmd], capture_output=True, text=True, env=env, timeout=180, cwd=REPO)


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
        expected = "ldmscale-sample: checkpoint error: " + f"{tmp_path / 'photos'} is not a checkpoint"
    r = _run(cmd, env)
    assert r.returncode == 2, r.stderr[-3000:]
    lines = [ln for ln in r.stderr.splitlines() if expected in ln]
    assert len(lines) == 1 and "Traceback" not in r.stderr, r.stderr[-3000:]
    assert not (tmp_path / "run" / "log.jsonl").exists()




def test_cli_reports_config_error_before_starting(assets: Path, tmp_path: Path) -> None:
    """The CLI exits 2 with the message and never reaches process-group setup (no port, no DeepSpeed)."""
    cmd = [sys.executable, "-m", "ldmscale.train", "--config", str(TINY), *tiny_overrides(assets, tmp_path),
           "deepspeed.zero_stage=5"]
    env = train_env() | {"MASTER_PORT": "1"}  # port 1 would fail loudly if a process group were attempted
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=120)
    assert r.returncode == 2
    assert "config error: deepspeed.zero_stage=5 is not allowed" in r.stderr
    assert not (tmp_path / "config.yaml").exists()
