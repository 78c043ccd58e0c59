"""The data plan of a run, made once per job: rank 0 expands the shard list, checks the store answers, reads
the epoch size and estimates the filters' pass rate (with retries), and broadcasts the result (or the error)
to every rank, so the start-up requests do not grow with the number of ranks (every rank listing, HEADing and
reading stats with one attempt is a storm that one throttling reply ends; docs/results/resume-scale.md).
`rank0_shared` is that pattern for any start-up read (the latent manifest, the validation samples): rank 0 reads
with retries, every rank gets the result or the same error and exits alike."""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import json
import logging
import pickle
import random
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import partial
from typing import Any, TypeVar

import fsspec
import torch
from webdataset.gopen import gopen
from webdataset.tariterators import group_by_keys

from ldmscale.config import DataConfig
from ldmscale.data import storage
from ldmscale.data.shardlist import check_shards_reachable, expand_shard_urls
from ldmscale.data.sources import MixSource, source_views
from ldmscale.data.storage import StorageError, is_throttling, storage_options_for
from ldmscale.data.stream import sample_reason, tar_members
from ldmscale.runtime.errors import InputError

log = logging.getLogger(__name__)
T = TypeVar("T")
STATS_SAMPLED = 16  # stats files read to size an epoch (evenly spaced; the mean is scaled up)
PASS_SHARDS = 4  # shards sampled to estimate the share of samples data.filters keeps
PASS_SAMPLES = 256  # raw samples read from the start of each


@dataclass
class SourcePlan:
    """One source's part of the plan: its shards, their samples and the share its filters keep."""

    name: str
    weight: float  # normalised: its expected share of an epoch's samples
    urls: list[str]
    in_shards: int | None  # samples the shards hold (img2dataset `successes`; None: not counted)
    pass_rate: float  # share of raw samples that pass its filters, from sampled shards
    sampled: int  # raw samples the pass rate was measured on

    @property
    def samples(self) -> int | None:
        """Its samples after filtering (estimated)."""
        return max(1, round(self.in_shards * self.pass_rate)) if self.in_shards else None

    def line(self, epoch: int) -> str:
        """Its plan for an epoch of `epoch` samples: size, pass rate, weight, expected passes (repeats)."""
        drawn = self.weight * epoch
        size = (f"{self.in_shards:,} samples in the shards, ~{self.pass_rate:.1%} pass its filters (of "
                f"{self.sampled:,} sampled) = {self.samples:,}" if self.in_shards else
                f"~{self.pass_rate:.1%} pass its filters (of {self.sampled:,} sampled), size not counted")
        passes = f", {drawn / self.samples:.3g} passes an epoch" if self.samples else ""
        return (f"data:   {self.name}: {len(self.urls):,} shards, {size}; weight {self.weight:.3g}: ~{drawn:,.0f} "
                f"samples{passes}")


@dataclass
class DataPlan:
    sources: list[SourcePlan]
    samples_per_epoch: int  # what an epoch is sized by: samples drawn (after filtering)
    given: bool = False  # the epoch size came from data.samples_per_epoch
    note: Any = None  # what plan_data's on_urls check returned (a resume's shard-list note)

    @property
    def urls(self) -> list[str]:
        """Every source's shard URLs (one source: its list)."""
        return [u for s in self.sources for u in s.urls]

    @property
    def in_shards(self) -> int:
        return sum(s.in_shards or 0 for s in self.sources)

    @property
    def pass_rate(self) -> float:
        return sum(s.pass_rate * s.sampled for s in self.sources) / max(1, self.sampled)

    @property
    def sampled(self) -> int:
        return sum(s.sampled for s in self.sources)

    def mix_sources(self, cfg: DataConfig) -> list[MixSource]:
        """The sources as the loader reads them: their config views with the listed URLs and planned sizes."""
        return [MixSource(name, weight, view, plan.urls, plan.samples)
                for (name, weight, view), plan in zip(source_views(cfg), self.sources)]

    def describe(self) -> dict[str, Any]:
        """The plan as data (log.jsonl, the W&B run config): the epoch and, per source, its shards, samples, filter
        pass rate, weight and expected passes an epoch."""
        epoch = self.samples_per_epoch
        return {"samples_per_epoch": epoch, "given": self.given, "sources": {s.name: {
            "shards": len(s.urls), "samples_in_shards": s.in_shards, "pass_rate": s.pass_rate, "samples": s.samples,
            "weight": s.weight, "passes_per_epoch": s.weight * epoch / s.samples if s.samples else None,
        } for s in self.sources}}

    def summary(self) -> str:
        if len(self.sources) > 1:
            how = "data.samples_per_epoch" if self.given else "the sources' samples after filtering, summed"
            head = (f"data: a mixture of {len(self.sources)} sources, epoch = {self.samples_per_epoch:,} samples drawn "
                    f"by weight ({how})")
            return "\n".join([head, *(s.line(self.samples_per_epoch) for s in self.sources)])
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
                with_retries(partial(check_shards_reachable, [url], storage_options), storage.scrub(url))
            except StorageError:
                raise first from None
        log.warning("%s does not exist; the loader will skip it (data.max_failed_shards counts it)",
                    storage.scrub(urls[0]))


