"""The data plan of a run, made once per job: rank 0 expands the shard list, checks the store answers, reads
the epoch size and estimates the filters' pass rate (with retries), and broadcasts the result (or the error)
to every rank, so the start-up requests do not grow with the number of ranks (every rank listing, HEADing and
reading stats with one attempt is a storm that one throttling reply ends; docs/results/resume-scale.md).
`rank0_shared` is that pattern for any start-up read (the latent manifest, the validation samples): rank 0 reads
with retries, every rank gets the result or the same error and exits alike."""

from __future__ import annotations

import itertools
import json
import logging
import pickle
import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import fsspec
import torch
from webdataset.gopen import gopen
from webdataset.tariterators import group_by_keys

from ldmscale.config import DataConfig
from ldmscale.data import storage
from ldmscale.data.shardlist import check_shards_reachable, expand_shard_urls
from ldmscale.data.storage import StorageError, is_throttling, storage_options_for
from ldmscale.data.stream import sample_reason, tar_members
from ldmscale.runtime.errors import InputError

log = logging.getLogger(__name__)
T = TypeVar("T")
STATS_SAMPLED = 16  # stats files read to size an epoch (evenly spaced; the mean is scaled up)
PASS_SHARDS = 4  # shards sampled to estimate the share of samples data.filters keeps
PASS_SAMPLES = 256  # raw samples read from the start of each


@dataclass
class DataPlan:
    urls: list[str]
    in_shards: int  # samples the shards hold (img2dataset `successes`, or data.samples_per_epoch when set)
    pass_rate: float  # share of raw samples that pass data.filters, from sampled shards
    samples_per_epoch: int  # what an epoch is sized by: samples that pass the filters
    sampled: int  # raw samples the pass rate was measured on
    given: bool = False  # the epoch size came from data.samples_per_epoch
    note: Any = None  # what plan_data's on_urls check returned (a resume's shard-list note)

    def summary(self) -> str:
        rate = f"~{self.pass_rate:.1%} pass data.filters (of {self.sampled:,} sampled)"
        if self.given:
            return (f"data: {len(self.urls):,} shards, {rate}: "
                    f"epoch = {self.samples_per_epoch:,} (data.samples_per_epoch)")
        return (f"data: {len(self.urls):,} shards, {self.in_shards:,} samples in the shards, {rate}: "
                f"epoch = {self.samples_per_epoch:,} samples")


def with_retries(fn: Callable[[], T], what: str, attempts: int = 5, base_delay: float = 1.0) -> T:
    """fn(), retried with jittered backoff while the store answers that it is busy (throttling, 5xx, resets).
    Anything else (a refused connection, access denied, a missing shard) is a setting to fix: raised at once."""
    for attempt in range(attempts):
        try:
            return fn()
        except Exception as exc:
            transient = getattr(exc, "transient", None)
            if attempt == attempts - 1 or not (transient if transient is not None else is_throttling(exc)):
                raise
            delay = base_delay * 2**attempt * random.uniform(0.5, 1.0)
            log.warning("%s: transient %s (%s); retry %d/%d in %.1fs", what, type(exc).__name__,
                        storage.scrub(str(exc))[:200], attempt + 1, attempts - 1, delay)
            time.sleep(delay)
    raise AssertionError("unreachable")


def _successes(url: str, cfg: DataConfig) -> int | None:
    """img2dataset's `successes` of one shard, or None when its stats file does not exist (a shard missing from
    a brace pattern: the others size the epoch)."""
    stats_url = url[: -len(".tar")] + "_stats.json"

    def read() -> int:
        with fsspec.open(stats_url, "rt", **storage_options_for(stats_url, cfg.storage_options)) as f:
            return int(json.load(f)["successes"])

    try:
        return with_retries(read, stats_url)
    except FileNotFoundError:
        log.warning("sizing the epoch: %s does not exist; sizing by the other sampled shards", storage.scrub(stats_url))
        return None
    except (OSError, KeyError, ValueError) as exc:
        raise ValueError(
            f"cannot count samples: {storage.scrub(stats_url)} is unreadable ({exc}); set data.samples_per_epoch"
        ) from None


