"""A rank's data position, saved by every rank in every checkpoint, and its re-division when a run resumes with
another number of ranks, loader workers or another micro-batch.

Everything is counted in *samples* of the source streams (stream.py: filtered, undecoded), never in
micro-batches, so a micro-batch change converts exactly. One rank's epoch is played by `workers` roles (the
DataLoader takes batch b from role b % workers); a role plays a list of *segments*. A segment is a run of one
role's slots of the epoch's deal (mixture.py), each slot filled from that role's stream of the source the
mixture drew for it (one stream per source: a (rank, world, role, workers) split of the source's shards), so a
segment holds one stream position per source: a cursor and a number of samples to pass over first, read but
never decoded. A fresh epoch gives every role one segment: its own slots and streams from the start. A
re-division concatenates the remaining segments of the saved ranks (rank, role, segment order) and cuts the
sequence into contiguous pieces for the new ranks and roles, so every sample the old run still had to give in
the epoch is given exactly once, in the slot (and from the source) it was drawn for.

The position also records the micro-batch and global batch it was made with, the mixture (each source's name and
weight) and a fingerprint of each source's shard list (count + SHA-256 of the URLs): a resume over another
mixture or list is refused, or starts the next epoch (data.on_shard_list_change), never silently reads shifted
indices."""

from __future__ import annotations

import base64
import copy
import gzip
import hashlib
import json
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from ldmscale.data.mixture import Deal
from ldmscale.data.stream import Split, StreamCursor
from ldmscale.runtime.errors import InputError

FORMAT = 4  # 3: one source; 2 counted micro-batches (no micro-batch change, no shard-list check); 1 replayed the epoch
READABLE = (3, 4)
SHORTHAND = "default"  # the name of data.shards' one source (sources.py)


class PositionError(InputError, ValueError):
    """A saved data position cannot be resumed here; the message says why and what to do."""

    kind = "resume error"


@dataclass(frozen=True)
class ShardListId:
    """What a position's shard indices refer to: the list's length and the SHA-256 of its URLs."""

    count: int
    sha256: str

    @classmethod
    def of(cls, urls: list[str]) -> ShardListId:
        return cls(len(urls), hashlib.sha256("\n".join(urls).encode()).hexdigest())

    def to_dict(self) -> dict[str, Any]:
        return {"count": self.count, "sha256": self.sha256}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ShardListId:
        return cls(int(d["count"]), str(d["sha256"]))


def pack_urls(urls: list[str]) -> str:
    """The shard list, small enough for rank 0's position (41,456 LAION URLs: ~100 kB), to say what changed."""
    return base64.b64encode(gzip.compress("\n".join(urls).encode(), mtime=0)).decode()


def unpack_urls(packed: str) -> list[str]:
    return gzip.decompress(base64.b64decode(packed)).decode().split("\n")


def shard_list_change(saved: ShardListId, urls: list[str], saved_urls: list[str] | None) -> str:
    """One line: how the shard list differs from the saved one, and the ways out."""
    if saved_urls is not None:
        before, now = set(saved_urls), set(urls)
        added, removed = len(now - before), len(before - now)
        what = (f"{added} shard(s) added and {removed} removed" if added or removed
                else "the same shards in another order")
    else:
        what = f"{saved.count} shards then, {len(urls)} now"
    return (f"data.shards lists other shards than when the checkpoint was saved ({what}): the saved data position "
            f"indexes the old list. Restore the old list to continue the epoch exactly, or set "
            f"data.on_shard_list_change=new_epoch to start the next epoch over the new list")


