"""The undecoded stream of one *source* (one (rank, worker role) split of an epoch's shards), with a cursor
small enough to checkpoint and cheap to resume from.

    shards of the source, reshuffled per cycle -> tar members (size cap) -> samples -> filters (count and skip)
    -> shuffle blocks of `shuffle_buffer` samples, each permuted with its own seed -> filtered raw samples

Why blocks and not webdataset's reservoir buffer: a reservoir's state is the samples it holds, which can come
from any shard read so far; a resume would have to replay the stream from the epoch's start to rebuild it.
A block's state is where it began (a shard index and a member offset in it) plus how many of its samples
were taken, so a resume reopens only the shards the current block spans and skips members it already read:
no decode, and bytes bounded by the open shards whatever the position in the epoch.

A shard that fails (after the reader's own retries) goes to the end of the cycle and is read again from
where it broke; a second failure drops it for the epoch. Every failure is logged in the cursor with its
offset, so a replay makes the same decision even when the fault was transient.
"""

from __future__ import annotations

import copy
import itertools
import logging
import random
import tarfile
import time
from collections import Counter
from collections.abc import Iterator
from typing import Any

from webdataset.gopen import gopen
from webdataset.tariterators import group_by_keys

from ldmscale.config import DataConfig, StyleConfig
from ldmscale.data.filters import IMAGE_EXTS, reject_reason

log = logging.getLogger(__name__)

Source = tuple[int, int, int, int]  # (rank, world, role, workers) of the split that defines the stream
MAX_SHARD_ATTEMPTS = 2  # a failed shard is retried once, at the end of its cycle
OVERSIZE = None  # the payload of a tar member above the size cap (never read, never decoded)


def seeded(*parts: int) -> random.Random:
    """An RNG that is a pure function of its integer parts (tuple hashes of ints ignore PYTHONHASHSEED)."""
    return random.Random(hash(tuple(parts)) & ((1 << 63) - 1))


def source_shards(n_urls: int, seed: int, epoch: int, src: Source) -> list[int]:
    """The shard indices of a source for an epoch: seeded shuffle, split by rank, then by worker role."""
    rank, world, role, workers = src
    order = list(range(n_urls))
    seeded(seed, epoch).shuffle(order)
    return order[rank::world][role::workers]


def shards_for(urls: list[str], seed: int, epoch: int, rank: int, world: int, role: int, workers: int) -> list[str]:
    """The URLs of source (rank, world, role, workers) for an epoch, in its order (ldmscale-encode splits so)."""
    return [urls[i] for i in source_shards(len(urls), seed, epoch, (rank, world, role, workers))]


def resume_cost(cursor: dict[str, Any] | None, split_size: int) -> dict[str, int]:
    """What resuming a source from `cursor` costs, against replaying its epoch from the start: shards not
    read again, shards reopened (the current block's first one), raw samples read and thrown away."""
    if not cursor:
        return {"shards_skipped": 0, "shards_reopened": 0, "samples_replayed": 0}
    start, taken = cursor["start"], int(cursor.get("taken", 0))
    queue = start["queue"]
    skipped_raw = queue[0][1] if queue else 0
    done = max(0, start["cycle"]) * split_size + (split_size - len(queue) if start["cycle"] >= 0 else 0)
    return {"shards_skipped": max(0, done), "shards_reopened": int(bool(skipped_raw or taken)),
            "samples_replayed": skipped_raw + taken}


class FailedShard(RuntimeError):
    """A replay reached the offset where the original run's read of this shard failed."""


def tar_members(stream: Any, url: str, max_bytes: int) -> Iterator[dict[str, Any]]:
    """Regular members of a tar stream as webdataset file records; members above max_bytes are not read
    (their payload is OVERSIZE, so the sample is dropped as `too_large` before anything decodes it)."""
    tar = tarfile.open(fileobj=stream, mode="r|*")
    for info in tar:
        if not info.isreg() or info.name.startswith("__"):
            continue
        big = max_bytes > 0 and info.size > max_bytes
        data = OVERSIZE if big else tar.extractfile(info).read()  # type: ignore[union-attr]
        yield {"fname": info.name, "data": data, "__url__": url}
        tar.members = []  # a 10,000-member shard would otherwise keep every TarInfo


def sample_reason(sample: dict[str, Any], cfg: DataConfig) -> str | None:
    """Why a raw sample is dropped before decode; malformed metadata is a reason, never a crash (a crash
    would repeat on every resume, since the replay is deterministic)."""
    if any(v is OVERSIZE for v in sample.values()):
        return "too_large"
    try:
        return reject_reason(sample, cfg.filters)
    except Exception:  # a width given as a string, a list instead of an object, ...
        return "bad_json"


