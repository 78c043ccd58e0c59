"""Resume at scale, at the loader: bounded replay, shard retries replayed as decided, malformed metadata and
oversized members skipped, and the rest of an epoch re-divided exactly among a different number of ranks."""

from __future__ import annotations

import io
import json
import tarfile
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image
from webdataset.gopen import gopen_schemes

from ldmscale.config import DataConfig, FilterConfig
from ldmscale.data import ResumableLoader, StorageError
from ldmscale.data.shard_writer import ShardSample, write_laion_shards
from ldmscale.data.stream import seeded, source_shards

BYTES: Counter[str] = Counter()  # bytes read per scheme by the openers below (num_workers=0: this process)
BREAK_ONCE: dict[str, int] = {}  # path -> byte offset where its first read breaks (a transient fault)


class _Counting(io.RawIOBase):
    def __init__(self, path: str, scheme: str) -> None:
        self.f, self.scheme = open(path, "rb"), scheme
        self.path, self.pos = path, 0
        self.limit = BREAK_ONCE.get(path) if scheme == "flaky" else None

    def readinto(self, b: Any) -> int:
        if self.limit is not None and self.pos + len(b) > self.limit:
            BREAK_ONCE.pop(self.path, None)  # once: a reopened stream reads on
            raise ConnectionResetError("connection reset by peer (injected)")
        n = self.f.readinto(b)
        self.pos += n
        BYTES[self.scheme] += n
        return n

    def readable(self) -> bool:
        return True

    def close(self) -> None:
        self.f.close()
        super().close()


def _opener(scheme: str) -> Any:
    def gopen(url: str, mode: str = "rb", bufsize: int = 8192, **kw: Any) -> Any:
        return io.BufferedReader(_Counting(url.split("://", 1)[1], scheme), buffer_size=4096)
    return gopen


gopen_schemes["count"] = _opener("count")
gopen_schemes["flaky"] = _opener("flaky")


def _samples(n: int, seed: int) -> list[ShardSample]:
    rng = np.random.default_rng(seed)
    return [ShardSample(Image.fromarray(rng.integers(0, 255, (24, 24, 3), dtype=np.uint8)), f"caption {seed} {i}")
            for i in range(n)]


