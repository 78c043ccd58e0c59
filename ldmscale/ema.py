"""An fp32 exponential moving average of the trainable weights, correct under every ZeRO stage.

Under ZeRO-3 each rank holds only a shard of every parameter, so the update gathers the full
parameters (a collective every rank joins) and rank 0 alone keeps the EMA: one full fp32 copy on
one process rather than one per rank. Under ZeRO 0-2 parameters are whole on every rank already.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import deepspeed
import torch


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


class EMA:
    def __init__(self, named_params: list[tuple[str, torch.nn.Parameter]], decay: float, keep: bool) -> None:
        """`keep` is True on the one rank that stores the average (rank 0); the others only join gathers."""
        self.decay = decay
        self.names = [n for n, _ in named_params]
        self.params = [p for _, p in named_params]
        self.keep = keep
        self.shadow: dict[str, torch.Tensor] = {}
        with gathered(self.params):
            if keep:
                self.shadow = {n: p.detach().float().clone() for n, p in zip(self.names, self.params)}

    @torch.no_grad()
    def update(self, decay: float | None = None) -> None:
        d = self.decay if decay is None else decay
        with gathered(self.params):
            if self.keep:
                shadows = [self.shadow[n] for n in self.names]
                torch._foreach_lerp_(shadows, [p.detach().float() for p in self.params], 1.0 - d)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return self.shadow

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        if not self.keep:
            return
        missing = set(self.names) - set(state)
        if missing:
            raise KeyError(f"EMA state lacks {len(missing)} parameters, e.g. {sorted(missing)[:3]}")
        for n in self.names:
            self.shadow[n].copy_(state[n])
