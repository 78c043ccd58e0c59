"""Fixtures shared by the integration tests."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from tests.conftest import written_once
from tests.runs import finish, start, train_args


@pytest.fixture(scope="session")
def trained_tiny(assets: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A run folder of 2 single-process training steps (ZeRO-0, global batch 4, EMA kept): the trained checkpoint
    that the evaluation tests score and that style step 2 starts from. Trained once per test run (written_once: the
    tier's xdist workers share it); read-only for the tests."""

    def train(root: Path) -> None:
        out = root / "run"
        args = train_args(assets, out, **{"train.max_steps": 2, "train.global_batch_size": 4,
                                          "deepspeed.zero_stage": 0})
        finish(start([sys.executable, "-m", "ldmscale.train", *args], out), out)

    return written_once(tmp_path_factory, "trained_tiny", train) / "run"