@dataclass
class StreamPos:
    """Where one source's stream of a segment stands: its cursor (None: the start of its epoch), the samples to
    pass over first (read, never decoded: other roles give them), and its drop counters when this segment last
    counted them (a sample dropped before, by the skip or by the role that gave the stream's earlier part, is not
    counted again)."""

    cursor: StreamCursor | None = None
    skip: int = 0
    baseline: dict[str, int] | None = None

    def to_dict(self) -> dict[str, Any]:
        return {"cursor": self.cursor.to_dict() if self.cursor is not None else None, "skip": self.skip,
                "baseline": dict(self.baseline) if self.baseline is not None else None}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> StreamPos:
        return cls(cursor=StreamCursor.from_dict(d["cursor"]) if d["cursor"] is not None else None,
                   skip=int(d["skip"]),
                   baseline={k: int(v) for k, v in d["baseline"].items()} if d["baseline"] is not None else None)


@dataclass
class Segment:
    """Samples of one role of the epoch's deal (`src`): its slots start .. start + samples - 1, each filled from
    that role's stream of the source the slot draws (mixture.py), one stream position per source. With one
    source, a number of samples from one stream."""

    src: Split
    samples: int  # samples it still gives
    start: int = 0  # the role's slot (its sample ordinal in the epoch) this segment gives first
    streams: list[StreamPos] = field(default_factory=lambda: [StreamPos()])

    @property
    def skip(self) -> int:
        """Samples its streams pass over before its first (0: it continues where a role stopped)."""
        return sum(s.skip for s in self.streams)

    def to_dict(self) -> dict[str, Any]:
        return {"src": list(self.src), "samples": self.samples, "start": self.start,
                "streams": [s.to_dict() for s in self.streams]}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Segment:
        src = tuple(int(x) for x in d["src"])
        split = (src[0], src[1], src[2], src[3])
        if "streams" not in d:  # format 3: one source
            return cls(split, int(d["samples"]), 0, [StreamPos.from_dict(d)])
        return cls(split, int(d["samples"]), int(d["start"]), [StreamPos.from_dict(s) for s in d["streams"]])


@dataclass
class Pending:
    """A sample a role read but has not given yet (aspect buckets: it waits in its bucket's queue), as its address
    in the streams, not its pixels: the epoch and source stream it came from, the stream's cursor right after it,
    its key (checked when it is read again) and its bucket ("WxH", to deal it on an elastic resume unread)."""

    epoch: int
    source: int
    src: Split
    cursor: StreamCursor
    key: str
    bucket: str


def _pending_to_dict(items: list[Pending]) -> dict[str, Any]:
    """Pending samples of one role, the cursors' shared parts (a block's start: the same for most) stored once."""
    table: dict[str, int] = {}
    blocks: list[dict[str, Any]] = []
    rows = []
    for p in items:
        block = StreamCursor(p.cursor.start, 0, p.cursor.failures).to_dict()
        text = json.dumps(block, sort_keys=True)
        if text not in table:
            table[text] = len(blocks)
            blocks.append(block)
        rows.append([p.epoch, p.source, *p.src, table[text], p.cursor.taken, p.key, p.bucket])
    return {"blocks": blocks, "items": rows}


def _pending_from_dict(d: dict[str, Any]) -> list[Pending]:
    blocks = [StreamCursor.from_dict(b) for b in d["blocks"]]
    out = []
    for epoch, source, r, w, j, n, block, taken, key, bucket in d["items"]:
        c = blocks[int(block)]
        out.append(Pending(int(epoch), int(source), (int(r), int(w), int(j), int(n)),
                           StreamCursor(c.start, int(taken), c.failures), str(key), str(bucket)))
    return out


@dataclass
class RolePlan:
    """What one loader worker role still gives this epoch, and what it dropped so far (by source, by reason).
    With aspect buckets also the samples it read and has not given (`pending`, in arrival order) and, once it read
    into the next epoch's samples to fill its last batches, what it still gives of that epoch (`ahead`)."""

    segments: list[Segment] = field(default_factory=list)
    counts: list[dict[str, int]] = field(default_factory=lambda: [{}])
    pending: list[Pending] = field(default_factory=list)
    ahead: RolePlan | None = None

    @property
    def samples(self) -> int:
        return sum(s.samples for s in self.segments)

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"segments": [s.to_dict() for s in self.segments],
                             "counts": [dict(c) for c in self.counts]}
        if self.pending:  # square batching never has any: its positions stay as they were
            d["pending"] = _pending_to_dict(self.pending)
        if self.ahead is not None:
            d["ahead"] = self.ahead.to_dict()
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> RolePlan:
        counts = d["counts"] if isinstance(d["counts"], list) else [d["counts"]]  # format 3: one source
        return cls([Segment.from_dict(s) for s in d["segments"]], [{k: int(v) for k, v in c.items()} for c in counts],
                   _pending_from_dict(d["pending"]) if "pending" in d else [],
                   cls.from_dict(d["ahead"]) if d.get("ahead") is not None else None)


