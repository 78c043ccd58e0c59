"""The undecoded stream of one *source* (one (rank, worker role) split of an epoch's shards), with a cursor
small enough to checkpoint and cheap to resume from.

    shards of the source, reshuffled per cycle -> tar members (size cap) -> samples -> filters (count and skip)
    -> shuffle blocks of `shuffle_buffer` samples, each permuted with its own seed -> filtered raw samples

Why blocks and not webdataset's reservoir buffer: a reservoir's state is the samples it holds, which can come
from any shard read so far; a resume would have to replay the stream from the epoch's start to rebuild it.
A block's state is where it began (a shard index and a member offset in it) plus how many of its samples
were taken, so a resume reopens only the shards the current block spans and skips members it already read:
no decode, and bytes bounded by the open shards whatever the position in the epoch. `skip(n)` passes over
samples without decoding them (whole blocks without even shuffling them): what a re-divided epoch uses to
start inside another worker's stream.

A shard that fails (after the reader's own retries) goes to the end of the cycle and is read again from
where it broke; a second failure drops it for the epoch (`shard_error`). A missing shard (a number absent
from a brace pattern) is dropped at once (`shard_missing`). Every failure is logged in the cursor with its
offset, so a replay makes the same decision even when the fault was transient. How many dropped shards a
job tolerates is decided over all ranks (loader.py, data.max_failed_shards), not here.
"""

from __future__ import annotations

import copy
import itertools
import json
import logging
import random
import tarfile
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import fsspec
from webdataset.tariterators import group_by_keys

from ldmscale.config import DataConfig, StyleConfig
from ldmscale.data.captions import caption_of
from ldmscale.data.filters import IMAGE_EXTS, reject_reason
from ldmscale.data.storage import open_shard, storage_options_for

log = logging.getLogger(__name__)

Split = tuple[int, int, int, int]  # (rank, world, role, workers): the split of a source's shards a stream reads
MAX_SHARD_ATTEMPTS = 2  # a failed shard is retried once, at the end of its cycle
MISSING = -1  # the offset logged for a shard that does not exist: dropped at once, and so on a replay
OVERSIZE = None  # the payload of a tar member above the size cap (never read, never decoded)


def seeded(*parts: int) -> random.Random:
    """An RNG that is a pure function of its integer parts. Seeded from their decimal text, which Random hashes
    with SHA-512: hash() of a tuple maps -1 and -2 alike, so streams keyed by them would coincide."""
    return random.Random("ldmscale/" + "/".join(str(int(p)) for p in parts))


def source_shards(n_urls: int, seed: int, epoch: int, src: Split) -> list[int]:
    """The shard indices of a split for an epoch: seeded shuffle, split by rank, then by worker role. A source with
    fewer shards than ranks x workers (a small set in a mixture) gives each split one shard, shared (shard_stride)."""
    rank, world, role, workers = src
    order = list(range(n_urls))
    seeded(seed, epoch).shuffle(order)
    if n_urls < world * workers:
        return [order[(rank + world * role) % n_urls]]
    return order[rank::world][role::workers]


def shard_stride(n_urls: int, src: Split) -> tuple[int, int]:
    """(phase, stride): the raw samples of its shard a split reads, every stride-th from the phase-th. 1 of 1 unless
    the source has fewer shards than ranks x workers: then split p = rank + ranks x role reads shard p mod n, shared
    by the splits p, p + n, p + 2n, ... each taking its own residue of the shard's samples (the shard's bytes are
    read by each of them: a source worth reading often should have a shard per worker)."""
    rank, world, role, workers = src
    splits = world * workers
    if n_urls >= splits:
        return 0, 1
    p = rank + world * role
    return p // n_urls, len(range(p % n_urls, splits, n_urls))


def shards_for(urls: list[str], seed: int, epoch: int, rank: int, world: int, role: int, workers: int) -> list[str]:
    """The URLs of source (rank, world, role, workers) for an epoch, in its order (ldmscale-encode splits so)."""
    return [urls[i] for i in source_shards(len(urls), seed, epoch, (rank, world, role, workers))]


def _int_keys(d: dict[Any, list[int]]) -> dict[int, list[int]]:
    return {int(k): [int(x) for x in v] for k, v in d.items()}