@pytest.fixture(scope="module")
def shards(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    """Eight shards of 20 samples (160 keys, all distinct)."""
    root = tmp_path_factory.mktemp("eight")
    return write_laion_shards(_samples(160, 0), root, samples_per_shard=20, progress=False)


def _loader(urls: list[str], rank: int = 0, world: int = 1, workers: int = 1, **kw: Any) -> ResumableLoader:
    """in_process: no DataLoader workers (one role), so the openers' counters and faults live in this process."""
    dc = DataConfig(shards=urls, resolution=16, num_workers=0 if kw.pop("in_process", False) else workers,
                    shuffle_buffer=8, max_failed_shards=kw.pop("max_failed_shards", 0.1))
    return ResumableLoader(dc, None, seed=5, rank=rank, world=world, micro_batch=4, samples_per_epoch=160,
                           global_batch=kw.pop("global_batch", 16), urls=urls, **kw)


def _keys(loader: ResumableLoader, n: int) -> list[list[str]]:
    return [next(loader)["keys"] for _ in range(n)]


@pytest.mark.parametrize("stop", [4, 34])
def test_resume_reads_only_the_open_shards(shards: list[Path], stop: int) -> None:
    urls = [f"count://{p}" for p in shards]
    largest = max(p.stat().st_size for p in shards)
    reference = _keys(_loader(urls, in_process=True), 40)
    first = _loader(urls, in_process=True)
    BYTES.clear()
    assert _keys(first, stop) == reference[:stop]
    read_before = BYTES["count"]
    saved = json.loads(json.dumps(first.state_dict()))
    resumed = _loader(urls, in_process=True)
    note = resumed.load_state_dict(saved)
    BYTES.clear()
    assert _keys(resumed, 1) == reference[stop : stop + 1]
    # one 8-sample shuffle block spans at most two 20-sample shards: those are all a resume reads again
    assert BYTES["count"] <= 2 * largest + 4096
    cost = resumed.resume_cost()
    assert f"{cost['shards_skipped']} shards skipped" in note
    if stop == 34:  # late in the epoch: a replay from the start would read ~6 shards again
        assert read_before > 5 * largest and cost["shards_skipped"] >= 5
    assert _keys(resumed, 40 - stop - 1) == reference[stop + 1 :]  # and the continuation stays exact


def test_a_transient_shard_fault_is_retried_later_and_replayed_as_decided(shards: list[Path]) -> None:
    urls = [f"flaky://{p}" for p in shards]
    order = source_shards(len(urls), 5, 0, (0, 1, 0, 1))
    seeded(5, 0, 0, 1, 0, 1, 0).shuffle(order)  # the epoch's first cycle, as stream.py orders it
    v = order[1]  # read early, so retrying its rest at the cycle's end moves it
    victim = str(shards[v])
    BREAK_ONCE.clear()
    clean = [k for b in _keys(_loader(urls, in_process=True), 40) for k in b]
    BREAK_ONCE[victim] = shards[v].stat().st_size // 2  # breaks mid-shard, once
    ref_loader = _loader(urls, in_process=True)
    reference = _keys(ref_loader, 40)
    assert ref_loader.dropped_counts().get("shard_retry") == 1 and not BREAK_ONCE
    assert [k for b in reference for k in b] != clean  # the retry moved the shard's rest later in the epoch
    assert Counter(k for b in reference for k in b) == Counter(clean)  # but lost or repeated nothing
    clean_batches = _keys(_loader(urls, in_process=True), 40)
    outcomes = Counter()
    for stop in range(2, 40, 3):
        BREAK_ONCE[victim] = shards[v].stat().st_size // 2
        first = _loader(urls, in_process=True)
        _keys(first, stop)
        happened = victim not in BREAK_ONCE  # the read (with its look-ahead) broke before the save
        state = first.state_dict()
        BREAK_ONCE.clear()  # the fault is gone when the job comes back
        resumed = _loader(urls, in_process=True)
        resumed.load_state_dict(json.loads(json.dumps(state)))
        expected = reference if happened else clean_batches
        assert _keys(resumed, 40 - stop) == expected[stop:], stop
        outcomes[happened] += 1
    assert outcomes[True] and outcomes[False]


def test_too_many_failed_shards_stop_the_run_with_the_limit_named(tmp_path: Path, shards: list[Path]) -> None:
    (tmp_path / "broken.tar").write_bytes(b"not a tar" * 50)
    urls = [str(p) for p in shards[:3]] + [str(tmp_path / "broken.tar")]
    loader = _loader(urls, in_process=True, max_failed_shards=0.0)
    _keys(loader, 15)  # the worker goes on without the broken shard; the job-wide budget is the trainer's call
    assert loader.dropped_counts()["shard_error"] == 1
    with pytest.raises(StorageError, match=r"1 of the 4 shards.*data.max_failed_shards=0 allows \(0 shards\)"):
        loader.check_failure_budget(loader.dropped_counts())


def _member_tar(path: Path, samples: dict[str, dict[str, bytes]]) -> None:
    with tarfile.open(path, "w") as tar:
        for key, members in samples.items():
            for ext, payload in members.items():
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(payload)
                tar.addfile(info, io.BytesIO(payload))


def test_malformed_json_and_oversized_members_are_counted_not_fatal(tmp_path: Path) -> None:
    buf = io.BytesIO()
    Image.new("RGB", (40, 40), (9, 9, 9)).save(buf, "JPEG")
    jpg, big = buf.getvalue(), b"\xff" * 50_000
    meta = {"original_width": 64, "original_height": 64}
    samples = {  # first in the shard, so the epoch's only shuffle block is filled after them
        "000000100": {"jpg": jpg, "txt": b"w", "json": json.dumps({**meta, "original_width": "64"}).encode()},
        "000000101": {"jpg": jpg, "txt": b"l", "json": b"[1, 2]"},
        "000000102": {"jpg": big, "txt": b"big", "json": json.dumps(meta).encode()},
        **{f"{i:09d}": {"jpg": jpg, "txt": b"ok", "json": json.dumps(meta).encode()} for i in range(6)},
    }
    _member_tar(tmp_path / "00000.tar", samples)
    dc = DataConfig(shards=[str(tmp_path / "00000.tar")], resolution=16, num_workers=0, shuffle_buffer=6,
                    filters=FilterConfig(min_width=32), max_member_bytes=10_000)
    loader = ResumableLoader(dc, None, seed=0, rank=0, world=1, micro_batch=3, samples_per_epoch=6)
    keys = {k for _ in range(loader.batches_per_epoch) for k in next(loader)["keys"]}
    assert keys == {f"{i:09d}" for i in range(6)}
    assert loader.dropped_counts() == {"bad_json": 2, "too_large": 1}


def _run_keys(urls: list[str], world: int, workers: int, batches: int, start: list[dict] | None = None,
              save_at: int | None = None) -> tuple[list[list[str]], list[dict]]:
    """Keys each rank sees in `batches` micro-batches, and every rank's position after them (after `save_at` batches
    if given: a position saved mid-run, as the trainer saves one and goes on)."""
    keys, states = [], []
    for rank in range(world):
        loader = _loader(urls, rank=rank, world=world, workers=workers)
        if start is not None:
            loader.load_state_dict(json.loads(json.dumps(start)))
        rank_keys: list[str] = []
        for i in range(batches):
            if i == save_at:
                states.append(json.loads(json.dumps(loader.state_dict())))
            rank_keys += next(loader)["keys"]
        keys.append(rank_keys)
        if save_at is None:
            states.append(loader.state_dict())
    return keys, states


FRESH: dict[tuple, list[list[str]]] = {}  # (world, workers, batches) -> keys of a fresh run; cases share them


def _fresh_keys(urls: list[str], world: int, workers: int, batches: int) -> list[list[str]]:
    """The keys of a fresh run's first `batches` micro-batches per rank (a longer run's prefix when there is one)."""
    for (w, k, n), keys in FRESH.items():
        if (w, k) == (world, workers) and n >= batches:
            return [r[: 4 * batches] for r in keys]
    FRESH[(world, workers, batches)] = _run_keys(urls, world, workers, batches)[0]
    return FRESH[(world, workers, batches)]


@pytest.mark.parametrize(("before", "after"), [((1, 2), (2, 2)), ((2, 2), (1, 2)), ((2, 1), (2, 3))],
                         ids=["1x2->2x2", "2x2->1x2", "workers1->3"])
def test_the_rest_of_an_epoch_is_re_divided_each_sample_once(shards: list[Path], before: tuple, after: tuple) -> None:
    urls = [str(p) for p in shards]
    (w0, k0), (w1, k1) = before, after
    per_rank = 160 // 4 // w0  # batches of 4 per rank in the 10-step epoch (global batch 16)
    stop = per_rank * 3 // 10  # 3 of 10 steps
    # the uninterrupted epoch and the next one's first batch, each rank's position saved after `stop` batches
    reference, states = _run_keys(urls, w0, k0, per_rank + 1, save_at=stop)
    FRESH.setdefault((w0, k0, per_rank + 1), reference)  # the next case's fresh run on these ranks and workers
    reference = [r[: 4 * per_rank] for r in reference]
    epoch = Counter(k for r in reference for k in r)
    assert len(epoch) == 160 and set(epoch.values()) == {1}  # the uninterrupted epoch: every sample once
    seen = [r[: 4 * stop] for r in reference]
    rest, after_states = _run_keys(urls, w1, k1, 160 // 4 // w1 - stop * w0 // w1, start=states)
    got = Counter(k for r in seen + rest for k in r)
    assert got == epoch  # no repeat, no skip
    assert {s["epoch"] for s in after_states} == {0} and all(s["given"] == s["epoch_samples"] for s in after_states)
    nxt, _ = _run_keys(urls, w1, k1, 1, start=after_states)  # then the next epoch starts as a fresh run's does
    fresh = _fresh_keys(urls, w1, k1, 160 // 4 // w1 + 1)
    assert nxt == [r[-4:] for r in fresh]
