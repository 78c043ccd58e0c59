"""DataLoader workers started with spawn (the GPU default) resume like forked ones: roles, cursors and openers
travel by pickle."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from ldmscale.data.batches import EpochBatches
from ldmscale.data.shard_writer import write_laion_shards
from tests.unit.test_data_resume import _keys, _loader, _samples


@pytest.fixture(scope="module")
def shards(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    return write_laion_shards(_samples(160, 0), tmp_path_factory.mktemp("eight"), samples_per_shard=20, progress=False)


def test_spawned_workers_resume_like_forked_ones(shards: list[Path]) -> None:
    """The GPU path starts DataLoader workers with spawn: roles, cursors and openers must travel by pickle."""
    urls = [str(p) for p in shards]
    first = _loader(urls, workers=2)
    _keys(first, 7)
    state = json.loads(json.dumps(first.state_dict()))
    expected = _keys(first, 6)
    resumed = _loader(urls, workers=2)
    resumed.load_state_dict(state)
    ds = EpochBatches(resumed.cfg, resumed.urls, None, seed=resumed.seed, epoch=resumed.position.epoch,
                      micro_batch=4, roles=resumed.position.roles, first_batch=resumed.position.batches)
    spawned = iter(torch.utils.data.DataLoader(ds, batch_size=None, num_workers=2, multiprocessing_context="spawn"))
    assert [next(spawned)["keys"] for _ in range(6)] == expected
