"""Per-bucket micro-batches from one loader worker role's stream (data.buckets.enabled): every micro-batch holds
samples of one aspect bucket, and which samples form which batch is a pure function of the role's stream.

Samples are read one at a time, in the role's order (its slots of the epoch), and appended undecoded to their
bucket's queue; a batch is the first `micro_batch` samples of the first queue to fill. Since one sample arrives at
a time, exactly one queue can fill per arrival, so the batch order does not depend on worker timing. A queue can
hold more than a batch only at an epoch's start (samples carried over after an elastic resume): then the queue whose
`micro_batch`-th sample arrived first is emptied first.

A role gives exactly its share of the rank's batches per epoch. When its slots run out before its last batch (its
buckets filled unevenly), it reads on into its slots of the *next* epoch (`ahead`), which that epoch then no longer
gives; when its batches are done before its slots, the rest of its slots is read into the queues. What is left in
the queues at an epoch's end is carried (with its epoch) into the next one and completes its buckets' first batches
there: no sample is dropped or repeated because its bucket came up short.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

from ldmscale.data.buckets import Bucket
from ldmscale.data.position import Pending, RolePlan
from ldmscale.data.stream import Split


class Samples(Protocol):
    """What BucketFill reads from (batches.RoleSamples)."""

    plan: RolePlan
    counts: list[Any]

    def take(self) -> Any: ...

    def snapshot(self) -> RolePlan: ...


@dataclass
class Entry:
    """A sample waiting in its bucket's queue."""

    arrival: int  # order of arrival in the role (restored samples first, in their saved order)
    epoch: int  # the epoch whose slot it fills (an earlier one when carried, the next when read ahead)
    src: Split  # the stream split it was read from
    item: Any  # batches._Item: key, caption, source, cursor after it, raw sample until decoded
    bucket: Bucket

    def pending(self) -> Pending:
        return Pending(self.epoch, self.item.source, self.src, self.item.cursor, self.item.key, self.bucket.name)


class BucketFill:
    """One role's bucket queues over its samples of `epoch` (`current`, of which `left` are still to be read) and,
    when those run out, over its samples of the next epoch (`ahead()`, opened on first need)."""

    def __init__(self, micro_batch: int, epoch: int, current: Samples, ahead: Callable[[], Samples],
                 assign: Callable[[Any, Samples], Bucket | None], ahead_started: bool = False) -> None:
        self.micro_batch, self.epoch, self.current = micro_batch, epoch, current
        self.left = current.plan.samples
        self._ahead_factory, self._ahead, self._ahead_left = ahead, None, 0
        self.assign = assign  # the sample's bucket, or None when it cannot have one (counted by `assign`)
        self.queues: dict[Bucket, deque[Entry]] = {}
        self._arrivals = 0
        if ahead_started:  # resumed after it read into the next epoch: keep that epoch's position whatever comes
            self._ahead = ahead()
            self._ahead_left = self._ahead.plan.samples

    def restore(self, entries: list[tuple[Pending, Any]]) -> None:
        """Refill the queues with saved pending samples (read again from their shards), in their saved order."""
        for p, item in entries:
            self._push(p.epoch, p.src, item, self.current)

    def _push(self, epoch: int, src: Split, item: Any, samples: Samples) -> None:
        bucket = self.assign(item, samples)
        if bucket is None:
            return
        self.queues.setdefault(bucket, deque()).append(Entry(self._arrivals, epoch, src, item, bucket))
        self._arrivals += 1

    def _read_one(self) -> None:
        if self.left > 0:
            self.left -= 1
            item = self.current.take()
            self._push(self.epoch, self.current.plan.segments[item.seg].src, item, self.current)
            return
        if self._ahead is None:
            self._ahead = self._ahead_factory()
            self._ahead_left = self._ahead.plan.samples
        if self._ahead_left == 0:
            raise RuntimeError(
                f"a loader role ran out of samples for its aspect-bucket batches in epoch {self.epoch} and the next "
                f"one: an epoch holds too few samples per role for {len(self.queues)} buckets of micro-batch "
                f"{self.micro_batch}; raise the epoch's size (data.samples_per_epoch) or lower data.num_workers")
        self._ahead_left -= 1
        item = self._ahead.take()
        self._push(self.epoch + 1, self._ahead.plan.segments[item.seg].src, item, self._ahead)

    def next_batch(self) -> list[Entry]:
        """The next micro-batch: reads samples until a queue holds a batch."""
        while True:
            full = [q for q in self.queues.values() if len(q) >= self.micro_batch]
            if full:
                queue = min(full, key=lambda q: q[self.micro_batch - 1].arrival)
                return [queue.popleft() for _ in range(self.micro_batch)]
            self._read_one()

    def drain(self) -> None:
        """Read the rest of the epoch's slots into the queues (after the role's last batch: carried, not lost)."""
        while self.left > 0:
            self._read_one()

    def pending(self) -> list[Pending]:
        waiting = sorted((e for q in self.queues.values() for e in q), key=lambda e: e.arrival)
        return [e.pending() for e in waiting]

    def snapshot(self) -> RolePlan:
        """The role's position right after the samples given: what it still reads of this epoch, what waits in
        its queues, and where it stands in the next epoch's samples if it read into them."""
        plan = self.current.snapshot()
        plan.pending = self.pending()
        plan.ahead = self._ahead.snapshot() if self._ahead is not None else None
        return plan