@dataclass
class NextEpoch:
    """A rank's slots of the next epoch when they are not its fresh ones. After an elastic resume with aspect
    buckets, the saved ranks' roles may have read ahead into their next-epoch slots (and given some of them): the
    next epoch then goes on in the saved division (`deal`) from where each saved role stood in it, re-divided over
    the new ranks like the epoch's rest, so no sample read ahead is given twice."""

    roles: list[RolePlan]
    deal: Deal

    def to_dict(self) -> dict[str, Any]:
        return {"roles": [r.to_dict() for r in self.roles], "deal": self.deal.to_dict()}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> NextEpoch:
        return cls([RolePlan.from_dict(r) for r in d["roles"]], Deal.from_dict(d["deal"]))


def epoch_batches(samples_per_epoch: int, global_batch: int, micro_batch: int, world: int) -> int:
    """A rank's micro-batches per epoch: the epoch's whole steps, each global_batch / (micro_batch x world) of them."""
    return max(1, samples_per_epoch // global_batch) * max(1, global_batch // (micro_batch * world))


def role_batches(total: int, workers: int, role: int) -> int:
    """Batches role `role` gives when a rank gives `total` round-robin over `workers` roles."""
    return len(range(role, total, workers))


def fresh_roles(rank: int, world: int, workers: int, batches: int, micro_batch: int, sources: int = 1
                ) -> list[RolePlan]:
    """A rank's fresh epoch of `batches` micro-batches: every role its own streams (one per source) from the start."""
    return [RolePlan([Segment((rank, world, j, workers), role_batches(batches, workers, j) * micro_batch, 0,
                              [StreamPos() for _ in range(sources)])], [{} for _ in range(sources)])
            for j in range(workers)]


@dataclass(frozen=True)
class SourceId:
    """What a position's streams of one source refer to: its name, normalised weight and shard list."""

    name: str
    weight: float
    shards: ShardListId

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "weight": self.weight, "shards": self.shards.to_dict()}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> SourceId:
        return cls(str(d["name"]), float(d["weight"]), ShardListId.from_dict(d["shards"]))