@dataclass
class StreamState:
    """Where a stream stands between two shuffle blocks."""

    cycle: int = -1  # passes over the source's shards started (a worker cycles as often as its quota needs)
    queue: list[list[int]] = field(default_factory=list)  # [shard index, raw samples read from it] left this cycle
    failures: dict[int, list[int]] = field(default_factory=dict)  # shard -> offsets where its reads broke
    counts: dict[str, int] = field(default_factory=dict)  # samples dropped so far, by reason
    kept: int = 0  # samples that passed the filters in this cycle
    block: int = 0  # shuffle blocks started

    def to_dict(self) -> dict[str, Any]:
        return {"cycle": self.cycle, "queue": [list(q) for q in self.queue],
                "failures": {str(k): list(v) for k, v in self.failures.items()}, "counts": dict(self.counts),
                "kept": self.kept, "block": self.block}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> StreamState:
        return cls(cycle=int(d["cycle"]), queue=[[int(i), int(o)] for i, o in d["queue"]],
                   failures=_int_keys(d["failures"]), counts={k: int(v) for k, v in d["counts"].items()},
                   kept=int(d["kept"]), block=int(d["block"]))


@dataclass
class StreamCursor:
    """A stream's position after any sample: the current block's start, the samples taken from it, and every
    failure so far this epoch (offsets where a shard read broke, so a replay makes the same decisions)."""

    start: StreamState
    taken: int = 0
    failures: dict[int, list[int]] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"start": self.start.to_dict(), "taken": self.taken,
                "failures": {str(k): list(v) for k, v in self.failures.items()}}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> StreamCursor:
        return cls(start=StreamState.from_dict(d["start"]), taken=int(d["taken"]), failures=_int_keys(d["failures"]))


def resume_cost(cursor: StreamCursor | None, split_size: int) -> dict[str, int]:
    """What resuming a source from `cursor` costs, against replaying its epoch from the start: shards not
    read again, shards reopened (the current block's first one), raw samples read and thrown away."""
    if cursor is None:
        return {"shards_skipped": 0, "shards_reopened": 0, "samples_replayed": 0}
    start = cursor.start
    skipped_raw = start.queue[0][1] if start.queue else 0
    done = max(0, start.cycle) * split_size + (split_size - len(start.queue) if start.cycle >= 0 else 0)
    return {"shards_skipped": max(0, done), "shards_reopened": int(bool(skipped_raw or cursor.taken)),
            "samples_replayed": skipped_raw + cursor.taken}


class FailedShard(RuntimeError):
    """A replay reached the offset where the original run's read of this shard failed."""


class ShortShard(RuntimeError):
    """A shard ended before the sample count its `_stats.json` gives: a tar cut at a member boundary reads
    without any tar error, so only the count tells."""


def listed_samples(url: str, storage_options: dict | None) -> int | None:
    """The samples a shard holds by its img2dataset-style `NNNNN_stats.json` (`successes`); None without one."""
    if not url.endswith(".tar"):
        return None
    stats_url = url[: -len(".tar")] + "_stats.json"
    try:
        with fsspec.open(stats_url, "rt", **storage_options_for(stats_url, storage_options)) as f:
            return int(json.load(f)["successes"])
    except Exception:  # no stats file (shards written by other tools): nothing to compare against
        return None


def check_shard_length(url: str, seen: int, storage_options: dict | None) -> None:
    """Raise ShortShard when a shard read to its end held fewer samples than its stats file lists."""
    listed = listed_samples(url, storage_options)
    if listed is not None and seen < listed:
        raise ShortShard(f"{url} ended after {seen} of the {listed} samples its _stats.json lists (truncated)")


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
        # a 10,000-member shard would otherwise keep every TarInfo (members: real, but not in typeshed's TarFile)
        tar.members = []  # type: ignore[attr-defined]


