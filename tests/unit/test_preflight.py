"""The data plan: made by rank 0 with retries, the filters' pass rate measured, shared with every rank."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from ldmscale.config import DataConfig, FilterConfig
from ldmscale.data import preflight
from ldmscale.data.shard_writer import ShardSample, write_laion_shards


def write_plan_shards(root: Path) -> Path:
    """4 shards x 25 samples; 2 in 5 captions are 3 characters long, the rest 20."""
    img = Image.fromarray(np.zeros((8, 8, 3), dtype=np.uint8))
    write_laion_shards([ShardSample(img, "abc" if i % 5 < 2 else "x" * 20) for i in range(100)], root,
                       samples_per_shard=25, progress=False)
    return root


@pytest.fixture(scope="module")
def shards(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_plan_shards(tmp_path_factory.mktemp("plan"))


def test_the_epoch_is_sized_by_the_samples_that_pass_the_filters(shards: Path) -> None:
    plan = preflight.plan_data(DataConfig(shards=[str(shards)], filters=FilterConfig(min_caption_chars=10)))
    assert len(plan.urls) == 4 and plan.in_shards == 100
    assert plan.pass_rate == pytest.approx(0.6) and plan.samples_per_epoch == 60
    assert "100 samples in the shards, ~60.0% pass data.filters" in plan.summary()


def test_transient_errors_are_retried_and_permanent_ones_are_not() -> None:
    from botocore.exceptions import ClientError

    calls: list[int] = []
    slow_down = ClientError({"Error": {"Code": "SlowDown", "Message": "Please reduce your request rate."},
                             "ResponseMetadata": {"HTTPStatusCode": 503}}, "HeadObject")

    def throttled() -> str:
        calls.append(1)
        if len(calls) < 3:
            raise OSError("HEAD failed") from slow_down  # as s3fs wraps botocore's error
        return "ok"

    assert preflight.with_retries(throttled, "x", base_delay=0.01) == "ok" and len(calls) == 3
    for permanent in (FileNotFoundError("no such shard"), ConnectionRefusedError("wrong endpoint")):
        calls.clear()

        def fails(e: Exception = permanent) -> None:
            calls.append(1)
            raise e

        with pytest.raises(type(permanent)):
            preflight.with_retries(fails, "x", base_delay=0.01)
        assert len(calls) == 1
