"""The validation loss (ldmscale/eval/validation.py): fixed samples, noise and timesteps, so the same weights
give the same number every time and whatever the world size; rank shares padded so forward counts agree."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from ldmscale.config import load_config
from ldmscale.eval.validation import (
    BUCKETS,
    Validator,
    load_validation_set,
    metrics_from_sums,
    read_validation_samples,
)
from ldmscale.trainer.stages import DiffusionStage
from tests.conftest import REPO, tiny_overrides

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def task(assets: Path, tmp_path_factory: pytest.TempPathFactory) -> DiffusionStage:
    cfg = load_config(REPO / "configs/tiny.yaml", tiny_overrides(assets, tmp_path_factory.mktemp("val")))
    torch.manual_seed(0)
    return DiffusionStage(cfg, CPU, torch.float32)


def _validator(task: DiffusionStage, assets: Path, limit: int, rank: int, world: int, batch: int) -> Validator:
    samples = read_validation_samples([str(assets / "digits/heldout")], {}, limit)
    vset = load_validation_set(samples, task.tokenizer, 32, True, rank, world)
    return Validator(vset, task.encoders, task.latent_shape, task.cfg.model.num_train_timesteps, task.cfg.train.seed,
                     batch, world, CPU)


def test_validation_loss_is_deterministic_and_bucketed(task: DiffusionStage, assets: Path) -> None:
    v = _validator(task, assets, 12, 0, 1, 4)
    first, again = v.local_sums(task.module), v.local_sums(task.module)
    assert torch.equal(first, again)
    m = metrics_from_sums(first)
    assert set(m) == {*(f"val/mse_{b}" for b in BUCKETS), "val/mse", "val/loss"}
    assert int(first[-1]) == 12
    assert len({m[f"val/mse_{b}"] for b in BUCKETS}) == 3  # each bucket scores other timesteps
    # the draws do not depend on the batch size
    assert torch.allclose(_validator(task, assets, 12, 0, 1, 5).local_sums(task.module), first, rtol=1e-6)


@pytest.mark.parametrize(("limit", "batch", "world"), [(12, 4, 2), (3, 1, 2), (2, 1, 3)],
                         ids=["even", "padded", "more-ranks-than-samples"])
def test_rank_shares_sum_to_the_one_rank_result(task: DiffusionStage, assets: Path, limit: int, batch: int,
                                                world: int) -> None:
    one = _validator(task, assets, limit, 0, 1, batch).local_sums(task.module)
    ranks = [_validator(task, assets, limit, r, world, batch) for r in range(world)]
    assert len({v.batches for v in ranks}) == 1  # same number of forwards: ZeRO-3 forwards are collective
    every = sum(v.local_sums(task.module) for v in ranks)
    assert int(every[-1]) == limit
    assert torch.allclose(every, one, rtol=1e-6)