@dataclass
class DataPosition:
    """Where one rank's loader stands in its epoch."""

    epoch: int = 0
    given: int = 0  # samples this rank gave in the epoch
    epoch_samples: int = 0  # samples this rank gives in this epoch (differs from the usual after a re-division)
    micro_batch: int = 1  # what the position was made for: micro-batch, global batch, ranks, loader workers
    global_batch: int = 1
    world: int = 1
    workers: int = 1
    sources: list[SourceId] = field(default_factory=list)  # the mixture: each source's name, weight, shard list
    deal: Deal | None = None  # how the epoch's slots were dealt when it began (the mixture draw's slot numbers)
    roles: list[RolePlan] = field(default_factory=list)
    drawn: list[int] = field(default_factory=list)  # samples this rank gave from each source since the run began
    shard_urls: list[str] | None = None  # rank 0 only: each source's packed shard list (pack_urls)
    following: NextEpoch | None = None  # the next epoch's slots, when not the rank's fresh ones (NextEpoch)

    @property
    def remaining(self) -> int:
        return self.epoch_samples - self.given

    @property
    def batches(self) -> int:
        """Micro-batches this rank gave in the epoch (the next one comes from role batches % workers)."""
        return self.given // self.micro_batch

    def to_dict(self) -> dict[str, Any]:
        d = {"format": FORMAT, "epoch": self.epoch, "given": self.given, "epoch_samples": self.epoch_samples,
             "micro_batch": self.micro_batch, "global_batch": self.global_batch, "world": self.world,
             "workers": self.workers, "sources": [s.to_dict() for s in self.sources],
             "deal": self.deal.to_dict() if self.deal is not None else None, "drawn": list(self.drawn),
             "roles": [r.to_dict() for r in self.roles]}
        if self.shard_urls is not None:
            d["shard_urls"] = self.shard_urls
        if self.following is not None:
            d["next_epoch"] = self.following.to_dict()
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> DataPosition:
        if d.get("format") not in READABLE:
            raise PositionError(
                f"the checkpoint's data position has format {d.get('format', 1)}, written by an older ldmscale "
                f"(this one reads formats {', '.join(map(str, READABLE))}, and shuffles differently from older ones): "
                f"resume with the version that wrote it to the end of epoch {d.get('epoch', '?')}, or set "
                f"data.on_shard_list_change=new_epoch to start the next epoch"
            )
        world, workers = int(d["world"]), int(d["workers"])
        micro, global_batch = int(d["micro_batch"]), int(d["global_batch"])
        if d["format"] == 3:  # one source, no mixture draw
            sources = [SourceId(SHORTHAND, 1.0, ShardListId.from_dict(d["shards"]))]
            deal, drawn = Deal(world, workers, micro, global_batch), [0]
            urls = [d["shard_urls"]] if d.get("shard_urls") else None
        else:
            sources = [SourceId.from_dict(s) for s in d["sources"]]
            deal, drawn, urls = Deal.from_dict(d["deal"]), [int(x) for x in d["drawn"]], d.get("shard_urls")
        return cls(epoch=int(d["epoch"]), given=int(d["given"]), epoch_samples=int(d["epoch_samples"]),
                   micro_batch=micro, global_batch=global_batch, world=world, workers=workers, sources=sources,
                   deal=deal, roles=[RolePlan.from_dict(r) for r in d["roles"]], drawn=drawn, shard_urls=urls,
                   following=NextEpoch.from_dict(d["next_epoch"]) if d.get("next_epoch") else None)

    def next_epoch_slots(self, rank: int, samples_per_epoch: int) -> NextEpoch:
        """What this position (of rank `rank`) has not read of the next epoch: each role from where it stands in
        it once it read ahead, else its slots of that epoch from the start; in the division they were dealt by."""
        if self.following is not None:
            roles, deal = self.following.roles, self.following.deal
        else:
            deal = Deal(self.world, self.workers, self.micro_batch, self.global_batch)
            batches = epoch_batches(samples_per_epoch, self.global_batch, self.micro_batch, self.world)
            roles = fresh_roles(rank, self.world, self.workers, batches, self.micro_batch, len(self.sources))
        return NextEpoch([role.ahead if role.ahead is not None else b for role, b in zip(self.roles, roles)], deal)


def saved_ranks_needed(rank: int, world: int, saved_world: int) -> range:
    """The saved ranks whose positions rank `rank` of `world` takes its share of the epoch from: every saved
    rank has as many samples left, so new rank r's contiguous share lies in saved ranks r*S/W .. (r+1)*S/W.
    Just [rank] on an unchanged world; 2 or 3 on 1,024 -> 768: a resume opens O(1) files per rank."""
    lo = rank * saved_world // world
    hi = max(lo + 1, math.ceil((rank + 1) * saved_world / world))
    return range(lo, min(hi, saved_world))


def check_whole_steps(left: int, epoch: int, saved_global: int, global_batch: int, per_batch: int) -> None:
    """The rest of an epoch (`left` samples over all ranks) must fill whole steps of a changed global batch, and
    whole micro-batches of every rank (`per_batch` = ranks x micro-batch)."""
    if (global_batch != saved_global and left % global_batch) or left % per_batch:
        raise PositionError(
            f"{left} samples are left in epoch {epoch} ({left / saved_global:g} steps of the saved global batch "
            f"{saved_global}), which a global batch of {global_batch} ({per_batch} samples a micro-batch over all "
            f"ranks) cannot take in whole steps: keep train.global_batch_size={saved_global} until the epoch ends, "
            f"or set data.on_shard_list_change=new_epoch to start the next epoch"
        )


