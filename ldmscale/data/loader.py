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
from ldmscale.data.position import (
    FORMAT,
    DataPosition,
    PositionError,
    ShardListId,
    check_whole_steps,
    fresh_roles,
    pack_urls,
    resplit,
    saved_ranks_needed,
    shard_list_change,
    unpack_urls,
)
from ldmscale.data.shardlist import check_split, expand_shard_urls
from ldmscale.data.storage import StorageError
from ldmscale.data.stream import resume_cost, source_shards
from ldmscale.data.workers import loader_options, preemption_signals_blocked

log = logging.getLogger(__name__)
# every reason a sample or shard is dropped, in a fixed order: ranks sum their counts in one all-reduce
DROP_REASONS = (
    "no_image", "no_caption", "caption_short", "caption_long", "no_json", "no_size", "too_narrow", "too_short",
    "aspect", "similarity", "nsfw", "watermark", "unsafe", "bad_json", "too_large", "decode_error", "shard_retry",
    "shard_error", "shard_missing", "style_self_ref", "other",
)
SHARD_FAILURES = ("shard_error", "shard_missing")  # what data.max_failed_shards counts


class ShardBudgetError(StorageError):
    """More shards were missing or unreadable this epoch than data.max_failed_shards allows."""


def failed_shard_budget(max_failed_shards: float, n_shards: int) -> int:
    """data.max_failed_shards in shards: below 1 a share of the epoch's shards (all ranks, all workers), from 1
    on a count."""
    return int(max_failed_shards) if max_failed_shards >= 1 else int(max_failed_shards * n_shards)


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
        self.shards = ShardListId.of(self.urls)
        self.workers = max(1, cfg.num_workers)
        check_split(len(self.urls), world, self.workers)
        self.global_batch = gb = global_batch or micro_batch * world
        self.samples_per_epoch = samples_per_epoch
        self.batches_per_epoch = max(1, samples_per_epoch // gb) * max(1, gb // (micro_batch * world))
        self.failure_budget = failed_shard_budget(cfg.max_failed_shards, len(self.urls))
        self.position = position if position is not None else self._fresh(0)
        self._it: Iterator[dict[str, Any]] | None = None
        self._packed_urls: str | None = None

    def _fresh(self, epoch: int) -> DataPosition:
        return DataPosition(
            epoch=epoch, given=0, epoch_samples=self.batches_per_epoch * self.micro_batch, micro_batch=self.micro_batch,
            global_batch=self.global_batch, world=self.world, workers=self.workers, shards=self.shards,
            roles=fresh_roles(self.rank, self.world, self.workers, self.batches_per_epoch, self.micro_batch),
        )

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
        if self.position.given >= self.position.epoch_samples:
            self.position = self._fresh(self.position.epoch + 1)
            self._it = None
        if self._it is None:
            self._it = self._epoch_iter()
        try:
            batch = next(self._it)
        except StopIteration:  # cannot happen with the planned per-role counts; guard against a silent skip
            raise RuntimeError(
                f"loader ended after {self.position.given} of {self.position.epoch_samples} samples"
            ) from None
        role = batch.pop("role")
        self.position.given += self.micro_batch
        self.position.roles[role] = batch.pop("state")
        batch.pop("dropped")
        return batch

    def dropped_counts(self) -> dict[str, int]:
        """Samples (and shards) dropped so far this epoch on this rank, by reason (filters, decode errors)."""
        total: Counter[str] = Counter()
        for role in self.position.roles:
            total.update(role.counts)
        return dict(total)

    def dropped_vector(self) -> list[float]:
        """dropped_counts() in DROP_REASONS order (unknown reasons under "other"), for summing over ranks."""
        counts = self.dropped_counts()
        other = sum(v for k, v in counts.items() if k not in DROP_REASONS)
        return [float(counts.get(r, 0)) for r in DROP_REASONS[:-1]] + [float(other)]

    def check_failure_budget(self, job_counts: dict[str, float]) -> None:
        """Raise ShardBudgetError when the job dropped more shards this epoch than data.max_failed_shards allows.
        `job_counts`: the drop counters summed over every rank (the trainer's per-step reduction), so every rank
        decides alike at the same step, and a resume (whose counters are restored) decides as the run did."""
        failed = int(sum(job_counts.get(k, 0) for k in SHARD_FAILURES))
        if failed > self.failure_budget:
            raise ShardBudgetError(
                f"{failed} of the {len(self.urls):,} shards were missing ({int(job_counts.get('shard_missing', 0))}) "
                f"or failed twice ({int(job_counts.get('shard_error', 0))}) in epoch {self.position.epoch}, more "
                f"than data.max_failed_shards={self.cfg.max_failed_shards:g} allows ({self.failure_budget} shards): "
                f"the store or the shards are broken (the loader's warnings name each one); fix them, or raise "
                f"data.max_failed_shards to go on without them"
            )

    # ------------------------------------------------------------ resume

    def state_dict(self) -> dict[str, Any]:
        d = self.position.to_dict()
        if self.rank == 0:  # one copy of the shard list per checkpoint, to say what changed on a resume
            if self._packed_urls is None:
                self._packed_urls = pack_urls(self.urls)
            d["shard_urls"] = self._packed_urls
        return d

    def needs_every_rank(self, own: dict[str, Any]) -> bool:
        """Whether resuming from this rank's saved position `own` re-divides the epoch (another number of ranks,
        loader workers or micro-batch): then load_state_dict needs the positions of saved_ranks_needed()."""
        key = (own.get("world"), own.get("workers"), own.get("micro_batch"))
        return own.get("format") == FORMAT and key != (self.world, self.workers, self.micro_batch)

    def saved_ranks_needed(self, saved_world: int) -> range:
        """The saved ranks whose positions this rank needs to resume (load_state_dict): O(1) of them."""
        return saved_ranks_needed(self.rank, self.world, saved_world)

    def load_state_dict(self, positions: dict[str, Any] | list[dict[str, Any]] | dict[int, dict[str, Any]],
                        saved_world: int | None = None) -> str:
        """Resume from saved positions: this rank's own (a dict, as state_dict() gave it), every saved rank's (a
        list in rank order), or those of saved_ranks_needed(saved_world) ({saved rank: position}). With another
        number of ranks, loader workers or micro-batch the rest of the epoch is re-divided, every sample once.
        Over another shard list it is refused (PositionError) or, with data.on_shard_list_change=new_epoch, the
        next epoch starts. Returns a one-line account of the resume for the log."""
        if isinstance(positions, list):
            raw = dict(enumerate(positions))
        elif "format" in positions or "epoch" in positions:
            raw = {self.rank: positions}
        else:
            raw = {int(k): v for k, v in positions.items()}
        saved_world = saved_world if saved_world is not None else (len(raw) if isinstance(positions, list) else None)
        try:
            saved = {r: DataPosition.from_dict(p) for r, p in raw.items()}
        except PositionError:
            epoch = next(iter(raw.values())).get("epoch")
            if self.cfg.on_shard_list_change != "new_epoch" or epoch is None:
                raise
            return self._new_epoch(int(epoch), "the saved data position was written by an older ldmscale")
        some = next(iter(saved.values()))
        if some.shards != self.shards:
            if self.cfg.on_shard_list_change == "new_epoch":
                return self._new_epoch(some.epoch, f"data.shards changed ({some.shards.count} shards then, "
                                                   f"{len(self.urls)} now)")
            packed = next((p.shard_urls for p in saved.values() if p.shard_urls), None)
            raise PositionError(shard_list_change(some.shards, self.urls, unpack_urls(packed) if packed else None))
        saved_world = saved_world if saved_world is not None else some.world
        same = (some.world, some.workers, some.micro_batch) == (self.world, self.workers, self.micro_batch)
        if same and self.rank in saved:
            self.position = saved[self.rank]
            self.position.shard_urls = None
            check_whole_steps(self.position.remaining * self.world, self.position.epoch, self.position.global_batch,
                              self.global_batch, self.world * self.micro_batch)
            self.position.global_batch = self.global_batch
            note = ""
        else:
            self.position = resplit(saved, saved_world, world=self.world, workers=self.workers, rank=self.rank,
                                    micro_batch=self.micro_batch, global_batch=self.global_batch)
            note = (f"resuming a {saved_world}-rank x {some.workers}-worker x micro-batch {some.micro_batch} data "
                    f"position on {self.world} ranks x {self.workers} workers x micro-batch {self.micro_batch}: "
                    f"epoch {self.position.epoch} continues with {self.position.epoch_samples * self.world} "
                    f"samples left; ")
        self._it = None
        cost = self.resume_cost()
        return note + (f"rank {self.rank} data resume: {cost['shards_skipped']} shards skipped, "
                       f"{cost['shards_reopened']} reopened, {cost['samples_replayed']} samples replayed, "
                       f"{cost['samples_skipped']} passed over undecoded")

    def _new_epoch(self, saved_epoch: int, why: str) -> str:
        self.position = self._fresh(saved_epoch + 1)
        self._it = None
        note = (f"{why}: data.on_shard_list_change=new_epoch, so the rest of epoch {saved_epoch} is skipped and epoch "
                f"{saved_epoch + 1} starts over the {len(self.urls):,} shards listed now")
        log.warning(note)
        return note

    def resume_cost(self) -> dict[str, int]:
        """Summed over this rank's roles: what resuming from the current position re-reads and avoids."""
        total: Counter[str] = Counter()
        for role in self.position.roles:
            for seg in role.segments:
                split = len(source_shards(len(self.urls), self.seed, self.position.epoch, seg.src))
                total.update(resume_cost(seg.cursor, split))
                total["samples_skipped"] += seg.skip
        return {k: total[k] for k in ("shards_skipped", "shards_reopened", "samples_replayed", "samples_skipped")}
