"""A rank's data position, saved by every rank in every checkpoint, and its re-division when a run resumes with
another number of ranks, loader workers or another micro-batch.

Everything is counted in *samples* of the source streams (stream.py: filtered, undecoded), never in
micro-batches, so a micro-batch change converts exactly. One rank's epoch is played by `workers` roles (the
DataLoader takes batch b from role b % workers); a role plays a list of *segments*, a segment being a number of
samples from one source stream (a (rank, world, role, workers) split of the epoch's shards), starting at that
stream's cursor after `skip` samples that are read but never decoded. A fresh epoch gives every role one
segment: its own source from the start. A re-division concatenates the remaining segments of the saved ranks
(rank, role, segment order) and cuts the sequence into contiguous pieces for the new ranks and roles, so every
sample the old run still had to give in the epoch is given exactly once.

The position also records the micro-batch and global batch it was made with and a fingerprint of the shard
list (count + SHA-256 of the URLs): a resume over another list is refused, or starts the next epoch
(data.on_shard_list_change), never silently reads shifted indices.
"""

from __future__ import annotations

import base64
import copy
import gzip
import hashlib
import math
from dataclasses import dataclass, field
from typing import Any

from ldmscale.data.stream import Source, StreamCursor
from ldmscale.runtime.errors import InputError

FORMAT = 3  # 2 counted micro-batches (no micro-batch change, no shard-list check); 1 replayed the epoch


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
class Segment:
    """Samples from one source stream."""

    src: Source
    samples: int  # stream samples it still gives
    skip: int = 0  # stream samples to pass over first (another role gives them): read, never decoded
    cursor: StreamCursor | None = None  # where the stream stands; None: the start of its epoch
    # the stream's drop counters when this segment last counted them: a sample dropped before it (by the skip,
    # or by the role that gave the stream's earlier part) is not counted again
    baseline: dict[str, int] | None = None

    def to_dict(self) -> dict[str, Any]:
        return {"src": list(self.src), "samples": self.samples, "skip": self.skip,
                "cursor": self.cursor.to_dict() if self.cursor is not None else None,
                "baseline": dict(self.baseline) if self.baseline is not None else None}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Segment:
        src = tuple(int(x) for x in d["src"])
        return cls(src=(src[0], src[1], src[2], src[3]), samples=int(d["samples"]), skip=int(d["skip"]),
                   cursor=StreamCursor.from_dict(d["cursor"]) if d["cursor"] is not None else None,
                   baseline={k: int(v) for k, v in d["baseline"].items()} if d["baseline"] is not None else None)


@dataclass
class RolePlan:
    """What one loader worker role still gives this epoch, and what it dropped so far (by reason)."""

    segments: list[Segment] = field(default_factory=list)
    counts: dict[str, int] = field(default_factory=dict)

    @property
    def samples(self) -> int:
        return sum(s.samples for s in self.segments)

    def to_dict(self) -> dict[str, Any]:
        return {"segments": [s.to_dict() for s in self.segments], "counts": dict(self.counts)}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> RolePlan:
        return cls([Segment.from_dict(s) for s in d["segments"]], {k: int(v) for k, v in d["counts"].items()})


def role_batches(total: int, workers: int, role: int) -> int:
    """Batches role `role` gives when a rank gives `total` round-robin over `workers` roles."""
    return len(range(role, total, workers))


def fresh_roles(rank: int, world: int, workers: int, batches: int, micro_batch: int) -> list[RolePlan]:
    """A rank's fresh epoch of `batches` micro-batches: every role its own source from the start."""
    return [RolePlan([Segment((rank, world, j, workers), role_batches(batches, workers, j) * micro_batch)])
            for j in range(workers)]


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
    shards: ShardListId = field(default_factory=lambda: ShardListId(0, ""))
    roles: list[RolePlan] = field(default_factory=list)
    shard_urls: str | None = None  # rank 0 only: the packed shard list (pack_urls), to name what changed

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
             "workers": self.workers, "shards": self.shards.to_dict(), "roles": [r.to_dict() for r in self.roles]}
        if self.shard_urls is not None:
            d["shard_urls"] = self.shard_urls
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> DataPosition:
        if d.get("format") != FORMAT:
            raise PositionError(
                f"the checkpoint's data position has format {d.get('format', 1)}, written by an older ldmscale "
                f"(this one reads format {FORMAT} and shuffles differently): resume with the version that wrote it "
                f"to the end of epoch {d.get('epoch', '?')}, or set data.on_shard_list_change=new_epoch to start "
                f"the next epoch"
            )
        return cls(epoch=int(d["epoch"]), given=int(d["given"]), epoch_samples=int(d["epoch_samples"]),
                   micro_batch=int(d["micro_batch"]), global_batch=int(d["global_batch"]), world=int(d["world"]),
                   workers=int(d["workers"]), shards=ShardListId.from_dict(d["shards"]),
                   roles=[RolePlan.from_dict(r) for r in d["roles"]], shard_urls=d.get("shard_urls"))


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


