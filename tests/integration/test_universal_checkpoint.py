"""DeepSpeed's universal checkpoint, as an elastic resume makes it: ds_to_universal (a child process) converts a
ZeRO-2 checkpoint once, an engine configured with checkpoint.load_universal loads the same weights from it, and the
conversion is pruned with its checkpoint. One rank, in this process (the two-rank resumes: test_resume_multiproc)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import deepspeed
import pytest
import torch

from ldmscale.checkpoint import CheckpointStore, is_complete, universal_dir
from ldmscale.checkpoint.elastic import prepare_universal


def _engine(**extra: object) -> object:
    model = torch.nn.Linear(8, 8)
    ds = {"train_batch_size": 2, "optimizer": {"type": "AdamW", "params": {"lr": 0.1, "torch_adam": True}},
          "zero_optimization": {"stage": 2}, **extra}
    eng, *_ = deepspeed.initialize(model=model, model_parameters=list(model.parameters()), config=ds)
    return eng


@pytest.fixture(scope="module")
def engine(single_rank_group: None) -> Iterator[object]:
    torch.manual_seed(0)
    yield _engine()


def _train_step(eng: object) -> None:
    loss = eng(torch.ones(2, 8)).pow(2).mean()  # type: ignore[operator]
    eng.backward(loss)  # type: ignore[attr-defined]
    eng.step()  # type: ignore[attr-defined]


def _weights(eng: object) -> torch.Tensor:
    return eng.module.weight.detach().clone()  # type: ignore[attr-defined]


def test_universal_conversion_is_made_once_loads_and_is_pruned(engine: object, tmp_path: Path) -> None:
    """ZeRO-2 -> ds_to_universal -> an engine configured with checkpoint.load_universal gets the same weights."""
    ck = CheckpointStore(tmp_path, keep_last=1)
    _train_step(engine)
    tag_dir = ck.save(engine, 1, {"step": 1}, None, "")
    saved = _weights(engine)
    assert prepare_universal(tag_dir) > 0 and is_complete(universal_dir(tag_dir))
    assert prepare_universal(tag_dir) == 0.0  # reused, not converted again
    other = _engine(checkpoint={"load_universal": True})
    assert not torch.equal(_weights(other), saved)
    assert ck.load(other, tag_dir, universal=True) == {"step": 1}
    assert torch.equal(_weights(other), saved)
    _train_step(engine)
    ck.save(engine, 2, {"step": 2}, None, "")
    assert not tag_dir.exists() and not universal_dir(tag_dir).exists()  # pruned with its checkpoint
