"""The trainer's view of the data: an endless, resumable iterator of micro-batches over epochs."""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Iterator
from typing import Any

import torch

from ldmscale.config import DataConfig, StyleConfig
from ldmscale.data import storage
from ldmscale.data.batches import EpochBatches, SampleDecoder
from ldmscale.data.position import DataPosition, fresh_roles, resplit
from ldmscale.data.shardlist import check_split, expand_shard_urls
from ldmscale.data.stream import resume_cost, source_shards
from ldmscale.data.workers import loader_options, preemption_signals_blocked

log = logging.getLogger(__name__)
# every reason a sample or shard is dropped, in a fixed order: ranks sum their counts in one all-reduce
DROP_REASONS = (
    "no_image", "no_caption", "caption_short", "caption_long", "no_json", "no_size", "too_narrow", "too_short",
    "aspect", "similarity", "nsfw", "watermark", "unsafe", "bad_json", "too_large", "decode_error", "shard_retry",
    "shard_error", "style_self_ref", "other",
)


class ResumableLoader:
    """Endless iterator of micro-batches over epochs, with a position that checkpoints save and restore.

    An epoch is `samples_per_epoch // global_batch` optimizer steps whatever the number of ranks, so a run
    resumed on another world size ends its epochs at the same steps.
    """

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
        global_batch: int | None = None,
        urls: list[str] | None = None,
        position: DataPosition | None = None,
        style: StyleConfig | None = None,
        decoder: SampleDecoder | None = None,
    ) -> None:
        storage.register_gopen_schemes(cfg.storage_options)
        self.cfg, self.tokenizer, self.style, self.decoder = cfg, tokenizer, style, decoder
        self.seed, self.rank, self.world, self.micro_batch = seed, rank, world, micro_batch
        self.urls = urls if urls is not None else expand_shard_urls(cfg.shards, cfg.storage_options)
        self.workers = max(1, cfg.num_workers)
        check_split(len(self.urls), world, self.workers)
        gb = global_batch or micro_batch * world
        self.samples_per_epoch = samples_per_epoch
        self.batches_per_epoch = max(1, samples_per_epoch // gb) * max(1, gb // (micro_batch * world))
        self.position = position if position is not None else self._fresh(0)
        self.dropped: dict[int, dict[str, int]] = {}
        self._it: Iterator[dict[str, Any]] | None = None

    def _fresh(self, epoch: int) -> DataPosition:
        return DataPosition(epoch=epoch, batches=0, epoch_batches=self.batches_per_epoch, world=self.world,
                            workers=self.workers, roles=fresh_roles(self.rank, self.world, self.workers,
                                                                    self.batches_per_epoch))

    def _epoch_iter(self) -> Iterator[dict[str, Any]]:
        ds = EpochBatches(
            self.cfg, self.urls, self.tokenizer, seed=self.seed, epoch=self.position.epoch,
            micro_batch=self.micro_batch, roles=self.position.roles, first_batch=self.position.batches,
            style=self.style, decoder=self.decoder,
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
        if self.position.batches >= self.position.epoch_batches:
            self.position = self._fresh(self.position.epoch + 1)
            self.dropped = {}
            self._it = None
        if self._it is None:
            self._it = self._epoch_iter()
        try:
            batch = next(self._it)
        except StopIteration:  # cannot happen with the planned per-role counts; guard against a silent skip
            raise RuntimeError(
                f"loader ended after {self.position.batches} of {self.position.epoch_batches} batches"
            ) from None
        role = batch.pop("role")
        self.position.batches += 1
        self.position.roles[role] = batch.pop("state")
        self.dropped[role] = batch.pop("dropped")
        return batch

    def dropped_counts(self) -> dict[str, int]:
        """Samples (and shards) dropped so far this epoch on this rank, by reason (filters, decode errors)."""
        total: Counter[str] = Counter()
        for counts in self.dropped.values():
            total.update(counts)
        return dict(total)

    def dropped_vector(self) -> list[float]:
        """dropped_counts() in DROP_REASONS order (unknown reasons under "other"), for summing over ranks."""
        counts = self.dropped_counts()
        other = sum(v for k, v in counts.items() if k not in DROP_REASONS)
        return [float(counts.get(r, 0)) for r in DROP_REASONS[:-1]] + [float(other)]

    # ------------------------------------------------------------ resume

    def state_dict(self) -> dict[str, Any]:
        return self.position.to_dict()

    def needs_every_rank(self, own: dict[str, Any]) -> bool:
        """Whether resuming from this rank's saved position `own` needs every saved rank's instead (another
        number of ranks or workers: the rest of the epoch is re-divided). The checkpointer then has one process
        read them all and broadcast them, rather than every rank reading every rank's file."""
        return int(own.get("world", -1)) != self.world or int(own.get("workers", -1)) != self.workers

    def load_state_dict(self, positions: dict[str, Any] | list[dict[str, Any]]) -> str:
        """Resume from this rank's saved position, or from every saved rank's (a list, as the checkpoint holds
        them) when the number of ranks or loader workers changed: then the rest of the epoch is re-divided.
        Returns a one-line account of the resume for the log."""
        saved = [DataPosition.from_dict(p) for p in (positions if isinstance(positions, list) else [positions])]
        same = saved[0].world == self.world and saved[0].workers == self.workers
        if same and isinstance(positions, list):
            if len(saved) != self.world:
                raise ValueError(f"the checkpoint holds {len(saved)} data positions for {self.world} ranks")
            saved = [saved[self.rank]]
        if same:
            self.position = saved[0]
            note = ""
        else:
            if not isinstance(positions, list) or len(saved) != saved[0].world:
                raise ValueError("a resume on another number of ranks or workers needs every saved rank's position")
            self.position = resplit(saved, self.world, self.workers, self.rank)
            note = (f"resuming a {saved[0].world}-rank x {saved[0].workers}-worker data position on {self.world} "
                    f"ranks x {self.workers} workers: epoch {self.position.epoch} continues with "
                    f"{self.position.epoch_batches * self.micro_batch * self.world} samples left; ")
        self._it = None
        cost = self.resume_cost()
        return note + (f"rank {self.rank} data resume: {cost['shards_skipped']} shards skipped, "
                       f"{cost['shards_reopened']} reopened, {cost['samples_replayed']} samples replayed")

    def resume_cost(self) -> dict[str, int]:
        """Summed over this rank's roles: what resuming from the current position re-reads and avoids."""
        total: Counter[str] = Counter()
        for role in self.position.roles:
            for seg in role["segments"]:
                split = len(source_shards(len(self.urls), self.seed, self.position.epoch, tuple(seg["src"])))
                total.update(resume_cost(seg["cursor"], split))
                total["samples_replayed"] += seg["skip"] * self.micro_batch
        return {k: total[k] for k in ("shards_skipped", "shards_reopened", "samples_replayed")}
