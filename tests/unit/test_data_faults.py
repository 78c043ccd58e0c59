"""Bad data at scale: a shard missing from a brace pattern is skipped and counted, the budget of failed shards is
the whole job's (not one worker's few shards), and an image that does not decode keeps its place in its
micro-batch, so positions stay exact in samples."""

from __future__ import annotations

import io
import json
import logging
import tarfile
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from ldmscale.config import DataConfig
from ldmscale.data import ResumableLoader, StorageError, preflight
from ldmscale.data.shard_writer import ShardSample, write_laion_shards


@pytest.fixture(scope="module")
def gappy(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, list[str]]:
    """{00000..00008}.tar with 00004 (tar and stats) missing, as in many real LAION downloads; 10 samples each."""
    root = tmp_path_factory.mktemp("gappy")
    rng = np.random.default_rng(1)
    samples = [ShardSample(Image.fromarray(rng.integers(0, 255, (16, 16, 3), dtype=np.uint8)), f"c{i}")
               for i in range(90)]
    write_laion_shards(samples, root, samples_per_shard=10, progress=False)
    for ext in (".tar", "_stats.json", ".parquet"):
        (root / f"00004{ext}").unlink()
    pattern = f"{root}/{{00000..00008}}.tar"
    return pattern, [f"{root}/{i:05d}.tar" for i in range(9)]


def _loader(urls: list[str], rank: int, world: int, **data: Any) -> ResumableLoader:
    dc = DataConfig(shards=urls, resolution=16, num_workers=0, shuffle_buffer=5, **data)
    return ResumableLoader(dc, None, seed=2, rank=rank, world=world, micro_batch=2, samples_per_epoch=60,
                           global_batch=6, urls=urls)


def test_a_missing_shard_is_skipped_counted_and_named_and_the_budget_is_the_jobs(
        gappy: tuple[str, list[str]], caplog: pytest.LogCaptureFixture) -> None:
    """3 ranks hold 3 shards each; the one missing shard is a third of its worker's split (a per-worker 10 % budget
    ended the job) but one of the job's 9 shards: within data.max_failed_shards=0.2 (1 shard)."""
    _, urls = gappy
    counts: Counter[str] = Counter()
    with caplog.at_level(logging.WARNING, logger="ldmscale.data.stream"):
        for rank in range(3):
            loader = _loader(urls, rank, 3, max_failed_shards=0.2)
            for _ in range(loader.batches_per_epoch):
                next(loader)
            counts.update(loader.dropped_counts())
    assert counts["shard_missing"] == 1 and not counts["shard_retry"] and not counts["shard_error"]
    assert any("00004.tar does not exist" in r.getMessage() for r in caplog.records)
    loader.check_failure_budget(counts)  # 1 of 9 shards: within the job's budget, on every rank alike
    counts["shard_error"] += 1
    with pytest.raises(StorageError, match=r"2 of the 9 shards.*max_failed_shards=0.2 allows \(1 shards\)"):
        loader.check_failure_budget(counts)
    assert _loader(urls, 0, 3, max_failed_shards=3.0).failure_budget == 3  # from 1 on: a count


def test_a_resume_counts_the_failures_as_the_run_did(gappy: tuple[str, list[str]]) -> None:
    """The job-wide check sums the ranks' counters: a resumed rank must restore them (and replay the decision)."""
    _, urls = gappy
    rank = next(r for r in range(3) if _epoch_counts(urls, r)["shard_missing"])
    reference = _loader(urls, rank, 3)
    seen = [next(reference)["keys"] for _ in range(reference.batches_per_epoch)]
    for stop in range(1, reference.batches_per_epoch):
        first = _loader(urls, rank, 3)
        for _ in range(stop):
            next(first)
        resumed = _loader(urls, rank, 3)
        resumed.load_state_dict(json.loads(json.dumps(first.state_dict())))
        assert [next(resumed)["keys"] for _ in range(stop, reference.batches_per_epoch)] == seen[stop:]
        assert resumed.dropped_counts() == reference.dropped_counts(), stop