def _spaced(urls: list[str], n: int) -> list[str]:
    return urls if len(urls) <= n else [urls[i * len(urls) // n] for i in range(n)]


def estimate_pass_rate(cfg: DataConfig, urls: list[str]) -> tuple[float, int]:
    """(share of raw samples data.filters keeps, samples read), from the first PASS_SAMPLES samples of
    PASS_SHARDS evenly spaced shards. Unreadable sampled shards are skipped; none readable is an error."""
    storage.register_gopen_schemes(cfg.storage_options)
    read = kept = 0
    for url in _spaced(urls, PASS_SHARDS):
        def sample(url: str = url) -> tuple[int, int]:
            stream = gopen(url)
            try:
                got = list(itertools.islice(group_by_keys(tar_members(stream, url, 0)), PASS_SAMPLES))
            finally:
                stream.close()
            return len(got), sum(sample_reason(s, cfg) is None for s in got)

        try:
            n, k = with_retries(sample, url)
        except Exception as exc:  # a broken shard is the loader's business; only sizing is at stake here
            log.warning("pass-rate estimate: skipping %s (%r)", storage.scrub(url), exc)
            continue
        read, kept = read + n, kept + k
    if read == 0:
        raise StorageError(f"none of the sampled shards ({storage.scrub(urls[0])}, ...) could be read to estimate "
                           f"how many samples pass data.filters; check data.shards")
    return kept / read, read


def count_samples(cfg: DataConfig, urls: list[str] | None = None) -> int:
    """Samples in the shards: data.samples_per_epoch, else img2dataset's `successes` of STATS_SAMPLED evenly
    spaced stats files, scaled up (an epoch is only where the order reshuffles: an estimate is enough)."""
    if cfg.samples_per_epoch:
        return cfg.samples_per_epoch
    urls = urls if urls is not None else expand_shard_urls(cfg.shards, cfg.storage_options)
    counts = [n for n in (_successes(u, cfg) for u in _spaced(urls, STATS_SAMPLED)) if n is not None]
    if not counts:
        raise ValueError(f"cannot count samples: none of the sampled shards' _stats.json files exist (first: "
                         f"{storage.scrub(urls[0])}); check data.shards or set data.samples_per_epoch")
    return sum(counts) * len(urls) // len(counts)


def check_reachable(urls: list[str], storage_options: dict | None) -> None:
    """The store answers for the first shard, with retries. A first shard that does not exist is not fatal when
    others do (one number missing from a LAION brace pattern: the loader skips and counts it), checked on the
    middle and last shard."""
    try:
        with_retries(lambda: check_shards_reachable(urls, storage_options), storage.scrub(urls[0]))
    except StorageError as first:
        if not first.missing or len(urls) < 3:
            raise
        for url in (urls[len(urls) // 2], urls[-1]):
            try:
                with_retries(lambda u=url: check_shards_reachable([u], storage_options), storage.scrub(url))
            except StorageError:
                raise first from None
        log.warning("%s does not exist; the loader will skip it (data.max_failed_shards counts it)",
                    storage.scrub(urls[0]))


def plan_data(cfg: DataConfig, on_urls: Callable[[list[str]], Any] | None = None) -> DataPlan:
    """The whole data plan, with retries. Raises StorageError naming what failed and how to fix it.
    on_urls: a check of the listed URLs made before anything else is read (a resume's saved shard list)."""
    try:
        urls = with_retries(lambda: expand_shard_urls(cfg.shards, cfg.storage_options), "listing data.shards")
        note = on_urls(urls) if on_urls is not None else None
        check_reachable(urls, cfg.storage_options)
        rate, sampled = estimate_pass_rate(cfg, urls)
        in_shards = count_samples(cfg, urls)
    except InputError:
        raise
    except ValueError as e:
        raise StorageError(str(e)) from None
    if cfg.samples_per_epoch:  # given by the user: already the epoch's size
        return DataPlan(urls, in_shards, rate, in_shards, sampled, given=True, note=note)
    return DataPlan(urls, in_shards, rate, max(1, round(in_shards * rate)), sampled, note=note)


class RankZeroError(StorageError):
    """What rank 0 met while making a start-up read for every rank (the message names it; the traceback is
    in rank 0's log)."""


def _portable(exc: Exception, what: str) -> Exception:
    """exc as every rank can raise it: an InputError as it is (when it pickles), anything else as one line."""
    if isinstance(exc, InputError):
        try:
            return pickle.loads(pickle.dumps(exc.with_traceback(None)))
        except Exception:
            pass
    detail = storage.scrub(f"{type(exc).__name__}: {exc}")[:300]
    return RankZeroError(f"{what} failed on rank 0 ({detail}); rank 0's log holds the traceback")


def rank0_shared(fn: Callable[[], T], what: str) -> T:
    """Collective when a process group is up: rank 0 runs fn, every rank gets its result or its error, so every
    rank exits alike (2, one line) instead of waiting in the broadcast until the timeout. `what` names the read."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return fn()
    box: list[Any] = [None]
    if torch.distributed.get_rank() == 0:
        try:
            box[0] = (True, fn())
        except Exception as exc:
            if not isinstance(exc, InputError):
                log.exception("%s failed", what)
            box[0] = (False, _portable(exc, what))
    torch.distributed.broadcast_object_list(box, src=0)
    ok, value = box[0]
    if not ok:
        raise value
    return value


def shared_plan(cfg: DataConfig, on_urls: Callable[[list[str]], Any] | None = None) -> DataPlan:
    """Collective when a process group is up: rank 0 plans, every rank gets the plan (or its error)."""
    return rank0_shared(lambda: plan_data(cfg, on_urls), "the data plan")
