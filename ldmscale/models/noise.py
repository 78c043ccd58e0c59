"""Per-sample randomness as a pure function of (seed, global sample index, stream), drawn on the device.

DeepSpeed checkpoints hold no RNG state, and global RNGs advance differently with world size and
accumulation. Every value here is a function of (seed, stream, sample id, element index) only, so a resumed
run is bitwise equal to an uninterrupted one, and 1 rank x accumulation 2 equal to 2 ranks.

The generator is counter-based: draw j of sample `id` is SplitMix64's output number j+1 for a state keyed by
(seed, stream, id), computed with int64 tensor ops on the device the draw is needed on (normals take two
elements from each draw, Box-Muller's cos and sin; uniforms and integers one draw). One batch costs a
dozen elementwise kernels on the device and no host-to-device copy (tools/bench/noise_bench.py times it
against per-sample CPU generators: docs/results/noise-bench.md). Integer ops are exact, so the bits are the
same on every device; the float transforms (log, cos) may differ by an ulp between CPU and GPU kernels.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from enum import IntEnum

import torch

_MASK = (1 << 64) - 1
_GAMMA = 0x9E3779B97F4A7C15  # SplitMix64's state increment
_M1, _M2 = 0xBF58476D1CE4E5B9, 0x94D049BB133111EB


class Stream(IntEnum):
    TIMESTEP = 1
    NOISE = 2
    POSTERIOR = 3
    CAPTION_DROP = 4
    NOISE_OFFSET = 5
    STYLE = 6
    STYLE_DROP = 7
    SAMPLING = 8


def splitmix64(x: int) -> int:
    """SplitMix64 on a Python int (the reference the tensor version must equal; also keys (seed, stream))."""
    x = (x + _GAMMA) & _MASK
    x = ((x ^ (x >> 30)) * _M1) & _MASK
    x = ((x ^ (x >> 27)) * _M2) & _MASK
    return x ^ (x >> 31)


def _as_int64(c: int) -> int:
    """The int64 with the same 64 bits as the unsigned constant c."""
    c &= _MASK
    return c - (1 << 64) if c >= 1 << 63 else c


def _srl(x: torch.Tensor, k: int) -> torch.Tensor:
    """Logical right shift of int64 bit patterns (torch's >> is arithmetic: it copies the sign bit)."""
    return (x >> k) & ((1 << (64 - k)) - 1)


def splitmix64_tensor(x: torch.Tensor) -> torch.Tensor:
    """splitmix64 elementwise on int64 tensors holding uint64 bit patterns (adds and multiplies wrap).
    In place on a fresh copy: the CPU path is bound by memory passes, not arithmetic."""
    x = x + _as_int64(_GAMMA)
    x ^= _srl(x, 30)
    x *= _as_int64(_M1)
    x ^= _srl(x, 27)
    x *= _as_int64(_M2)
    x ^= _srl(x, 31)
    return x


def _ids_tensor(ids: Sequence[int] | torch.Tensor, device: torch.device) -> torch.Tensor:
    if isinstance(ids, range):  # the trainer's case: built on the device, nothing to copy
        return torch.arange(ids.start, ids.stop, ids.step, dtype=torch.int64, device=device)
    # non_blocking: a small pageable copy is staged at once; a blocking one would wait for the GPU's queue
    return torch.as_tensor(list(ids) if not torch.is_tensor(ids) else ids, dtype=torch.int64).to(
        device, non_blocking=True)


def random_bits(seed: int, ids: Sequence[int] | torch.Tensor, count: int, stream: Stream,
                device: torch.device | str | None = None) -> torch.Tensor:
    """[len(ids), count] int64 of 64 random bits each; row i depends only on (seed, ids[i], stream)."""
    device = torch.device(device or "cpu")
    base = splitmix64(splitmix64(seed & _MASK) ^ int(stream))
    keys = splitmix64_tensor(_ids_tensor(ids, device) ^ _as_int64(base))
    # SplitMix64's sequence from state `key`: output j (from 0) is mix(key + (j + 1) * gamma)
    steps = torch.arange(count, dtype=torch.int64, device=device) * _as_int64(_GAMMA)
    return splitmix64_tensor(keys[:, None] + steps[None, :])


def _unit(bits: torch.Tensor) -> torch.Tensor:
    """Top 53 bits -> float64 uniform in [0, 1)."""
    return _srl(bits, 11).double() * 2.0**-53


def randn(seed: int, ids: Sequence[int] | torch.Tensor, shape: Sequence[int], stream: Stream,
          device: torch.device | str | None = None, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """[len(ids), *shape] standard normal (Box-Muller on two 24-bit fields of each 64-bit draw)."""
    shape = tuple(int(s) for s in shape)
    count = math.prod(shape)
    # Box-Muller gives two normals per 64-bit draw (r cos, r sin): half the integer work
    bits = random_bits(seed, ids, (count + 1) // 2, stream, device)
    # float32 from 24-bit uniforms, as torch's own randn: u1 in (0, 1] keeps the log finite (tails to 5.8 sigma)
    r = (_srl(bits, 40).float() + 1.0).mul_(2.0**-24).log_().mul_(-2.0).sqrt_()
    theta = ((bits >> 16) & 0xFFFFFF).float().mul_(2.0 * torch.pi * 2.0**-24)
    z = torch.stack([r * theta.cos(), r.mul_(theta.sin_())], dim=-1).flatten(1)[:, :count]
    return z.to(dtype).reshape(len(z), *shape)


def rand(seed: int, ids: Sequence[int] | torch.Tensor, stream: Stream,
         device: torch.device | str | None = None) -> torch.Tensor:
    """[len(ids)] float64 uniform in [0, 1) (float64: a float32 could round up to 1.0)."""
    return _unit(random_bits(seed, ids, 1, stream, device)[:, 0])


def randint(seed: int, ids: Sequence[int] | torch.Tensor, high: int, stream: Stream,
            device: torch.device | str | None = None) -> torch.Tensor:
    """[len(ids)] int64 uniform in [0, high)."""
    return (_unit(random_bits(seed, ids, 1, stream, device)[:, 0]) * high).long().clamp_(max=high - 1)


def timesteps(seed: int, ids: Sequence[int] | torch.Tensor, num_timesteps: int, sampling: str = "uniform",
              logit_mean: float = 0.0, logit_std: float = 1.0,
              device: torch.device | str | None = None) -> torch.Tensor:
    """[len(ids)] int64 training timesteps in [0, num_timesteps) (model.timestep_sampling).

    uniform: as `randint`. logit_normal (SD3): u = sigmoid(logit_mean + logit_std * z) with z one normal of the
    sample's TIMESTEP stream, the formula of diffusers' compute_density_for_timestep_sampling, then
    t = floor(u * num_timesteps); in float64, so t never reaches num_timesteps."""
    if sampling == "uniform":
        return randint(seed, ids, num_timesteps, Stream.TIMESTEP, device)
    if sampling != "logit_normal":
        raise ValueError(f"unknown timestep sampling {sampling!r}")
    z = randn(seed, ids, (1,), Stream.TIMESTEP, device)[:, 0].double()
    u = torch.sigmoid(z * logit_std + logit_mean)
    return (u * num_timesteps).long().clamp_(max=num_timesteps - 1)
