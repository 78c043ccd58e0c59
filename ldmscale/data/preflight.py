"""The data plan of a run, made once per job: rank 0 expands the shard list, checks the store answers, reads
the epoch size and estimates the filters' pass rate (with retries), and broadcasts the result (or the error)
to every rank, so the start-up requests do not grow with the number of ranks (every rank listing, HEADing and
reading stats with one attempt is a storm that one throttling reply ends; docs/results/resume-scale.md)."""

from __future__ import annotations

import itertools
import json
import logging
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


def _successes(url: str, cfg: DataConfig) -> int:
    stats_url = url[: -len(".tar")] + "_stats.json"

    def read() -> int:
        with fsspec.open(stats_url, "rt", **storage_options_for(stats_url, cfg.storage_options)) as f:
            return int(json.load(f)["successes"])

    try:
        return with_retries(read, stats_url)
    except (OSError, KeyError, ValueError) as exc:
        raise ValueError(
            f"cannot count samples: {storage.scrub(stats_url)} is missing or unreadable ({exc}); "
            f"set data.samples_per_epoch"
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
    picked = _spaced(urls, STATS_SAMPLED)
    return sum(_successes(u, cfg) for u in picked) * len(urls) // len(picked)


def plan_data(cfg: DataConfig, check_val: bool = False) -> DataPlan:
    """The whole data plan, with retries. Raises StorageError naming what failed and how to fix it.
    check_val: data.val_shards must answer too (train.eval_every reads them at start-up)."""
    try:
        urls = with_retries(lambda: expand_shard_urls(cfg.shards, cfg.storage_options), "listing data.shards")
        with_retries(lambda: check_shards_reachable(urls, cfg.storage_options), storage.scrub(urls[0]))
        if check_val:
            val = with_retries(lambda: expand_shard_urls(cfg.val_shards, cfg.storage_options), "data.val_shards")
            with_retries(lambda: check_shards_reachable(val, cfg.storage_options), storage.scrub(val[0]))
        rate, sampled = estimate_pass_rate(cfg, urls)
        in_shards = count_samples(cfg, urls)
    except ValueError as e:
        raise StorageError(str(e)) from None
    if cfg.samples_per_epoch:  # given by the user: already the epoch's size
        return DataPlan(urls, in_shards, rate, in_shards, sampled, given=True)
    return DataPlan(urls, in_shards, rate, max(1, round(in_shards * rate)), sampled)


def shared_plan(cfg: DataConfig, check_val: bool = False) -> DataPlan:
    """Collective when a process group is up: rank 0 plans, every rank gets the plan (or its error)."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return plan_data(cfg, check_val)
    box: list[Any] = [None]
    if torch.distributed.get_rank() == 0:
        try:
            box[0] = plan_data(cfg, check_val)
        except StorageError as e:
            box[0] = str(e)
    torch.distributed.broadcast_object_list(box, src=0)
    if isinstance(box[0], str):
        raise StorageError(box[0])
    return box[0]
