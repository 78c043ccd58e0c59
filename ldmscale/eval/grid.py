"""Periodic sample grids drawn by every rank: each its share of the prompts, gathered to rank 0 for the grid.

The weights (EMA, whole on rank 0) are broadcast tensor by tensor into a U-Net every rank builds from the
config; image i starts from the noise of index i, so the grid is the one a single process would draw.
Rank 0 writes the files after the gather; nobody waits in a barrier for it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as tdist
from PIL import Image

from ldmscale.inference.generate import generate, to_uint8
from ldmscale.inference.images import write_samples
from ldmscale.inference.prompts import rank_indices


def broadcast_weights(module: torch.nn.Module, weights: dict[str, torch.Tensor], device: torch.device) -> None:
    """Rank 0's `weights` (the others pass {}) into `module` on every rank: one broadcast per tensor, in the
    module's own key order (the same on every rank)."""
    distributed = tdist.is_initialized()
    rank0 = not distributed or tdist.get_rank() == 0
    # gloo broadcasts CPU tensors, NCCL device tensors
    comm_device = device if distributed and tdist.get_backend() == "nccl" else torch.device("cpu")
    state = module.state_dict()
    for name, t in state.items():
        buf = weights[name].to(comm_device, t.dtype).contiguous() if rank0 else torch.empty_like(t, device=comm_device)
        if distributed:
            tdist.broadcast(buf, src=0)
        state[name] = buf
    module.load_state_dict(state, strict=True)


def draw_shared(unet: torch.nn.Module, encoders: Any, scheduler_config: dict, prompts: list[str], *, seed: int,
                steps: int, guidance_scale: float, sampler: str, height: int | None = None,
                width: int | None = None) -> tuple[list[np.ndarray], list[int]] | None:
    """Every rank draws prompts[i] for its indices (on a height x width canvas; default the U-Net's square);
    rank 0 gets all images (uint8 HWC, prompt order) and how many each rank drew, the others None."""
    world = tdist.get_world_size() if tdist.is_initialized() else 1
    rank = tdist.get_rank() if tdist.is_initialized() else 0
    mine = rank_indices(len(prompts), rank, world)
    share: list[tuple[int, np.ndarray]] = []
    if mine:
        images = generate(unet, encoders, scheduler_config, [prompts[i] for i in mine], seed=seed, steps=steps,
                          guidance_scale=guidance_scale, sampler=sampler, indices=mine, height=height, width=width)
        share = list(zip(mine, to_uint8(images)))
    if not tdist.is_initialized():
        return [a for _, a in share], [len(share)]
    gathered: list[Any] | None = [None] * world if rank == 0 else None
    tdist.gather_object(share, gathered, dst=0)
    if gathered is None:
        return None
    ordered = sorted((pair for part in gathered for pair in part), key=lambda p: p[0])
    return [a for _, a in ordered], [len(part) for part in gathered]


def write_grid(arrays: list[np.ndarray], prompts: list[str], out: Path, cols: int, step: int) -> Path:
    return write_samples([Image.fromarray(a) for a in arrays], prompts, out, cols, {"step": step})
