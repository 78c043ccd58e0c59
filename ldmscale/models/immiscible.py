"""Immiscible diffusion (Li et al., NeurIPS 2024): within a micro-batch, each latent is noised with the drawn noise
sample nearest to it, as a minimum-total-distance one-to-one assignment (model.immiscible).

The noises are the same as without it (noise.py's draws for the batch's sample ids); only which latent gets which
changes, so a micro-batch's assignment is a function of its latents and ids: resume stays bitwise, and 1 rank x
accumulation 2 equals 2 ranks (the micro-batches are the same sets of samples).

Cost: the B x B score matrix is one matmul on the device; the assignment (scipy's linear_sum_assignment, the
Jonker-Volgenant-type shortest augmenting path, exact) runs on the host. That is one device-to-host round trip
per micro-batch, started right after the latents exist and awaited only after the text encoder and the other
draws were queued (`start` ... `finish`), so the device has work while the host solves. tools/bench/
immiscible_bench.py measures it at batch 64 and 256.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from scipy.optimize import linear_sum_assignment


@dataclass
class PendingAssignment:
    """A score matrix on its way to the host."""

    scores: torch.Tensor  # [B, B] on the host: <latent i, noise j>
    done: torch.cuda.Event | None  # recorded after the copy on CUDA; None when `scores` is ready now
    device: torch.device


def start(latents: torch.Tensor, noise: torch.Tensor) -> PendingAssignment:
    """Queue the scores <latent_i, noise_j> and their copy to the host; returns at once.

    Minimising sum ||x_i - n_pi(i)||^2 over permutations pi is maximising sum <x_i, n_pi(i)>: the squared norms
    form one term per row and one per column, which every assignment pays exactly once."""
    scores = latents.flatten(1).float() @ noise.flatten(1).float().T
    if scores.device.type != "cuda":
        return PendingAssignment(scores.cpu(), None, scores.device)
    host = torch.empty(scores.shape, dtype=scores.dtype, pin_memory=True)
    host.copy_(scores, non_blocking=True)
    done = torch.cuda.Event()
    done.record()
    return PendingAssignment(host, done, scores.device)


def finish(pending: PendingAssignment) -> torch.Tensor:
    """Wait for the scores, solve the assignment on the host: [B] int64 on the device, the noise index of each
    latent (noise[perm] is the assigned noise)."""
    if pending.done is not None:
        pending.done.synchronize()  # waits for the queue up to the scores' copy, not for later work
    rows, cols = linear_sum_assignment(pending.scores.double().numpy(), maximize=True)
    perm = torch.empty(len(cols), dtype=torch.int64, pin_memory=pending.device.type == "cuda")
    perm[torch.from_numpy(rows)] = torch.from_numpy(cols)
    return perm.to(pending.device, non_blocking=True)


def assign(latents: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """`noise` reordered so that latent i gets the noise the assignment gave it."""
    return noise[finish(start(latents, noise))]