def _epoch_counts(urls: list[str], rank: int) -> dict[str, int]:
    loader = _loader(urls, rank, 3)
    for _ in range(loader.batches_per_epoch):
        next(loader)
    return loader.dropped_counts()


def test_the_plan_tolerates_a_missing_shard_in_a_brace_pattern(gappy: tuple[str, list[str]], tmp_path: Path,
                                                               caplog: pytest.LogCaptureFixture) -> None:
    pattern, urls = gappy
    plan = preflight.plan_data(DataConfig(shards=[pattern]))  # its stats are sampled too: the others size it
    assert len(plan.urls) == 9 and plan.in_shards == 80 * 9 // 8
    first_missing = [urls[4]] + urls[:4] + urls[5:]  # the store check opens the first shard
    with caplog.at_level(logging.WARNING, logger="ldmscale.data.preflight"):
        preflight.check_reachable(first_missing, {})
    assert any("00004.tar does not exist" in r.getMessage() for r in caplog.records)
    with pytest.raises(StorageError, match="no such shard file"):  # a wrong pattern: none of them exist
        preflight.check_reachable([str(tmp_path / f"{i}.tar") for i in range(5)], {})


def _tar(path: Path, samples: list[tuple[str, bytes]]) -> None:
    with tarfile.open(path, "w") as tar:
        for key, jpg in samples:
            for ext, payload in (("jpg", jpg), ("txt", key.encode()), ("json", b"{}")):
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(payload)
                tar.addfile(info, io.BytesIO(payload))


@pytest.fixture(scope="module")
def corrupt(tmp_path_factory: pytest.TempPathFactory) -> str:
    """12 samples, 3 of them not JPEGs: k03, and k07 + k08 in a row."""
    buf = io.BytesIO()
    Image.new("RGB", (20, 20), (200, 10, 10)).save(buf, "JPEG")
    bad = {"k03", "k07", "k08"}
    path = tmp_path_factory.mktemp("corrupt") / "00000.tar"
    _tar(path, [(f"k{i:02d}", b"not a jpeg" if f"k{i:02d}" in bad else buf.getvalue()) for i in range(12)])
    return str(path)


def _stream_loader(url: str, micro: int) -> ResumableLoader:
    dc = DataConfig(shards=[url], resolution=16, num_workers=0, shuffle_buffer=1)  # blocks of 1: stream order
    return ResumableLoader(dc, None, seed=0, rank=0, world=1, micro_batch=micro, samples_per_epoch=12, urls=[url])


def test_an_image_that_does_not_decode_keeps_its_place_in_its_micro_batch(corrupt: str) -> None:
    loader = _stream_loader(corrupt, 4)
    batches = [next(loader)["keys"] for _ in range(3)]
    # each batch is 4 stream samples whatever decodes: a failed one takes the next one of its batch that decoded
    assert batches == [["k00", "k01", "k02", "k00"], ["k04", "k05", "k06", "k04"], ["k09", "k09", "k10", "k11"]]
    assert loader.dropped_counts() == {"decode_error": 3}


def test_a_micro_batch_none_of_whose_images_decode_takes_the_next_that_does(corrupt: str) -> None:
    loader = _stream_loader(corrupt, 1)
    keys = [next(loader)["keys"][0] for _ in range(12)]
    assert keys == ["k00", "k01", "k02", "k04", "k04", "k05", "k06", "k09", "k09", "k09", "k10", "k11"]
    resumed = _stream_loader(corrupt, 1)  # a resume right before the filled batches fills them alike
    first = _stream_loader(corrupt, 1)
    for _ in range(7):
        next(first)
    resumed.load_state_dict(json.loads(json.dumps(first.state_dict())))
    assert [next(resumed)["keys"][0] for _ in range(5)] == keys[7:]
