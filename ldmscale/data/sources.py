"""A run's data sources: the weighted mixture of data.sources, or data.shards as the one-source shorthand.

Each source is read through its own view of the data config (`DataConfig` with its shards, its filters, its
storage options merged over data.storage_options, its caption key), so the stream, filters and preflight code
serve one source or many alike. Sources are identified by position in the list: the mixture draw maps a slot
to a source index (mixture.py) and a saved position names each source's name, weight and shard list.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from ldmscale.config import DataConfig
from ldmscale.data.mixture import Mixture
from ldmscale.data.position import SHORTHAND, ShardListId, SourceId
from ldmscale.data.shardlist import (
    ShardListError,
    check_split,
    expand_shard_urls,
    expand_without_listing,
    is_local,
)
from ldmscale.data.stream import seeded


@dataclass
class MixSource:
    """One source as the loader reads it: its name, normalised weight, config view and shard URLs."""

    name: str
    weight: float
    cfg: DataConfig
    urls: list[str]
    samples: int | None = None  # its samples after filtering, as the data plan estimated them (None: not planned)

    def identity(self) -> SourceId:
        return SourceId(self.name, self.weight, ShardListId.of(self.urls))


def source_views(cfg: DataConfig) -> list[tuple[str, float, DataConfig]]:
    """(name, normalised weight, config view) per source; data.shards gives one source named SHORTHAND."""
    if not cfg.sources:
        return [(SHORTHAND, 1.0, cfg)]
    total = sum(s.weight for s in cfg.sources)
    return [(s.name, s.weight / total, dataclasses.replace(
        cfg, shards=list(s.shards), sources=[], filters=s.filters if s.filters is not None else cfg.filters,
        storage_options={**cfg.storage_options, **s.storage_options}, caption_key=s.caption_key or cfg.caption_key,
    )) for s in cfg.sources]


def listed_without_store(cfg: DataConfig) -> list[tuple[str, DataConfig, list[str] | None]]:
    """(name, config view, shard URLs) per source, the URLs where no object store must be asked (local paths,
    brace patterns), else None. A source of local paths that names no shard is refused (ShardListError, naming the
    source): no process group needs to start to say so."""
    out = []
    for name, _, view in source_views(cfg):
        urls = expand_without_listing(view.shards)
        if urls is None and all(is_local(s) and "{" not in s for s in view.shards):
            try:
                expand_shard_urls(view.shards)
            except ShardListError as e:
                raise ShardListError(f"source {name}: {e}" if cfg.sources else str(e)) from None
        out.append((name, view, urls))
    return out


def resolve_sources(cfg: DataConfig, urls: list[list[str]] | list[str] | None = None) -> list[MixSource]:
    """The sources with their shard URLs: `urls` as listed by the data plan (one list per source; a flat list for
    the one-source shorthand), else listed here (no retries: the trainer lists through rank 0's plan)."""
    views = source_views(cfg)
    if urls is not None and urls and isinstance(urls[0], str):
        urls = [urls]
    if urls is not None and len(urls) != len(views):
        raise ValueError(f"{len(urls)} shard lists for {len(views)} sources")
    return [MixSource(name, weight, view, list(urls[i]) if urls is not None else
                      expand_shard_urls(view.shards, view.storage_options))
            for i, (name, weight, view) in enumerate(views)]


def check_splits(counts: list[tuple[str, int]], world: int, workers: int) -> list[str]:
    """(name, shards) per source. One source needs a shard per loader worker of every rank (check_split raises
    otherwise); a mixture's source with fewer (a small set) shares its shards among the workers (stream.py's
    shard_stride): returns a line for each such source, saying what that costs."""
    if len(counts) == 1:
        check_split(counts[0][1], world, workers)
        return []
    splits = world * max(1, workers)
    return [f"source {name}: {n} shards for {world} ranks x {max(1, workers)} loader workers: each shard is shared "
            f"by ~{splits / n:.3g} workers, each reading all of it to keep its share (split the source into >= "
            f"{splits} shards to read each byte once)" for name, n in counts if n < splits]


def stream_seed(seed: int, index: int) -> int:
    """The seed of source `index`'s streams: the run's seed for the first source (a one-source run reads as it
    always did), a derived one for the others so that equal-sized sources do not shuffle alike."""
    return seed if index == 0 else seeded(seed, -3, index).getrandbits(62)


def mixture_of(sources: list[MixSource], seed: int) -> Mixture:
    return Mixture.of(seed, [s.weight for s in sources])
