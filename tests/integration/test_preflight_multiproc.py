"""The data plan on two ranks: rank 0 plans, every rank gets the plan or its error."""

from __future__ import annotations

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


def _rank(rank: int, port: int, cfgs: dict[str, DataConfig], out: str) -> None:
    """Each config planned in turn by one process group of two ranks; rank r writes out/NAME/rank{r}.json."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.distributed.init_process_group("gloo", rank=rank, world_size=2)
    if rank == 1:  # the other ranks must not touch the store at all
        preflight.expand_shard_urls = None  # type: ignore[assignment]
        preflight.count_samples = None  # type: ignore[assignment]
    for name, cfg in cfgs.items():
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
    mp.start_processes(_rank, args=(free_port(), {"good": good, "bad": bad}, str(tmp_path)), nprocs=2,
                       start_method="spawn")
    got = [json.loads((tmp_path / "good" / f"rank{r}.json").read_text()) for r in range(2)]
    assert got[0] == got[1] and got[1]["epoch"] == 60 and len(got[1]["urls"]) == 4
    errors = [json.loads((tmp_path / "bad" / f"rank{r}.json").read_text()) for r in range(2)]
    assert errors[0] == errors[1] and "no shards found" in errors[1]["error"]
