"""An fp32 exponential moving average of the trainable weights, correct under every ZeRO stage.

`EMA` averages the optimizer's fp32 master weights, not the bf16 working copies, and each rank
keeps only the EMA of its own share of them: the master partition ZeRO 1-3 already gave it, or under
ZeRO-0 (every rank holds every master) whole parameters dealt out by size. An update is a local
`lerp` on each rank, no communication; the full average exists only when saving, sampling or exporting
(`state_dict`, a collective). The element-wise arithmetic is that of a full-copy EMA, so fp32 runs
give bitwise the same average as averaging the gathered parameters.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Protocol

import deepspeed
import torch
import torch.distributed as tdist


class SliceReader(Protocol):
    """Parts of a saved average, read on demand (ldmscale.checkpoint.slices.TensorSlices)."""

    def keys(self) -> set[str]: ...

    def flat_slice(self, name: str, start: int, numel: int) -> torch.Tensor: ...


def _is_zero3_param(p: torch.nn.Parameter) -> bool:
    return hasattr(p, "ds_id")


@contextmanager
def gathered(params: list[torch.nn.Parameter]) -> Iterator[None]:
    """Full parameters on every rank for the duration (no-op unless ZeRO-3 partitioned them)."""
    if any(_is_zero3_param(p) for p in params):
        with deepspeed.zero.GatheredParameters(params, modifier_rank=None):
            yield
    else:
        yield


def warmup_decay(decay: float, updates: int) -> float:
    """The usual EMA warm-up (as diffusers' EMAModel): (1 + n) / (10 + n), capped at `decay`. Without it a
    0.9999 average still holds e^-1 of the random initialisation after 10k steps, and features learned late
    (text conditioning, first of all) show in the EMA weights long after they show in the raw ones."""
    return min(decay, (1.0 + updates) / (10.0 + updates))


@dataclass
class Share:
    """This rank's part of one parameter: elements [start, start + numel) of the flattened parameter."""

    name: str
    start: int
    master: torch.Tensor  # the fp32 master weights of that part (a view that the optimizer updates in place)


def _dp_rank_world() -> tuple[int, int]:
    if tdist.is_initialized():
        return tdist.get_rank(), tdist.get_world_size()
    return 0, 1


def _zero3_share(name: str, p: Any, optimizer: Any) -> Share | None:
    """The slice of a ZeRO-3 parameter this rank owns, inside the optimizer's flat fp32 partition."""
    group, offset, _ = optimizer.grad_position[optimizer.get_param_id(p)]
    part = p.ds_tensor.ds_numel  # partition size; the last rank's tail is alignment padding
    start = optimizer._get_param_partition_rank(p) * part
    valid = max(0, min(part, p.ds_numel - start))
    if valid == 0:
        return None
    return Share(name, start, optimizer.fp32_partitioned_groups_flat[group].narrow(0, offset, valid))


def _zero0_masters(named: list[tuple[str, Any]], optimizer: Any) -> list[torch.Tensor]:
    """Every parameter's full fp32 master under ZeRO-0. bf16 runs wrap the optimizer in DeepSpeed's
    FP16_UnfusedOptimizer (fp32 copies per parameter, `fp32_groups`) or FP16_Optimizer (one flat fp32 copy per
    group, `fp32_groups_flat`); fp32 runs train the parameters themselves."""
    where: dict[int, torch.Tensor] = {}
    for i, params in enumerate(getattr(optimizer, "fp16_groups", None) or []):
        if getattr(optimizer, "fp32_groups", None):
            where.update({id(q): m.detach() for q, m in zip(params, optimizer.fp32_groups[i])})
            continue
        offset, flat = 0, optimizer.fp32_groups_flat[i].detach()
        for q in params:
            where[id(q)] = flat.narrow(0, offset, q.numel()).view(q.shape)
            offset += q.numel()
    return [where.get(id(p), p.detach()) for _, p in named]


def master_shares(named: list[tuple[str, Any]], optimizer: Any, rank: int, world: int) -> list[Share]:
    """This rank's shares of the fp32 master weights of `named`, for the optimizer DeepSpeed built."""
    if any(hasattr(p, "ds_id") for _, p in named):  # ZeRO-3
        shares = [_zero3_share(n, p, optimizer) for n, p in named]
        return [s for s in shares if s is not None]
    if any(hasattr(p, "_hp_mapping") for _, p in named):  # ZeRO-1/2 and BF16_Optimizer: linked fragments
        return [Share(n, p._hp_mapping.lp_fragment_address.start, p._hp_mapping.hp_fragment.detach())
                for n, p in named if getattr(p, "_hp_mapping", None) is not None]
    # ZeRO-0: whole parameters dealt to ranks, largest first to the least loaded (the same on every rank)
    masters = _zero0_masters(named, optimizer)
    load, owner = [0] * world, {}
    for i in sorted(range(len(named)), key=lambda i: -masters[i].numel()):
        owner[i] = min(range(world), key=load.__getitem__)
        load[owner[i]] += masters[i].numel()
    return [Share(n, 0, m) for i, ((n, _), m) in enumerate(zip(named, masters)) if owner[i] == rank]


def full_shape(p: Any) -> torch.Size:
    return p.ds_shape if hasattr(p, "ds_id") else p.shape


class EMA:
    """Per-rank EMA of the fp32 master partition; `state_dict()` consolidates (collective)."""

    BUCKET_ELEMENTS = 1 << 25  # consolidation reduces at most 128 MiB of fp32 at a time

    def __init__(self, named_params: list[tuple[str, torch.nn.Parameter]], decay: float,
                 optimizer: Any = None) -> None:
        self.decay = decay
        self.rank, self.world = _dp_rank_world()
        self.shapes = {n: full_shape(p) for n, p in named_params}
        self.named, self.optimizer = named_params, optimizer
        self.shares = master_shares(named_params, optimizer, self.rank, self.world)
        self.masters = [s.master for s in self.shares]
        # the same memory format as the master (channels_last weights under ZeRO-0 stay channels_last)
        self.shadows = [m.detach().float().clone() for m in self.masters]

    @torch.no_grad()
    def update(self, decay: float | None = None) -> None:
        d = self.decay if decay is None else decay
        if self.shadows:
            # .float() is the tensor itself for fp32 masters; bf16 parameters without one are averaged in fp32
            torch._foreach_lerp_(self.shadows, [m.float() for m in self.masters], 1.0 - d)

    def _buckets(self) -> Iterator[list[str]]:
        bucket: list[str] = []
        size = 0
        for n, shape in self.shapes.items():
            if bucket and size + math.prod(shape) > self.BUCKET_ELEMENTS:
                yield bucket
                bucket, size = [], 0
            bucket.append(n)
            size += math.prod(shape)
        if bucket:
            yield bucket

    @torch.no_grad()
    def state_dict(self) -> dict[str, torch.Tensor]:
        """The full fp32 average on rank 0 ({} on the others). Every rank must call it.

        Each bucket starts as -0.0 everywhere, the owners write their shares, and a sum-reduce to rank 0
        assembles it: x + (-0.0) == x for every float x (+0.0 and -0.0 included), so the result is bitwise
        the owners' values."""
        dev = torch.device("cuda", torch.cuda.current_device()) if (
            tdist.is_initialized() and tdist.get_backend() == "nccl") else torch.device("cpu")
        mine: dict[str, list[tuple[int, torch.Tensor]]] = {}
        for share, shadow in zip(self.shares, self.shadows):
            mine.setdefault(share.name, []).append((share.start, shadow))
        out: dict[str, torch.Tensor] = {}
        for names in self._buckets():
            sizes = [math.prod(self.shapes[n]) for n in names]
            buf = torch.full((sum(sizes),), -0.0, dtype=torch.float32, device=dev)
            offset = 0
            for n, size in zip(names, sizes):
                for start, shadow in mine.get(n, []):
                    buf[offset + start: offset + start + shadow.numel()] = shadow.reshape(-1)
                offset += size
            if self.world > 1:
                tdist.reduce(buf, dst=0)
            if self.rank == 0:
                for n, piece in zip(names, buf.cpu().split(sizes)):
                    out[n] = piece.view(self.shapes[n]).clone()
        return out

    @torch.no_grad()
    def load_state_dict(self, state: Mapping[str, torch.Tensor] | SliceReader) -> None:
        """Every rank takes its shares of the full average: from a dict (as `state_dict` wrote it), or from a
        reader of the saved file (ldmscale.checkpoint.slices.TensorSlices: `flat_slice(name, start, numel)`), which
        reads only this rank's share instead of the whole average on every rank."""
        missing = set(self.shapes) - set(state.keys())
        if missing:
            raise KeyError(f"EMA state lacks {len(missing)} parameters, e.g. {sorted(missing)[:3]}")
        if isinstance(state, Mapping):
            def read(name: str, start: int, numel: int) -> torch.Tensor:
                return state[name].reshape(-1)[start: start + numel]
        else:
            read = state.flat_slice
        # after a checkpoint load: resolve the master views again, in case the optimizer rebuilt its buffers
        self.shares = master_shares(self.named, self.optimizer, self.rank, self.world)
        self.masters = [s.master for s in self.shares]
        for share, shadow in zip(self.shares, self.shadows):
            shadow.copy_(read(share.name, share.start, shadow.numel()).view(shadow.shape))
