"""The data plan on two ranks: rank 0 plans, every rank gets the plan or its error."""

from __future__ import annotations

import datetime
import json
import os
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from ldmscale.config import DataConfig, FilterConfig
from ldmscale.data import StorageError, preflight
from tests.conftest import free_port
from tests.unit.test_preflight import write_plan_shards


def _crash(*args: object) -> tuple[float, int]:
    raise ZeroDivisionError("a bug, not a storage error")


def _rank(rank: int, port: int, cases: list[tuple[str, DataConfig, bool]], out: str) -> None:
    """One process group, several plans: (name, config, whether rank 0 meets a bug) -> out/name/rank{r}.json."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    # a short timeout: a rank left waiting in the broadcast fails the test in seconds, not half an hour
    torch.distributed.init_process_group("gloo", rank=rank, world_size=2, timeout=datetime.timedelta(seconds=20))
    if rank == 1:  # the other ranks must not touch the store at all
        preflight.expand_shard_urls = None  # type: ignore[assignment]
        preflight.count_samples = None  # type: ignore[assignment]
    estimate = preflight.estimate_pass_rate
    for name, cfg, crash in cases:
        if rank == 0:  # rank 0 meets something that is not a StorageError, or not
            preflight.estimate_pass_rate = _crash if crash else estimate  # type: ignore[assignment]
        try:
            plan = preflight.shared_plan(cfg)
            result = {"urls": plan.urls, "epoch": plan.samples_per_epoch}
        except StorageError as e:
            result = {"error": str(e)}
        Path(out, name).mkdir(exist_ok=True)
        Path(out, name, f"rank{rank}.json").write_text(json.dumps(result))
    torch.distributed.destroy_process_group()


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
