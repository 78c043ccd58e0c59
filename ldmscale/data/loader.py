"""The trainer's view of the data: an endless, resumable iterator of micro-batches over epochs, from one source or
a weighted mixture of sources (mixture.py draws the source of every sample slot)."""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Iterator
from typing import Any, cast

import torch

from ldmscale.config import DataConfig, StyleConfig
from ldmscale.data import storage
from ldmscale.data.accounting import DROP_REASONS, Accounting, DataTally, drop_vector
from ldmscale.data.batches import EpochBatches, SampleDecoder
from ldmscale.data.mixture import Deal, role_counts
from ldmscale.data.position import (
    FORMAT,
    DataPosition,
    NextEpoch,
    PositionError,
    RolePlan,
    Segment,
    SlotCounter,
    check_whole_steps,
    epoch_batches,
    fresh_roles,
    mixture_change,
    pack_urls,
    resplit,
    resplit_buckets,
    role_batches,
    saved_ranks_needed,
)
from ldmscale.data.sources import MixSource, check_splits, mixture_of, resolve_sources, stream_seed
from ldmscale.data.storage import StorageError
from ldmscale.data.stream import resume_cost, source_shards
from ldmscale.data.workers import loader_options, preemption_signals_blocked

log = logging.getLogger(__name__)
__all__ = ["DROP_REASONS", "ResumableLoader", "ShardBudgetError", "failed_shard_budget"]
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
    resumed on another world size ends its epochs at the same steps. With several sources, each sample slot
    of an epoch is filled from the source the mixture draws for it (a pure function of seed, epoch and slot).
    `sources`: the sources with their shard lists (the data plan's); `urls`: one source's shard list.
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
        sources: list[MixSource] | None = None,
        position: DataPosition | None = None,
        style: StyleConfig | None = None,
        decoder: SampleDecoder | None = None,
    ) -> None:
        storage.register_gopen_schemes(cfg.storage_options)
        self.cfg, self.tokenizer, self.style, self.decoder = cfg, tokenizer, style, decoder
        self.seed, self.rank, self.world, self.micro_batch = seed, rank, world, micro_batch
        self.sources = sources if sources is not None else resolve_sources(cfg, urls)
        self.urls = [u for s in self.sources for u in s.urls]  # every source's shards
        self.identities = [s.identity() for s in self.sources]
        self.mixture = mixture_of(self.sources, seed)
        self.workers = max(1, cfg.num_workers)
        for line in check_splits([(s.name, len(s.urls)) for s in self.sources], world, self.workers):
            if rank == 0:
                log.warning(line)
        self.global_batch = gb = global_batch or micro_batch * world
        self.samples_per_epoch = samples_per_epoch
        self.batches_per_epoch = epoch_batches(samples_per_epoch, gb, micro_batch, world)
        self.failure_budgets = [failed_shard_budget(cfg.max_failed_shards, len(s.urls)) for s in self.sources]
        self.accounting = Accounting([s.name for s in self.sources], [s.samples for s in self.sources])
        self.position = position if position is not None else self._fresh(0, [0] * len(self.sources))
        self._drawn_step = [0] * len(self.sources)
        self._it: Iterator[dict[str, Any]] | None = None
        self._packed_urls: list[str] | None = None

    @property
    def failure_budget(self) -> int:
        """data.max_failed_shards in shards (of the first source; each source of a mixture has its own)."""
        return self.failure_budgets[0]

    def _fresh(self, epoch: int, drawn: list[int]) -> DataPosition:
        return DataPosition(
            epoch=epoch, given=0, epoch_samples=self.batches_per_epoch * self.micro_batch, micro_batch=self.micro_batch,
            global_batch=self.global_batch, world=self.world, workers=self.workers, sources=list(self.identities),
            deal=Deal(self.world, self.workers, self.micro_batch, self.global_batch), drawn=list(drawn),
            roles=fresh_roles(self.rank, self.world, self.workers, self.batches_per_epoch, self.micro_batch,
                              len(self.sources)),
        )

    def _epoch_iter(self) -> Iterator[dict[str, Any]]:
        bucketed: dict[str, Any] = {}
        if self.cfg.buckets.enabled:  # each role's batches left, and its slots of the next epoch to read ahead into
            nxt = self._following()
            bucketed = {"role_left": self._role_left(), "next_roles": nxt.roles, "next_deal": nxt.deal}
        ds = EpochBatches(
            self.cfg, self.sources, self.tokenizer, seed=self.seed, epoch=self.position.epoch,
            micro_batch=self.micro_batch, roles=self.position.roles, first_batch=self.position.batches,
            style=self.style, decoder=self.decoder, deal=self.position.deal, **bucketed,
        )
        if self.cfg.num_workers == 0:
            return iter(ds)
        options = loader_options(self.cfg.start_method)
        loader = torch.utils.data.DataLoader(ds, batch_size=None, num_workers=self.cfg.num_workers, prefetch_factor=4,
                                             **options)
        with preemption_signals_blocked(options["multiprocessing_context"]):  # the workers start here
            return iter(loader)

    def _role_left(self) -> list[int]:
        """Batches each role still gives this epoch (the rank's batch b comes from role b % workers)."""
        total, given = self.position.epoch_samples // self.micro_batch, self.position.batches
        return [role_batches(total, self.workers, j) - len(range(j, given, self.workers)) for j in range(self.workers)]

    def _next_epoch(self) -> DataPosition:
        """The next epoch's position; with aspect buckets each role carries its pending samples into it and
        starts where it stands in it (after the samples it read ahead)."""
        position = self._fresh(self.position.epoch + 1, self.position.drawn)
        if self.cfg.buckets.enabled:
            nxt = self._following()
            position.deal = nxt.deal
            for j, (old, new) in enumerate(zip(self.position.roles, nxt.roles)):
                start = old.ahead if old.ahead is not None else new
                position.roles[j] = RolePlan(start.segments, start.counts, old.pending)
        return position

    def _following(self) -> NextEpoch:
        """The next epoch's slots: the rank's fresh ones, or those an elastic resume carried over (NextEpoch)."""
        if self.position.following is not None:
            return self.position.following
        fresh = self._fresh(self.position.epoch + 1, self.position.drawn)
        assert fresh.deal is not None
        return NextEpoch(fresh.roles, fresh.deal)

    def __iter__(self) -> ResumableLoader:
        return self

    def __next__(self) -> dict[str, Any]:
        if self.position.given >= self.position.epoch_samples:
            self.position = self._next_epoch()
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
        for k in batch.pop("sources"):
            self.position.drawn[k] += 1
            self._drawn_step[k] += 1
        return batch

    # ------------------------------------------------------------ accounting

    def dropped_by_source(self) -> list[dict[str, int]]:
        """Samples (and shards) dropped so far this epoch on this rank, per source, by reason."""
        totals: list[Counter[str]] = [Counter() for _ in self.sources]
        for role in self.position.roles:
            for k, counts in enumerate(role.counts):
                totals[k].update(counts)
        return [dict(t) for t in totals]

    def dropped_counts(self) -> dict[str, int]:
        """Samples (and shards) dropped so far this epoch on this rank, by reason (filters, decode errors)."""
        total: Counter[str] = Counter()
        for counts in self.dropped_by_source():
            total.update(counts)
        return dict(total)

    def dropped_vector(self) -> list[float]:
        """dropped_counts() in DROP_REASONS order (unknown reasons under "other"), for summing over ranks."""
        return drop_vector(self.dropped_counts())

    def accounting_vector(self) -> list[float]:
        """This rank's part of the step's reduction (accounting.py); starts the next step's draw count."""
        vec = self.accounting.vector(self.dropped_by_source(), self._drawn_step, self.position.drawn)
        self._drawn_step = [0] * len(self.sources)
        return vec

    def read_accounting(self, values: list[float]) -> DataTally:
        """The job's sums from the reduced accounting_vector(); raises ShardBudgetError past the failure budget."""
        tally = self.accounting.read(values)
        self.check_failure_budget(tally.dropped, [s.dropped for s in tally.sources] or None)
        return tally

    def check_failure_budget(self, job_counts: dict[str, float], per_source: list[dict[str, float]] | None = None
                             ) -> None:
        """Raise ShardBudgetError when the job dropped more shards this epoch than data.max_failed_shards allows
        (of each source's shards, for a mixture: `per_source`). `job_counts`: the drop counters summed over every
        rank (the trainer's per-step reduction), so every rank decides alike at the same step, and a resume (whose
        counters are restored) decides as the run did."""
        for k, counts in enumerate(per_source or [job_counts]):
            failed = int(sum(counts.get(r, 0) for r in SHARD_FAILURES))
            if failed <= self.failure_budgets[k]:
                continue
            source = self.sources[k]
            where = f" of source {source.name}" if len(self.sources) > 1 else ""
            missing = int(counts.get("shard_missing", 0))
            raise ShardBudgetError(
                f"{failed} of the {len(source.urls):,} shards{where} were missing ({missing})"
                f" or failed twice ({int(counts.get('shard_error', 0))}) in epoch {self.position.epoch}, more than "
                f"data.max_failed_shards={self.cfg.max_failed_shards:g} allows ({self.failure_budgets[k]} shards): "
                f"the store or the shards are broken (the loader's warnings name each one); fix them, or raise "
                f"data.max_failed_shards to go on without them"
            )

    # ------------------------------------------------------------ resume

    def state_dict(self) -> dict[str, Any]:
        d = self.position.to_dict()
        if self.rank == 0:  # one copy of the shard lists per checkpoint, to say what changed on a resume
            if self._packed_urls is None:
                self._packed_urls = [pack_urls(s.urls) for s in self.sources]
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
        number of ranks, loader workers or micro-batch the rest of the epoch is re-divided, every sample once, each
        in the slot (and from the source) it was drawn for. Over another mixture or shard list it is refused
        (PositionError) or, with data.on_shard_list_change=new_epoch, the next epoch starts. Returns a one-line
        account of the resume for the log."""
        if isinstance(positions, list):
            raw = dict(enumerate(positions))
        elif "format" in positions or "epoch" in positions:
            raw = {self.rank: cast(dict[str, Any], positions)}  # one position: its own keys, not ranks
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
        if not self.cfg.buckets.enabled and any(p.following or role.pending or role.ahead
                                                for p in saved.values() for role in p.roles):
            why = ("the saved data position batches by aspect bucket and holds samples waiting in their buckets' "
                   "queues or read into the next epoch")
            if self.cfg.on_shard_list_change == "new_epoch":
                return self._new_epoch(some.epoch, why)
            raise PositionError(f"{why}, data.buckets.enabled is false now: resume with data.buckets.enabled=true to "
                                f"finish epoch {some.epoch}, or set data.on_shard_list_change=new_epoch to start the "
                                f"next epoch with square batches")
        packed = next((p.shard_urls for p in saved.values() if p.shard_urls), None)
        change = mixture_change(some, self.identities, [s.urls for s in self.sources], packed)
        if change is not None:
            if self.cfg.on_shard_list_change == "new_epoch":
                then = sum(s.shards.count for s in some.sources)
                why = f"the data sources changed ({then} shards then, {len(self.urls)} now)"
                return self._new_epoch(some.epoch, why)
            raise PositionError(change)
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
            shape = {"world": self.world, "workers": self.workers, "rank": self.rank, "micro_batch": self.micro_batch,
                     "global_batch": self.global_batch}
            if self.cfg.buckets.enabled:
                self.position = resplit_buckets(saved, saved_world, samples_per_epoch=self.samples_per_epoch,
                                                slot_counter=self._slot_counter, **shape)
            else:
                assert some.deal is not None
                self.position = resplit(saved, saved_world, count_slots=self._slot_counter(some.epoch, some.deal),
                                        **shape)
            note = (f"resuming a {saved_world}-rank x {some.workers}-worker x micro-batch {some.micro_batch} data "
                    f"position on {self.world} ranks x {self.workers} workers x micro-batch {self.micro_batch}: "
                    f"epoch {self.position.epoch} continues with {self.position.epoch_samples * self.world} "
                    f"samples left; ")
        self._it = None
        cost = self.resume_cost()
        return note + (f"rank {self.rank} data resume: {cost['shards_skipped']} shards skipped, "
                       f"{cost['shards_reopened']} reopened, {cost['samples_replayed']} samples replayed, "
                       f"{cost['samples_skipped']} passed over undecoded")

    def _slot_counter(self, epoch: int, deal: Deal) -> SlotCounter:
        """How many of a saved segment's first n slots of `epoch`, dealt by `deal`, each source fills (the
        resplit's per-source skips)."""
        if len(self.sources) == 1:
            return lambda seg, n: [n]

        def count(seg: Segment, n: int) -> list[int]:
            return role_counts(self.mixture, epoch, deal, seg.src[0], seg.src[2], seg.start, n)

        return count

    def _new_epoch(self, saved_epoch: int, why: str) -> str:
        self.position = self._fresh(saved_epoch + 1, [0] * len(self.sources))
        self._it = None
        note = (f"{why}: data.on_shard_list_change=new_epoch, so the rest of epoch {saved_epoch} is skipped and epoch "
                f"{saved_epoch + 1} starts over the {len(self.urls):,} shards listed now")
        log.warning(note)
        return note

    def resume_cost(self) -> dict[str, int]:
        """Summed over this rank's roles and sources: what resuming from the current position re-reads and avoids."""
        total: Counter[str] = Counter()
        for role in self.position.roles:
            for seg in role.segments:
                for k, pos in enumerate(seg.streams):
                    n_urls = len(self.sources[k].urls)
                    split = len(source_shards(n_urls, stream_seed(self.seed, k), self.position.epoch, seg.src))
                    total.update(resume_cost(pos.cursor, split))
                    total["samples_skipped"] += pos.skip
        return {k: total[k] for k in ("shards_skipped", "shards_reopened", "samples_replayed", "samples_skipped")}