class SourceStream:
    """Iterates filtered raw samples of one source; `cursor()` after any sample resumes right after it."""

    def __init__(
        self,
        cfg: DataConfig,
        urls: list[str],
        *,
        seed: int,
        epoch: int,
        src: Source,
        cursor: dict[str, Any] | None = None,
        style: StyleConfig | None = None,
    ) -> None:
        self.cfg, self.urls, self.seed, self.epoch, self.src = cfg, urls, seed, epoch, tuple(src)
        self.style = style if style is not None and style.enabled and style.reference == "metadata" else None
        self.max_failed_shards, self.max_member_bytes = cfg.max_failed_shards, cfg.max_member_bytes
        cursor = copy.deepcopy(cursor) if cursor else {}
        start = cursor.get("start") or {"cycle": -1, "queue": [], "failures": {}, "counts": {}, "kept": 0, "block": 0}
        self._state = start  # mutated as the stream advances; its copy at a block's start is the cursor
        self._state["failures"] = {int(k): v for k, v in start["failures"].items()}
        self._log = {int(k): list(v) for k, v in cursor.get("failures", {}).items()}  # failures to replay
        self._taken = int(cursor.get("taken", 0))
        self._block_start: dict[str, Any] = copy.deepcopy(self._state)
        self.counts: Counter[str] = Counter(start["counts"])
        self._last_warning = -1e9

    # ------------------------------------------------------------ position

    def cursor(self) -> dict[str, Any]:
        """Where the stream stands: the current block's start, the samples taken from it, every failure so
        far this epoch (offsets where a shard read broke, so a replay makes the same decisions)."""
        failures = dict(self._log)
        for k, v in self._state["failures"].items():  # the longer list: a replay may not have reached them yet
            failures[k] = v if len(v) >= len(failures.get(k, [])) else failures[k]
        return {"start": copy.deepcopy(self._block_start), "taken": self._taken,
                "failures": {str(k): list(v) for k, v in failures.items()}}

    # ------------------------------------------------------------ the stream

    def __iter__(self) -> Iterator[dict[str, Any]]:
        raw = self._filtered()
        block_size = max(1, self.cfg.shuffle_buffer)
        while True:
            self._block_start = copy.deepcopy(self._state)
            self._block_start["counts"] = dict(self.counts)
            block = list(itertools.islice(raw, block_size))
            number = self._state["block"]
            seeded(self.seed, self.epoch, *self.src, -1, number).shuffle(block)
            if self.style is not None:
                from ldmscale.data.style_refs import pair_by_style

                # within the block: a resume rebuilds the same pairs from the block alone
                block = list(pair_by_style(iter(block), self.style.metadata_key, self.style.pair_window,
                                           seeded(self.seed, self.epoch, *self.src, -2, number), IMAGE_EXTS,
                                           self.counts))
            self._state["block"] = number + 1
            while self._taken < len(block):
                self._taken += 1
                yield block[self._taken - 1]
            self._taken = 0

    def _filtered(self) -> Iterator[dict[str, Any]]:
        st = self._state
        while True:
            if not st["queue"]:
                self._new_cycle()
            idx, offset = st["queue"][0]
            try:
                for sample in self._read(idx, offset):
                    st["queue"][0][1] += 1
                    reason = sample_reason(sample, self.cfg)
                    if reason:
                        self.counts[reason] += 1
                        continue
                    st["kept"] += 1
                    yield sample
            except Exception as exc:  # a broken shard is data, not a bug: retry it later, then drop it
                self._fail(idx, exc)
                continue
            st["queue"].pop(0)

    def _read(self, idx: int, offset: int) -> Iterator[dict[str, Any]]:
        """Samples of shard idx from member-group `offset` on; fails where the original run's read failed."""
        attempt = len(self._state["failures"].get(idx, []))
        logged = self._log.get(idx, [])
        stop = logged[attempt] if attempt < len(logged) else None
        url = self.urls[idx]
        stream = gopen(url)
        try:
            samples = group_by_keys(tar_members(stream, url, self.max_member_bytes))
            for n, sample in enumerate(samples):
                if stop is not None and n >= stop:
                    break
                if n >= offset:
                    yield sample
            if stop is not None:
                raise FailedShard(f"{url}: failed at sample {stop} in the run being resumed")
        finally:
            stream.close()

    def _fail(self, idx: int, exc: Exception) -> None:
        st = self._state
        entry = st["queue"].pop(0)
        offsets = st["failures"].setdefault(idx, [])
        offsets.append(entry[1])
        url = self.urls[idx]
        if len(offsets) < MAX_SHARD_ATTEMPTS:
            st["queue"].append([idx, entry[1]])  # later in the cycle, from where it broke: no repeat, no gap
            self._count("shard_retry", f"{url} failed at sample {entry[1]} ({exc!r}); retrying it later")
            return
        self._count("shard_error", f"{url} failed {len(offsets)} times ({exc!r}); dropped for this epoch", always=True)
        split = source_shards(len(self.urls), self.seed, self.epoch, self.src)
        dropped = sum(len(v) >= MAX_SHARD_ATTEMPTS for v in st["failures"].values())
        if dropped > self.max_failed_shards * len(split):
            raise RuntimeError(
                f"{dropped} of {len(split)} shards of rank {self.src[0]} worker role {self.src[2]} failed twice this "
                f"epoch (limit data.max_failed_shards={self.max_failed_shards}): the store or the shards are "
                f"broken; last: {url}: {exc!r}"
            )

    def _new_cycle(self) -> None:
        """Start the next pass over the source's shards: a worker cycles as often as its batch count needs."""
        st = self._state
        if st["cycle"] >= 0 and st["kept"] == 0:
            raise RuntimeError(
                f"rank {self.src[0]} worker role {self.src[2]}: a whole pass over its shards yielded no sample "
                f"that passes data.filters (dropped: {dict(self.counts)}); loosen the filters or check the shards"
            )
        dead = {i for i, v in st["failures"].items() if len(v) >= MAX_SHARD_ATTEMPTS}
        shards = [i for i in source_shards(len(self.urls), self.seed, self.epoch, self.src) if i not in dead]
        if not shards:
            raise RuntimeError(f"rank {self.src[0]} worker role {self.src[2]}: every shard failed this epoch")
        st["cycle"] += 1
        st["kept"] = 0
        seeded(self.seed, self.epoch, *self.src, st["cycle"]).shuffle(shards)
        st["queue"] = [[i, 0] for i in shards]

    def _count(self, reason: str, message: str, always: bool = False) -> None:
        self.counts[reason] += 1
        now = time.monotonic()
        if always or now - self._last_warning > 10.0:  # else at most one warning per 10 s per worker
            self._last_warning = now
            log.warning("skipping bad data (%s, %d so far on this worker): %s", reason, self.counts[reason], message)
