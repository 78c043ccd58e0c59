"""The trainer's view of the data: an endless, resumable iterator of micro-batches over epochs."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from typing import Any

import torch

from ldmscale.config import DataConfig, StyleConfig
from ldmscale.data import storage
from ldmscale.data.shardlist import expand_shard_urls
from ldmscale.data.stream import DataPosition, ShardStream
from ldmscale.data.workers import loader_options, preemption_signals_blocked


class ResumableLoader:
    """Endless iterator of micro-batches over epochs, with a position that checkpoints save and restore."""

    def __init__(
        self,
        cfg: DataConfig,
        tokenizer: Any,
        *,
        seed: int,
        rank: int,
        world: int,
        micro_batch: int,
        samples_per_epoch: int,
        position: DataPosition | None = None,
        style: StyleConfig | None = None,
    ) -> None:
        storage.register_gopen_schemes(cfg.storage_options)
        self.cfg, self.tokenizer, self.style = cfg, tokenizer, style
        self.seed, self.rank, self.world, self.micro_batch = seed, rank, world, micro_batch
        self.urls = expand_shard_urls(cfg.shards, cfg.storage_options)
        self.workers = max(1, cfg.num_workers)
        if len(self.urls) < world * self.workers:
            raise ValueError(
                f"{len(self.urls)} shards cannot feed {world} ranks x {self.workers} loader workers: every worker "
                f"needs at least one shard; lower data.num_workers or split the data into more shards"
            )
        per_rank = samples_per_epoch // world
        self.batches_per_worker = max(1, per_rank // (micro_batch * self.workers))
        self.position = DataPosition(consumed=[0] * self.workers)
        if position is not None:
            self.load_state_dict(position.to_dict())
        self.dropped: dict[int, dict[str, int]] = {}
        self._it: Iterator[dict[str, Any]] | None = None

    @property
    def batches_per_epoch(self) -> int:
        return self.batches_per_worker * self.workers

    def _epoch_iter(self) -> Iterator[dict[str, Any]]:
        ds = ShardStream(
            self.cfg, self.urls, self.tokenizer, seed=self.seed, rank=self.rank, world=self.world,
            micro_batch=self.micro_batch, batches_per_worker=self.batches_per_worker,
            position=DataPosition.from_dict(self.position.to_dict()), style=self.style,
        )
        if self.cfg.num_workers == 0:
            return iter(ds)
        options = loader_options(self.cfg.start_method)
        loader = torch.utils.data.DataLoader(ds, batch_size=None, num_workers=self.cfg.num_workers, prefetch_factor=4,
                                             **options)
        with preemption_signals_blocked(options["multiprocessing_context"]):  # the workers start here
            return iter(loader)

    def __iter__(self) -> ResumableLoader:
        return self

    def __next__(self) -> dict[str, Any]:
        while True:
            if self.position.batches >= self.batches_per_epoch:
                self.position = DataPosition(epoch=self.position.epoch + 1, batches=0, consumed=[0] * self.workers)
                self._it = None
            if self._it is None:
                self._it = self._epoch_iter()
            try:
                batch = next(self._it)
            except StopIteration:  # cannot happen with equal per-worker counts; guard against a silent skip
                raise RuntimeError(
                    f"loader ended after {self.position.batches} of {self.batches_per_epoch} batches"
                ) from None
            self.position.batches += 1
            self.position.consumed[batch["role"]] = batch["consumed"]
            self.dropped[batch["role"]] = batch["dropped"]
            return batch

    def dropped_counts(self) -> dict[str, int]:
        """Samples dropped so far this epoch on this rank, by reason (filters, decode errors)."""
        total: Counter[str] = Counter()
        for counts in self.dropped.values():
            total.update(counts)
        return dict(total)

    def state_dict(self) -> dict[str, Any]:
        return self.position.to_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from a saved position (before the first batch is drawn)."""
        position = DataPosition.from_dict(state)
        if not position.consumed:
            position.consumed = [0] * self.workers
        if len(position.consumed) != self.workers:
            raise ValueError(
                f"the checkpoint's data position was saved with data.num_workers={len(position.consumed)}; "
                f"resume with that value (now {self.workers}) for an exact continuation"
            )
        self.position = position
        self._it = None