# the sources of a segment's first n slots, counted per source: (segment, n) -> [count of source k]
SlotCounter = Callable[[Segment, int], list[int]]


def resplit(saved: dict[int, DataPosition], saved_world: int, *, world: int, workers: int, rank: int,
            micro_batch: int, global_batch: int, count_slots: SlotCounter) -> DataPosition:
    """This rank's share of the rest of the saved epoch, for `world` ranks x `workers` roles x `micro_batch`.

    `saved` holds (at least) the positions of saved_ranks_needed(rank, world, saved_world). The remaining samples
    of all saved ranks (in rank, role, segment order) are cut into `world` equal contiguous runs, and each run
    into per-role pieces of whole micro-batches; a piece starting inside a segment keeps the segment's slots (each
    with the source the mixture drew for it) and its streams skip (read, never decode) the samples of the slots
    before it, per source (`count_slots`). A role plays its pieces that need no skip first, so its first batch
    costs only the reopened shards. Each saved rank's counters go to exactly one new rank, so the job's sums stay.
    """
    needed = saved_ranks_needed(rank, world, saved_world)
    mine = _needed_positions(saved, needed, rank)
    first = _agreeing(mine, saved_world)
    for p in mine:
        if sum(role.samples for role in p.roles) != p.remaining:
            raise PositionError(f"a saved data position of epoch {p.epoch} is inconsistent (its roles hold "
                                f"{sum(role.samples for role in p.roles)} samples, {p.remaining} are left): resume "
                                f"from another step")
    left = saved_world * first.remaining
    check_whole_steps(left, first.epoch, first.global_batch, global_batch, world * micro_batch)
    per_rank = left // world
    batches = per_rank // micro_batch
    lo = rank * per_rank
    pieces: list[tuple[int, Segment]] = []  # (offset of the segment's first sample in the concatenation, segment)
    for r in needed:
        offset = r * first.remaining
        for role in saved[r].roles:
            for seg in role.segments:
                if seg.samples > 0:
                    pieces.append((offset, seg))
                    offset += seg.samples
    n_sources = len(first.sources)
    roles = []
    for j in range(workers):
        n = role_batches(batches, workers, j) * micro_batch
        cut = _cut(pieces, lo, lo + n, count_slots)
        roles.append(RolePlan(sorted(cut, key=lambda s: s.skip), [{} for _ in range(n_sources)]))  # the cheapest first
        lo += n
    drawn = _take_counters(saved, needed, world, saved_world, rank, roles, n_sources)
    return DataPosition(epoch=first.epoch, given=0, epoch_samples=per_rank, micro_batch=micro_batch,
                        global_batch=global_batch, world=world, workers=workers, sources=list(first.sources),
                        deal=first.deal, roles=roles, drawn=drawn)


def _add_counts(into: RolePlan, roles: list[RolePlan]) -> None:
    """Add the roles' drop counters (per source, by reason) to `into`'s."""
    for role in roles:
        for k, counts in enumerate(role.counts):
            for reason, v in counts.items():
                into.counts[k][reason] = into.counts[k].get(reason, 0) + v


def _take_counters(saved: dict[int, DataPosition], needed: range, world: int, saved_world: int, rank: int,
                   roles: list[RolePlan], n_sources: int) -> list[int]:
    """Saved rank r's counters (drops into roles[0], draws returned) go to the new rank whose share starts in it,
    so the job's sums stay."""
    drawn = [0] * n_sources
    for r in needed:
        if r * world // saved_world == rank:
            drawn = [a + b for a, b in zip(drawn, saved[r].drawn)]
            _add_counts(roles[0], saved[r].roles)
    return drawn


