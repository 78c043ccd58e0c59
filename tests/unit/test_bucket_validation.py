"""The validation loss with aspect buckets (ldmscale/eval/validation.py): every batch one bucket, the set and its
draws fixed by the held-out samples and the bucket set alone, so rank shares sum to the one-rank result."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from ldmscale.config import load_config
from ldmscale.data.buckets import bucket_set
from ldmscale.eval.validation import Validator, load_bucket_validation_set
from ldmscale.trainer.stages import DiffusionStage
from tests.conftest import REPO, tiny_overrides

CPU = torch.device("cpu")
BUCKETS = bucket_set(32, 8, 2.0)


@pytest.fixture(scope="module")
def task(assets: Path, tmp_path_factory: pytest.TempPathFactory) -> DiffusionStage:
    cfg = load_config(REPO / "configs/tiny.yaml", tiny_overrides(assets, tmp_path_factory.mktemp("bval")))
    torch.manual_seed(0)
    return DiffusionStage(cfg, CPU, torch.float32)


def _samples(n: int) -> list[tuple[bytes, str]]:
    """Held-out JPEGs, wide, square and tall in turn."""
    rng = np.random.default_rng(1)
    out = []
    for j in range(n):
        w, h = [(48, 24), (32, 32), (24, 48)][j % 3]
        buf = io.BytesIO()
        Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(buf, format="JPEG")
        out.append((buf.getvalue(), f"digit {j % 10}"))
    return out


def _validator(task: DiffusionStage, n: int, rank: int, world: int, batch: int) -> Validator:
    vset = load_bucket_validation_set(_samples(n), task.tokenizer, BUCKETS, batch, rank, world)
    return Validator(vset, task.encoders, task.latent_shape, task.cfg.model.num_train_timesteps, task.cfg.train.seed,
                     batch, world, CPU, task.vae_factor)


def test_every_validation_batch_holds_one_bucket(task: DiffusionStage) -> None:
    v = _validator(task, 10, 0, 1, 2)
    assert v.vset.bucket_batches is not None
    shapes = [tuple(pixels.shape[-2:]) for _, pixels, _, _ in v.vset.bucket_batches]
    assert sorted(set(shapes)) == sorted((b.height, b.width) for b in BUCKETS)
    for ids, pixels, _, cond in v.vset.bucket_batches:
        assert (cond[:, 4:] == torch.tensor(pixels.shape[-2:])).all()
        assert len({j % 3 for j in ids}) == 1  # one shape of held-out image per batch
    first = v.local_sums(task.module)
    assert torch.equal(first, v.local_sums(task.module)) and int(first[-1]) == 10


@pytest.mark.parametrize("world", [2, 3])
def test_bucket_rank_shares_sum_to_the_one_rank_result(task: DiffusionStage, world: int) -> None:
    one = _validator(task, 10, 0, 1, 2).local_sums(task.module)
    ranks = [_validator(task, 10, r, world, 2) for r in range(world)]
    assert len({v.batches for v in ranks}) == 1  # same number of forwards on every rank (padded)
    every = sum(v.local_sums(task.module) for v in ranks)
    assert int(every[-1]) == 10
    assert torch.allclose(every, one, rtol=1e-6)
