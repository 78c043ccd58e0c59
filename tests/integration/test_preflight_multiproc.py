"""The data plan on two ranks: rank 0 plans, every rank gets the plan or its error."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch.multiprocessing as mp

from ldmscale.config import DataConfig, FilterConfig
from tests.conftest import free_port
from tests.unit.test_preflight import _rank, write_plan_shards


@pytest.fixture(scope="module")
def shards(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_plan_shards(tmp_path_factory.mktemp("plan"))


def test_rank_zero_plans_and_every_rank_gets_the_plan_or_its_error(shards: Path, tmp_path: Path) -> None:
    good = DataConfig(shards=[str(shards)], filters=FilterConfig(min_caption_chars=10))
    bad = DataConfig(shards=[str(tmp_path / "nothing-here")])
    cases = [("good", good, False), ("bad", bad, False), ("crash", good, True)]
    mp.start_processes(_rank, args=(free_port(), cases, str(tmp_path)), nprocs=2, start_method="spawn")
    got = [json.loads((tmp_path / "good" / f"rank{r}.json").read_text()) for r in range(2)]
    assert got[0] == got[1] and got[1]["epoch"] == 60 and len(got[1]["urls"]) == 4
    errors = [json.loads((tmp_path / "bad" / f"rank{r}.json").read_text()) for r in range(2)]
    assert errors[0] == errors[1] and "no shards found" in errors[1]["error"]
    # anything rank 0 meets reaches every rank as the same one line (the CLIs exit 2 together)
    crashed = [json.loads((tmp_path / "crash" / f"rank{r}.json").read_text()) for r in range(2)]
    assert crashed[0] == crashed[1] and "ZeroDivisionError: a bug, not a storage error" in crashed[1]["error"]