def sample_reason(sample: dict[str, Any], cfg: DataConfig, seed: int = 0) -> str | None:
    """Why a raw sample is dropped before decode; malformed metadata is a reason, never a crash (a crash
    would repeat on every resume, since the replay is deterministic)."""
    if any(v is OVERSIZE for v in sample.values()):
        return "too_large"
    try:
        return reject_reason(sample, cfg.filters, cfg.caption_key, seed)
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
        src: Split,
        cursor: StreamCursor | None = None,
        style: StyleConfig | None = None,
    ) -> None:
        self.cfg, self.urls, self.seed, self.epoch = cfg, urls, seed, epoch
        self.src: Split = (src[0], src[1], src[2], src[3])  # a list when it comes from JSON
        self.style = style if style is not None and style.enabled and style.reference == "metadata" else None
        self.max_member_bytes = cfg.max_member_bytes
        self.stride = shard_stride(len(urls), self.src)
        self.block_size = max(1, cfg.shuffle_buffer)
        cursor = cursor if cursor is not None else StreamCursor(StreamState())
        self._state = copy.deepcopy(cursor.start)  # mutated as the stream advances
        self._log = copy.deepcopy(cursor.failures)  # failures to replay
        self.counts: Counter[str] = Counter(self._state.counts)
        self._block: list[dict[str, Any]] | None = None  # the current shuffle block (None: not built yet)
        self._taken = cursor.taken  # samples taken from it (before it is built: to skip once it is)
        # the cursor's parts that change once per block (a copy of the state where the block began)
        self._cursor = StreamCursor(copy.deepcopy(cursor.start), 0, self._failures())
        self.block_counts: dict[str, int] = dict(self.counts)  # the drop counters as they stand (new per block)
        self._raw = self._filtered()
        self._last_warning = -1e9

    def caption(self, sample: dict[str, Any]) -> str:
        """The caption data.caption_key picks for a sample the filters kept."""
        return caption_of(sample, self.cfg.caption_key, self.seed) or ""

    # ------------------------------------------------------------ position

    def cursor(self) -> StreamCursor:
        """Where the stream stands (cheap: the block's start is copied once per block, not per sample)."""
        return StreamCursor(self._cursor.start, self._taken, self._cursor.failures)

    def _mark_block_start(self) -> None:
        self._state.counts = dict(self.counts)
        self._cursor = StreamCursor(copy.deepcopy(self._state), 0, self._failures())

    def _failures(self) -> dict[int, list[int]]:
        failures = {k: list(v) for k, v in self._log.items()}
        for k, v in self._state.failures.items():  # the longer list: a replay may not have reached them yet
            if len(v) >= len(failures.get(k, [])):
                failures[k] = list(v)
        return failures

    # ------------------------------------------------------------ the stream

    def __iter__(self) -> SourceStream:
        return self

    def __next__(self) -> dict[str, Any]:
        while self._block is None or self._taken >= len(self._block):
            self._next_block()
        self._taken += 1
        return self._block[self._taken - 1]

    def skip(self, n: int) -> None:
        """Pass over the next n samples without decoding them; whole blocks are read but neither kept, shuffled
        nor paired (their samples belong to another worker: only where they end matters)."""
        while n > 0:
            if self._block is not None and self._taken < len(self._block):
                k = min(n, len(self._block) - self._taken)
                self._taken, n = self._taken + k, n - k
            elif n >= self.block_size and (self._block is not None or self._taken == 0):
                if self._block is not None:
                    self._mark_block_start()
                for _ in itertools.islice(self._raw, self.block_size):
                    pass
                self._state.block += 1
                self._block, self._taken, n = None, 0, n - self.block_size
                self._mark_block_start()  # the next block is not built yet: a cursor now starts there
                self.block_counts = dict(self.counts)
            else:
                self._next_block()

    def _next_block(self) -> None:
        resume_taken = self._taken if self._block is None else 0  # a restored cursor inside this block
        if self._block is not None:
            self._mark_block_start()
        start = self._cursor.start
        block = list(itertools.islice(self._raw, self.block_size))
        number = self._state.block
        seeded(self.seed, self.epoch, *self.src, -1, number).shuffle(block)
        if self.style is not None:
            from ldmscale.data.style_refs import pair_by_style

            # within the block: a resume rebuilds the same pairs from the block alone
            block = list(pair_by_style(iter(block), self.style.metadata_key, self.style.pair_window,
                                       seeded(self.seed, self.epoch, *self.src, -2, number), IMAGE_EXTS,
                                       self.counts))
        self._state.block = number + 1
        self._block, self._taken = block, resume_taken
        self._cursor = StreamCursor(start, 0, self._failures())  # with the failures met while reading it
        self.block_counts = dict(self.counts)

    def _filtered(self) -> Iterator[dict[str, Any]]:
        st = self._state
        while True:
            if not st.queue:
                self._new_cycle()
            idx, offset = st.queue[0]
            try:
                for n, sample in self._read(idx, offset):
                    st.queue[0][1] = n + 1
                    reason = sample_reason(sample, self.cfg, self.seed)
                    if reason:
                        self.counts[reason] += 1
                        continue
                    st.kept += 1
                    yield sample
            except Exception as exc:  # a broken shard is data, not a bug: retry it later, then drop it
                self._fail(idx, exc)
                continue
            st.queue.pop(0)

    def _read(self, idx: int, offset: int) -> Iterator[tuple[int, dict[str, Any]]]:
        """(raw index, sample) of shard idx from member-group `offset` on (this split's residue of a shared shard);
        fails where the original run's read failed."""
        attempt = len(self._state.failures.get(idx, []))
        logged = self._log.get(idx, [])
        stop = logged[attempt] if attempt < len(logged) else None
        url = self.urls[idx]
        if stop == MISSING:
            raise FileNotFoundError(f"{url} (missing in the run being resumed)")
        stream = open_shard(url, self.cfg.storage_options)
        try:
            samples = group_by_keys(tar_members(stream, url, self.max_member_bytes))
            phase, stride = self.stride
            seen = 0
            for n, sample in enumerate(samples):
                if stop is not None and n >= stop:
                    break
                seen = n + 1
                if n >= offset and n % stride == phase:
                    yield n, sample
            if stop is not None:
                raise FailedShard(f"{url}: failed at sample {stop} in the run being resumed")
            check_shard_length(url, seen, self.cfg.storage_options)
        finally:
            stream.close()

    def _fail(self, idx: int, exc: Exception) -> None:
        st = self._state
        entry = st.queue.pop(0)
        offsets = st.failures.setdefault(idx, [])
        url = self.urls[idx]
        if isinstance(exc, FileNotFoundError) and entry[1] == 0:  # absent, not broken: no second try
            offsets.append(MISSING)
            self._count("shard_missing", f"{url} does not exist; skipped for this epoch", always=True)
            return
        offsets.append(entry[1])
        if len(offsets) < MAX_SHARD_ATTEMPTS:
            st.queue.append([idx, entry[1]])  # later in the cycle, from where it broke: no repeat, no gap
            self._count("shard_retry", f"{url} failed at sample {entry[1]} ({exc!r}); retrying it later")
            return
        self._count("shard_error", f"{url} failed {len(offsets)} times ({exc!r}); dropped for this epoch", always=True)

    def _dead(self) -> set[int]:
        return {i for i, v in self._state.failures.items() if len(v) >= MAX_SHARD_ATTEMPTS or MISSING in v}

    def _new_cycle(self) -> None:
        """Start the next pass over the source's shards: a worker cycles as often as its quota needs."""
        st = self._state
        if st.cycle >= 0 and st.kept == 0:
            raise RuntimeError(
                f"rank {self.src[0]} worker role {self.src[2]}: a whole pass over its shards yielded no sample "
                f"that passes data.filters (dropped: {dict(self.counts)}); loosen the filters or check the shards"
            )
        dead = self._dead()
        shards = [i for i in source_shards(len(self.urls), self.seed, self.epoch, self.src) if i not in dead]
        if not shards:
            raise RuntimeError(
                f"rank {self.src[0]} worker role {self.src[2]}: every one of its {len(dead)} shards is missing or "
                f"failed twice this epoch ({', '.join(self.urls[i] for i in sorted(dead)[:3])}, ...): the store or "
                f"the shards are broken"
            )
        st.cycle += 1
        st.kept = 0
        seeded(self.seed, self.epoch, *self.src, st.cycle).shuffle(shards)
        st.queue = [[i, 0] for i in shards]

    def _count(self, reason: str, message: str, always: bool = False) -> None:
        self.counts[reason] += 1
        now = time.monotonic()
        if always or now - self._last_warning > 10.0:  # else at most one warning per 10 s per worker
            self._last_warning = now
            log.warning("skipping bad data (%s, %d so far on this worker): %s", reason, self.counts[reason], message)