def _agreeing(mine: list[DataPosition], saved_world: int) -> DataPosition:
    """The first of saved ranks' positions, once checked to be of one save (epoch, samples left, world)."""
    first = mine[0]
    if {p.epoch for p in mine} != {first.epoch} or {p.remaining for p in mine} != {first.remaining}:
        raise PositionError("the saved ranks' data positions disagree (epochs or samples left): the checkpoint mixes "
                            "ranks from different saves; resume from another step")
    if any(p.world != saved_world for p in mine):
        raise PositionError(f"the saved data positions were made for {first.world} ranks, the checkpoint says "
                            f"{saved_world}: resume from another step")
    return first


def _needed_positions(saved: dict[int, DataPosition], needed: Sequence[int], rank: int) -> list[DataPosition]:
    """The saved positions a new rank's share comes from, in rank order; a missing one is a PositionError."""
    missing = [r for r in needed if r not in saved]
    if missing:
        raise PositionError(f"the data positions of saved rank(s) {missing[:5]} are needed to resume rank {rank}")
    return [saved[r] for r in needed]


def resplit_buckets(saved: dict[int, DataPosition], saved_world: int, *, world: int, workers: int, rank: int,
                    micro_batch: int, global_batch: int, samples_per_epoch: int,
                    slot_counter: Callable[[int, Deal], SlotCounter]) -> DataPosition:
    """resplit() for aspect-bucket batching (bucket_fill.py), from the same O(1) saved ranks' positions.

    The rank gives the same number of batches as resplit(), and takes the same share of the saved ranks: each saved
    rank stands for `remaining` samples, of which this rank takes units a .. b; it takes the same fraction of that
    saved rank's unread slots (in role, segment order) and of each bucket's waiting samples (in their saved order,
    those a role read ahead from the next epoch included). Its slots are cut into contiguous runs, one per role, in
    proportion to the role's batches, and its waiting samples are dealt bucket by bucket, round-robin over the
    roles that give batches. Saved roles may have read ahead into their next-epoch slots (and given some): the
    rank's next epoch takes the same fraction of each saved rank's unread next-epoch slots, in the saved division
    (NextEpoch), instead of a fresh one. Each sample is thus given once, in this epoch and the next.
    `slot_counter(epoch, deal)` counts a segment's slots per source for the epoch's deal."""
    needed = saved_ranks_needed(rank, world, saved_world)
    mine = _needed_positions(saved, needed, rank)
    first = _agreeing(mine, saved_world)
    left = saved_world * first.remaining
    check_whole_steps(left, first.epoch, first.global_batch, global_batch, world * micro_batch)
    per_rank, rem = left // world, first.remaining
    count_slots = slot_counter(first.epoch, first.deal)  # type: ignore[arg-type]
    pieces: list[tuple[int, Segment]] = []  # this rank's slots, as cut from the saved ranks
    waiting: dict[str, list[Pending]] = {}  # this rank's waiting samples, by bucket
    for r, p in zip(needed, mine):
        if rem == 0:  # saved at an epoch's very end: only waiting samples, to the rank its counters go to
            a, b, rem_r = (0, 1, 1) if r * world // saved_world == rank else (0, 0, 1)
        else:
            a, b, rem_r = max(rank * per_rank - r * rem, 0), min((rank + 1) * per_rank - r * rem, rem), rem
        if a >= b:
            continue
        total = sum(role.samples for role in p.roles)
        for seg in _cut(_concatenated(p.roles), a * total // rem_r, b * total // rem_r, count_slots):
            pieces.append((sum(x.samples for _, x in pieces), seg))
        by_bucket: dict[str, list[Pending]] = {}
        for role in p.roles:
            for item in role.pending:
                by_bucket.setdefault(item.bucket, []).append(item)
        for bucket, items in by_bucket.items():
            waiting.setdefault(bucket, []).extend(items[a * len(items) // rem_r : b * len(items) // rem_r])
    batches = [role_batches(per_rank // micro_batch, workers, j) for j in range(workers)]
    givers = [j for j, n in enumerate(batches) if n > 0] or list(range(workers))
    dealt: list[list[Pending]] = [[] for _ in range(workers)]
    for items in waiting.values():
        for n, item in enumerate(items):
            dealt[givers[n % len(givers)]].append(item)
    n_sources = len(first.sources)
    roles = [RolePlan(cut, [{} for _ in range(n_sources)], dealt[j])
             for j, cut in enumerate(_runs(pieces, batches, count_slots))]
    drawn = _take_counters(saved, needed, world, saved_world, rank, roles, n_sources)
    following = _next_epoch_share(saved, needed, world, saved_world, rank, workers,
                                  epoch_batches(samples_per_epoch, global_batch, micro_batch, world),
                                  samples_per_epoch, lambda deal: slot_counter(first.epoch + 1, deal))
    return DataPosition(epoch=first.epoch, given=0, epoch_samples=per_rank, micro_batch=micro_batch,
                        global_batch=global_batch, world=world, workers=workers, sources=list(first.sources),
                        deal=first.deal, roles=roles, drawn=drawn, following=following)


def _concatenated(roles: list[RolePlan]) -> list[tuple[int, Segment]]:
    """The roles' non-empty segments, in role, segment order, each with the offset of its first slot."""
    out, total = [], 0
    for role in roles:
        for seg in role.segments:
            if seg.samples > 0:
                out.append((total, seg))
                total += seg.samples
    return out


def _runs(pieces: list[tuple[int, Segment]], batches: list[int], count_slots: SlotCounter) -> list[list[Segment]]:
    """The pieces' slots cut into contiguous runs, one per role, in proportion to the role's batches (those needing
    no skip first, so a role's first batch costs only the reopened shards)."""
    slots = sum(seg.samples for _, seg in pieces)
    whole = max(1, sum(batches))
    return [sorted(_cut(pieces, slots * sum(batches[:j]) // whole, slots * sum(batches[: j + 1]) // whole,
                        count_slots), key=lambda seg: seg.skip)
            for j in range(len(batches))]


def _next_epoch_share(saved: dict[int, DataPosition], needed: range, world: int, saved_world: int, rank: int,
                      workers: int, batches_per_epoch: int, samples_per_epoch: int,
                      slot_counter: Callable[[Deal], SlotCounter]) -> NextEpoch:
    """This rank's share of the saved ranks' unread next-epoch slots (DataPosition.next_epoch_slots): of saved rank
    r, the fraction [rank x S/W - r, (rank + 1) x S/W - r] of its slots, so the new ranks' shares tile every saved
    rank's exactly whatever it had left of the current epoch; cut into one run per role. Saved rank r's counters of
    that epoch go with its other counters (_take_counters)."""
    pieces: list[tuple[int, Segment]] = []
    share: list[tuple[int, NextEpoch, int, int]] = []
    for r in needed:
        lo, hi = (min(max(k * saved_world - r * world, 0), world) for k in (rank, rank + 1))
        if lo < hi:  # always so for the saved rank whose counters this rank takes
            share.append((r, saved[r].next_epoch_slots(r, samples_per_epoch), lo, hi))
    deal = share[0][1].deal
    count_slots = slot_counter(deal)
    for _, nxt, lo, hi in share:
        own = _concatenated(nxt.roles)
        total = sum(seg.samples for _, seg in own)
        for seg in _cut(own, lo * total // world, hi * total // world, count_slots):
            pieces.append((sum(x.samples for _, x in pieces), seg))
    n_sources = len(saved[needed[0]].sources)
    roles = [RolePlan(cut, [{} for _ in range(n_sources)])
             for cut in _runs(pieces, [role_batches(batches_per_epoch, workers, j) for j in range(workers)],
                              count_slots)]
    for r, nxt, _, _ in share:
        if r * world // saved_world == rank:
            _add_counts(roles[0], nxt.roles)
    return NextEpoch(roles, deal)


def _cut(pieces: list[tuple[int, Segment]], lo: int, hi: int, count_slots: SlotCounter) -> list[Segment]:
    """The segments covering samples [lo, hi) of the concatenated pieces."""
    out = []
    for start, seg in pieces:
        a, b = max(lo, start), min(hi, start + seg.samples)
        if a >= b:
            continue
        if a == start:  # the piece continues the segment where it stands: its streams and counters go on
            streams = copy.deepcopy(seg.streams)
        else:  # its streams pass over the samples of the slots before it, source by source
            passed = count_slots(seg, a - start)
            streams = [StreamPos(copy.deepcopy(st.cursor), st.skip + n, None) for st, n in zip(seg.streams, passed)]
        out.append(Segment(seg.src, b - a, seg.start + (a - start), streams))
    return out


def sources_change(saved: list[SourceId], now: list[SourceId]) -> str | None:
    """What changed in the mixture itself (names, order, weights), or None. A one-source run compares no names:
    data.shards and a data.sources of one source read alike."""
    if len(saved) == len(now) == 1:
        return None
    if [s.name for s in saved] != [s.name for s in now]:
        return (f"data.sources names other sources than when the checkpoint was saved ("
                f"{', '.join(s.name for s in saved)} then, {', '.join(s.name for s in now)} now)")
    moved = [f"{a.name} {a.weight:.4g} -> {b.weight:.4g}" for a, b in zip(saved, now)
             if abs(a.weight - b.weight) > 1e-9]
    if moved:
        return f"data.sources weighs its sources otherwise than when the checkpoint was saved ({'; '.join(moved)})"
    return None


def mixture_change(saved: DataPosition, now: list[SourceId], urls: list[list[str]],
                   saved_urls: list[str] | None) -> str | None:
    """One line saying how the sources differ from the saved position's (the mixture, or a source's shard list) and
    the ways out, or None when they are the same."""
    what = sources_change(saved.sources, now)
    if what is not None:
        return (f"{what}: the rest of epoch {saved.epoch} was drawn with the old mixture. Restore it to continue the "
                f"epoch exactly, or set data.on_shard_list_change=new_epoch to start the next epoch with the new one")
    for k, (old, new) in enumerate(zip(saved.sources, now)):
        if old.shards != new.shards:
            line = shard_list_change(old.shards, urls[k], unpack_urls(saved_urls[k]) if saved_urls else None)
            return line if len(now) == 1 else f"source {new.name}: {line}"
    return None


def check_saved_shards(saved: dict[str, Any], sources: list[SourceId] | list[str], on_change: str,
                       urls: list[list[str]] | None = None) -> str | None:
    """A resume's sources against the checkpoint's, before anything heavy is built (rank 0, in the data plan, from
    saved rank 0's position, which holds the shard lists). The same: None. Another mixture or shard list:
    PositionError saying what changed (data.on_shard_list_change=refuse), or the warning line (new_epoch).
    `sources` may be a plain shard list (the one-source shorthand); `urls`: each source's URLs."""
    if sources and isinstance(sources[0], str):
        urls = [list(sources)]
        sources = [SourceId(SHORTHAND, 1.0, ShardListId.of(urls[0]))]
    assert urls is not None
    try:
        position = DataPosition.from_dict(saved)
    except PositionError:
        if on_change == "new_epoch":
            return (f"the checkpoint's data position was written by an older ldmscale: data.on_shard_list_change="
                    f"new_epoch, so epoch {int(saved.get('epoch', 0)) + 1} starts")
        raise
    line = mixture_change(position, sources, urls, position.shard_urls)  # type: ignore[arg-type]
    if line is None:
        return None
    if on_change == "new_epoch":
        then = sum(s.shards.count for s in position.sources)
        return (f"the data sources changed since the checkpoint ({then} shards then, {sum(map(len, urls))} now): "
                f"data.on_shard_list_change=new_epoch, so the rest of epoch {position.epoch} is skipped and epoch "
                f"{position.epoch + 1} starts over the new ones")
    raise PositionError(line)