def resplit(saved: dict[int, DataPosition], saved_world: int, *, world: int, workers: int, rank: int,
            micro_batch: int, global_batch: int) -> DataPosition:
    """This rank's share of the rest of the saved epoch, for `world` ranks x `workers` roles x `micro_batch`.

    `saved` holds (at least) the positions of saved_ranks_needed(rank, world, saved_world). The remaining samples
    of all saved ranks (in rank, role, segment order) are cut into `world` equal contiguous runs, and each run
    into per-role pieces of whole micro-batches; a piece starting inside a segment skips (reads, never decodes)
    the samples before it. A role plays its pieces that need no skip first, so its first batch costs only the
    reopened shards. Each saved rank's drop counters go to exactly one new rank, so the job's sums stay.
    """
    needed = saved_ranks_needed(rank, world, saved_world)
    missing = [r for r in needed if r not in saved]
    if missing:
        raise PositionError(f"the data positions of saved rank(s) {missing[:5]} are needed to resume rank {rank}")
    mine = [saved[r] for r in needed]
    first = mine[0]
    if {p.epoch for p in mine} != {first.epoch} or {p.remaining for p in mine} != {first.remaining}:
        raise PositionError("the saved ranks' data positions disagree (epochs or samples left): the checkpoint mixes "
                            "ranks from different saves; resume from another step")
    if any(p.world != saved_world for p in mine):
        raise PositionError(f"the saved data positions were made for {first.world} ranks, the checkpoint says "
                            f"{saved_world}: resume from another step")
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
    roles = []
    for j in range(workers):
        n = role_batches(batches, workers, j) * micro_batch
        cut = _cut(pieces, lo, lo + n)
        roles.append(RolePlan(sorted(cut, key=lambda s: s.skip), {}))  # stable: a piece needing no skip first
        lo += n
    for r in needed:  # saved rank r's counters go to the new rank whose share starts in it
        if r * world // saved_world == rank:
            for role in saved[r].roles:
                for k, v in role.counts.items():
                    roles[0].counts[k] = roles[0].counts.get(k, 0) + v
    return DataPosition(epoch=first.epoch, given=0, epoch_samples=per_rank, micro_batch=micro_batch,
                        global_batch=global_batch, world=world, workers=workers, shards=first.shards, roles=roles)


def _cut(pieces: list[tuple[int, Segment]], lo: int, hi: int) -> list[Segment]:
    """The segments covering samples [lo, hi) of the concatenated pieces."""
    out = []
    for start, seg in pieces:
        a, b = max(lo, start), min(hi, start + seg.samples)
        if a < b:
            head = a == start  # the piece continues the segment where it stands: its counters go on
            out.append(Segment(seg.src, b - a, seg.skip + (a - start), copy.deepcopy(seg.cursor),
                               copy.deepcopy(seg.baseline) if head else None))
    return out


def check_saved_shards(saved: dict[str, Any], urls: list[str], on_change: str) -> str | None:
    """A resume's shard list against the checkpoint's, before anything heavy is built (rank 0, in the data plan,
    from saved rank 0's position, which holds the list). The same list: None. Another: PositionError saying how
    many shards were added and removed (data.on_shard_list_change=refuse), or the warning line (new_epoch)."""
    try:
        position = DataPosition.from_dict(saved)
    except PositionError:
        if on_change == "new_epoch":
            return (f"the checkpoint's data position was written by an older ldmscale: data.on_shard_list_change="
                    f"new_epoch, so epoch {int(saved.get('epoch', 0)) + 1} starts")
        raise
    if position.shards == ShardListId.of(urls):
        return None
    if on_change == "new_epoch":
        return (f"data.shards changed since the checkpoint ({position.shards.count} shards then, {len(urls)} now): "
                f"data.on_shard_list_change=new_epoch, so the rest of epoch {position.epoch} is skipped and epoch "
                f"{position.epoch + 1} starts over the new list")
    old = unpack_urls(position.shard_urls) if position.shard_urls else None
    raise PositionError(shard_list_change(position.shards, urls, old))