def plan_source(name: str, weight: float, cfg: DataConfig, urls: list[str], count: bool) -> SourcePlan:
    """One source's plan from its listed URLs: the store answers, the filters' pass rate, the samples its shards
    hold (when `count`; else tried, and None when the stats cannot be read)."""
    check_reachable(urls, cfg.storage_options)
    rate, sampled = estimate_pass_rate(cfg, urls)
    try:
        in_shards: int | None = count_samples(dataclasses.replace(cfg, samples_per_epoch=0), urls)
    except ValueError:
        if count:
            raise
        in_shards = None  # data.samples_per_epoch sizes the epoch: the size only tells the passes
    return SourcePlan(name, weight, urls, in_shards, rate, sampled)


def plan_data(cfg: DataConfig, on_urls: Callable[[list[MixSource]], Any] | None = None) -> DataPlan:
    """The whole data plan, with retries: every source listed, checked and sized. Raises StorageError naming
    what failed (and the source) and how to fix it. on_urls: a check of the listed sources made before anything
    else is read (a resume's saved mixture and shard lists)."""
    views = source_views(cfg)
    mixture = len(views) > 1
    try:
        listed = []
        for name, weight, view in views:
            with _source_errors(name if mixture else ""):
                what = f"listing data.sources[{name}].shards" if mixture else "listing data.shards"
                urls = with_retries(partial(expand_shard_urls, view.shards, view.storage_options), what)
            listed.append(MixSource(name, weight, view, urls))
        note = on_urls(listed) if on_urls is not None else None
        if not mixture and cfg.samples_per_epoch:  # one source, sized by the user: nothing to count
            check_reachable(listed[0].urls, cfg.storage_options)
            rate, sampled = estimate_pass_rate(cfg, listed[0].urls)
            plans = [SourcePlan(views[0][0], 1.0, listed[0].urls, cfg.samples_per_epoch, rate, sampled)]
        else:
            plans = []
            for s in listed:
                with _source_errors(s.name if mixture else ""):
                    plans.append(plan_source(s.name, s.weight, s.cfg, s.urls, count=not cfg.samples_per_epoch))
    except InputError:
        raise
    except ValueError as e:
        raise StorageError(str(e)) from None
    if cfg.samples_per_epoch:  # given by the user: already the epoch's size
        return DataPlan(plans, cfg.samples_per_epoch, given=True, note=note)
    return DataPlan(plans, max(1, sum(p.samples or 0 for p in plans)), note=note)


@contextlib.contextmanager
def _source_errors(source: str) -> Iterator[None]:
    """A mixture's data errors, prefixed with the source's name."""
    try:
        yield
    except (InputError, ValueError) as e:
        if not source:
            raise
        err = StorageError(f"source {source}: {e}")
        err.transient, err.missing = getattr(e, "transient", False), getattr(e, "missing", False)
        raise err from None


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


def shared_plan(cfg: DataConfig, on_urls: Callable[[list[MixSource]], Any] | None = None) -> DataPlan:
    """Collective when a process group is up: rank 0 plans, every rank gets the plan (or its error)."""
    return rank0_shared(lambda: plan_data(cfg, on_urls), "the data plan")
