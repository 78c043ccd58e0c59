"""The mixture draw: which source fills each sample slot of an epoch, a pure function of (seed, epoch, slot).

A slot is a sample's index in its epoch as the epoch was dealt when it began (`Deal`): step x global batch +
(micro-batch x ranks + rank) x micro-batch + i, the trainer's global sample index counted from the epoch's first
step. Every slot draws its source on its own, with probability its weight (a counter-based hash: splitmix64 of
seed, epoch and slot), so the sources of an epoch's slots, and so each step's mixture, are the same on 1 or
1,024 ranks, for any micro-batch or loader-worker count. A resume on another world re-deals the rest of the
epoch's slots (position.py): each keeps its source and its sample, so the epoch's draws are given exactly once.

The draw knows nothing of shards: a slot of source k takes the next sample of its loader role's stream of
source k (batches.py), so the sample that fills a slot depends on the world, as with one source.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

GAMMA = 0x9E3779B97F4A7C15  # splitmix64's increment (2^64 / the golden ratio)
MASK = (1 << 64) - 1
CHUNK = 1 << 16  # slots drawn at a time (a role's epoch can hold millions)


def _mix_int(z: int) -> int:
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & MASK
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & MASK
    return z ^ (z >> 31)


def _mix(z: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser on a uint64 array (numpy wraps array arithmetic modulo 2^64)."""
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return z ^ (z >> np.uint64(31))


def uniforms(seed: int, epoch: int, slots: np.ndarray) -> np.ndarray:
    """One uniform in [0, 1) per slot: a pure function of (seed, epoch, slot)."""
    key = _mix_int((_mix_int((seed + GAMMA) & MASK) ^ (epoch & MASK)) & MASK)
    z = np.uint64(key) + (np.asarray(slots, dtype=np.int64).astype(np.uint64) + np.uint64(1)) * np.uint64(GAMMA)
    return (_mix(z) >> np.uint64(11)).astype(np.float64) * 2.0**-53


@dataclass(frozen=True)
class Mixture:
    """The sources' weights (normalised) and the run's seed: the source of any slot."""

    seed: int
    weights: tuple[float, ...]

    @classmethod
    def of(cls, seed: int, weights: list[float] | tuple[float, ...]) -> Mixture:
        total = float(sum(weights))
        return cls(seed, tuple(float(w) / total for w in weights))

    def sources(self, epoch: int, slots: np.ndarray) -> np.ndarray:
        """The source index of each slot (int64)."""
        slots = np.asarray(slots, dtype=np.int64)
        if len(self.weights) == 1:
            return np.zeros(slots.shape, dtype=np.int64)
        cum = np.cumsum(self.weights)
        picked = np.searchsorted(cum, uniforms(self.seed, epoch, slots), side="right")
        return np.minimum(picked, len(self.weights) - 1).astype(np.int64)

    def counts(self, epoch: int, slots: np.ndarray) -> list[int]:
        """How many of the slots each source fills."""
        return np.bincount(self.sources(epoch, slots), minlength=len(self.weights)).tolist()


@dataclass(frozen=True)
class Deal:
    """How an epoch's slots were dealt when it began: the ranks, loader workers, micro-batch and global batch.
    Rank r's b-th micro-batch of the epoch comes from role b % workers (the DataLoader's round-robin) and is
    micro-batch b % accumulation of step b // accumulation, as the trainer counts its global sample index."""

    world: int
    workers: int
    micro_batch: int
    global_batch: int

    @property
    def accumulation(self) -> int:
        return max(1, self.global_batch // (self.world * self.micro_batch))

    def slots(self, rank: int, role: int, start: int, n: int) -> np.ndarray:
        """The slots of role `role` of rank `rank`: its samples start .. start + n - 1, in the order it gives them."""
        t = np.arange(start, start + n, dtype=np.int64)
        batch = role + (t // self.micro_batch) * self.workers
        step, micro = np.divmod(batch, self.accumulation)
        return step * self.global_batch + (micro * self.world + rank) * self.micro_batch + t % self.micro_batch

    def to_dict(self) -> dict[str, int]:
        return {"world": self.world, "workers": self.workers, "micro_batch": self.micro_batch,
                "global_batch": self.global_batch}

    @classmethod
    def from_dict(cls, d: dict[str, int]) -> Deal:
        return cls(int(d["world"]), int(d["workers"]), int(d["micro_batch"]), int(d["global_batch"]))


def role_sources(mixture: Mixture, epoch: int, deal: Deal, rank: int, role: int, start: int, n: int
                 ) -> Iterator[int]:
    """The sources of a role's samples start .. start + n - 1, drawn CHUNK slots at a time."""
    for lo in range(start, start + n, CHUNK):
        yield from mixture.sources(epoch, deal.slots(rank, role, lo, min(CHUNK, start + n - lo))).tolist()


def role_counts(mixture: Mixture, epoch: int, deal: Deal, rank: int, role: int, start: int, n: int) -> list[int]:
    """How many of a role's samples start .. start + n - 1 each source fills."""
    total = np.zeros(len(mixture.weights), dtype=np.int64)
    for lo in range(start, start + n, CHUNK):
        slots = deal.slots(rank, role, lo, min(CHUNK, start + n - lo))
        total += np.bincount(mixture.sources(epoch, slots), minlength=len(mixture.weights))
    return total.tolist()
