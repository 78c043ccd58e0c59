"""model.immiscible: the linear assignment of a micro-batch's noises to its latents is the minimum-distance one,
changes only which latent gets which noise, and is what the training step uses."""

from __future__ import annotations

import itertools
from pathlib import Path
from typing import Any

import pytest
import torch

from ldmscale.config import load_config
from ldmscale.models import immiscible, noise
from ldmscale.trainer.stages import build_stage
from tests.conftest import REPO, tiny_overrides


def _total_distance(latents: torch.Tensor, eps: torch.Tensor) -> float:
    return float(((latents - eps) ** 2).sum())


def test_assignment_is_the_minimum_distance_permutation() -> None:
    latents = 2 * torch.randn(6, 4, 3, 3, generator=torch.Generator().manual_seed(0)) + 0.5
    eps = noise.randn(0, range(6), (4, 3, 3), noise.Stream.NOISE)
    assigned = immiscible.assign(latents, eps)
    best = min(_total_distance(latents, eps[list(p)]) for p in itertools.permutations(range(6)))
    assert _total_distance(latents, assigned) == pytest.approx(best, rel=1e-6)
    assert _total_distance(latents, assigned) < _total_distance(latents, eps)
    # the same noises, each used once; and the same answer every time (resume is bitwise)
    assert sorted(assigned.flatten().tolist()) == sorted(eps.flatten().tolist())
    assert torch.equal(assigned, immiscible.assign(latents, eps))


def test_the_training_step_noises_each_latent_with_its_assigned_noise(assets: Path, tmp_path: Path) -> None:
    cfg = load_config(REPO / "configs/tiny.yaml", tiny_overrides(assets, tmp_path, **{"model.immiscible": "true"}))
    stage = build_stage(cfg, torch.device("cpu"), torch.float32)
    seen: dict[str, Any] = {}

    def engine(latents: torch.Tensor, context: torch.Tensor, eps: torch.Tensor, t: torch.Tensor) -> Any:
        seen.update(latents=latents, eps=eps)
        return stage.module(latents, context, eps, t)

    res, b = cfg.data.resolution, 8
    pixels = torch.randint(0, 256, (b, 3, res, res), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    batch = {"pixels": pixels, "input_ids": torch.zeros(b, stage.tokenizer.model_max_length, dtype=torch.long),
             "keys": [str(i) for i in range(b)]}
    stage.loss(engine, batch, range(16, 16 + b), step=2)
    drawn = noise.randn(cfg.train.seed, range(16, 16 + b), stage.latent_shape, noise.Stream.NOISE)
    assert torch.equal(seen["eps"], immiscible.assign(seen["latents"], drawn))
    assert not torch.equal(seen["eps"], drawn)  # 8 random latents: the identity is almost never the optimum
