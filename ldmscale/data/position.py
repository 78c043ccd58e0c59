"""A rank's data position, saved by every rank in every checkpoint, and its re-division when a run resumes on
a different number of ranks or loader workers.

One rank's epoch is played by `workers` roles (the DataLoader takes batch b from role b % workers). A role
plays a list of *segments*; a segment is a number of batches from one source stream (a (rank, world, role,
workers) split of the epoch's shards, see stream.py), starting at that stream's cursor after `skip` batches.
A fresh epoch gives every role one segment: its own source from the start. An elastic resume concatenates
the remaining segments of every old role and cuts the sequence into contiguous pieces for the new roles, so
every batch the old run still had to give in the epoch is given exactly once.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any

from ldmscale.runtime.errors import InputError

FORMAT = 2  # 1 was (epoch, batches, consumed per role): a replay from the epoch's start


class PositionError(InputError, ValueError):
    """A saved data position cannot be resumed here; the message says why and what to do."""

    kind = "resume error"


def role_batches(total: int, workers: int, role: int) -> int:
    """Batches role `role` gives when a rank gives `total` round-robin over `workers` roles."""
    return len(range(role, total, workers))


def fresh_roles(rank: int, world: int, workers: int, total: int) -> list[dict[str, Any]]:
    return [{"segments": [{"src": [rank, world, j, workers], "batches": role_batches(total, workers, j),
                           "skip": 0, "cursor": None}], "counts": {}} for j in range(workers)]


@dataclass
class DataPosition:
    """Where one rank's loader stands in its epoch."""

    epoch: int = 0
    batches: int = 0  # batches this rank gave in the epoch
    epoch_batches: int = 0  # batches this rank gives in this epoch (differs from the usual after a re-split)
    world: int = 1  # ranks and loader workers the position was made for
    workers: int = 1
    roles: list[dict[str, Any]] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {"format": FORMAT, "epoch": self.epoch, "batches": self.batches, "epoch_batches": self.epoch_batches,
                "world": self.world, "workers": self.workers, "roles": copy.deepcopy(self.roles)}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> DataPosition:
        if d.get("format") != FORMAT:
            raise PositionError(
                "the checkpoint's data position has an older format (a replay from the epoch's start); resume it "
                "with the ldmscale version that wrote it, or start the data afresh with --resume never"
            )
        return cls(epoch=int(d["epoch"]), batches=int(d["batches"]), epoch_batches=int(d["epoch_batches"]),
                   world=int(d["world"]), workers=int(d["workers"]), roles=copy.deepcopy(d["roles"]))

    @property
    def remaining(self) -> int:
        return self.epoch_batches - self.batches


def resplit(saved: list[DataPosition], world: int, workers: int, rank: int) -> DataPosition:
    """This rank's share of the rest of the saved epoch, for `world` ranks x `workers` loader workers.

    The remaining batches of all saved ranks (in rank, role, segment order) are cut into `world` equal
    contiguous runs, and each run into per-role pieces; a piece starting inside a segment skips (decodes and
    drops) the batches before it, so nothing is repeated or left out.
    """
    if not saved:
        raise PositionError("no saved data positions to re-divide")
    epochs = {p.epoch for p in saved}
    given = {p.batches for p in saved}  # ranks step together: every rank gave as many batches
    if len(epochs) != 1 or len(given) != 1:
        raise PositionError(f"the saved ranks' data positions disagree (epochs {sorted(epochs)}): the checkpoint "
                            f"mixes ranks from different saves")
    pieces: list[dict[str, Any]] = []
    for p in saved:
        for role in p.roles:
            pieces += [seg for seg in role["segments"] if seg["batches"] > 0]
    total = sum(seg["batches"] for seg in pieces)
    if total % world:
        raise PositionError(
            f"{total} micro-batches are left in epoch {saved[0].epoch}, which {world} ranks cannot share equally: "
            f"keep train.global_batch_size and train.micro_batch_size as they were (the global batch must be a "
            f"multiple of micro_batch_size x ranks)"
        )
    per_rank = total // world
    start = rank * per_rank
    roles = []
    for j in range(workers):
        n = role_batches(per_rank, workers, j)
        roles.append({"segments": _cut(pieces, start, start + n), "counts": {}})
        start += n
    if rank == 0:  # keep the epoch's drop counters (the trainer sums them over ranks)
        for p in saved:
            for role in p.roles:
                for k, v in role.get("counts", {}).items():
                    roles[0]["counts"][k] = roles[0]["counts"].get(k, 0) + v
    return DataPosition(epoch=saved[0].epoch, batches=0, epoch_batches=per_rank, world=world, workers=workers,
                        roles=roles)


def _cut(pieces: list[dict[str, Any]], lo: int, hi: int) -> list[dict[str, Any]]:
    """The segments covering batches [lo, hi) of the concatenated pieces."""
    out, pos = [], 0
    for seg in pieces:
        a, b = max(lo, pos), min(hi, pos + seg["batches"])
        if a < b:
            out.append({**copy.deepcopy(seg), "skip": seg["skip"] + (a - pos), "batches": b - a})
        pos += seg["batches"]
    return out
