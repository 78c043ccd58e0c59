"""Per-sample randomness as a pure function of (seed, global sample index, stream).

DeepSpeed checkpoints hold no RNG state, and global RNGs advance differently with world size and
accumulation. Drawing every sample's timestep, noise and dropout from its own generator makes a
resumed run bitwise equal to an uninterrupted one, and 1 rank x accumulation 2 equal to 2 ranks.
"""

from __future__ import annotations

from collections.abc import Sequence
from enum import IntEnum

import torch

_MASK = (1 << 64) - 1


class Stream(IntEnum):
    TIMESTEP = 1
    NOISE = 2
    POSTERIOR = 3
    CAPTION_DROP = 4
    NOISE_OFFSET = 5
    STYLE = 6
    STYLE_DROP = 7
    SAMPLING = 8


def _splitmix64(x: int) -> int:
    x = (x + 0x9E3779B97F4A7C15) & _MASK
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK
    return (x ^ (x >> 31)) & ((1 << 63) - 1)


def generator_for(seed: int, sample_id: int, stream: Stream) -> torch.Generator:
    g = torch.Generator()
    g.manual_seed(_splitmix64(_splitmix64(_splitmix64(seed) ^ int(stream)) ^ sample_id))
    return g


def randn(seed: int, ids: Sequence[int], shape: Sequence[int], stream: Stream) -> torch.Tensor:
    """[len(ids), *shape] standard normal; row i depends only on (seed, ids[i], stream)."""
    return torch.stack([torch.randn(tuple(shape), generator=generator_for(seed, int(i), stream)) for i in ids])


def rand(seed: int, ids: Sequence[int], stream: Stream) -> torch.Tensor:
    """[len(ids)] uniform in [0, 1)."""
    return torch.cat([torch.rand(1, generator=generator_for(seed, int(i), stream)) for i in ids])


def randint(seed: int, ids: Sequence[int], high: int, stream: Stream) -> torch.Tensor:
    return torch.cat([torch.randint(high, (1,), generator=generator_for(seed, int(i), stream)) for i in ids])
