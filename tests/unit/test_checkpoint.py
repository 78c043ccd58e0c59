"""Checkpoint atomicity with a real (single-process) DeepSpeed engine: `latest` never names a partial save.
(The universal conversion runs ds_to_universal in a child process: tests/integration/test_universal.py.)"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import deepspeed
import pytest
import torch

from ldmscale.checkpoint import (
    CheckpointError,
    CheckpointStore,
    read_rank_states,
    read_trainer_state,
    resolve_resume,
    tag_for,
)
from ldmscale.checkpoint.resume import latest_tag


@pytest.fixture(scope="module")
def engine(single_rank_group: None) -> Iterator[object]:
    torch.manual_seed(0)
    model = torch.nn.Linear(8, 8)
    ds = {"train_batch_size": 2, "optimizer": {"type": "AdamW", "params": {"lr": 0.1, "torch_adam": True}},
          "zero_optimization": {"stage": 2}}
    eng, *_ = deepspeed.initialize(model=model, model_parameters=list(model.parameters()), config=ds)
    yield eng


def _train_step(eng: object) -> None:
    loss = eng(torch.ones(2, 8)).pow(2).mean()  # type: ignore[operator]
    eng.backward(loss)  # type: ignore[attr-defined]
    eng.step()  # type: ignore[attr-defined]


def _weights(eng: object) -> torch.Tensor:
    return eng.module.weight.detach().clone()  # type: ignore[attr-defined]


def test_interrupted_save_leaves_previous_checkpoint_latest(engine: object, tmp_path: Path) -> None:
    ck = CheckpointStore(tmp_path, keep_last=5)
    _train_step(engine)
    ck.save(engine, 1, {"step": 1}, None, "cfg: 1\n")
    _train_step(engine)
    ck.save(engine, 2, {"step": 2}, None, "cfg: 2\n")
    at_step_2 = _weights(engine)
    _train_step(engine)
    # a kill after DeepSpeed wrote step 3's shards but before the save completed: they sit in the staging folder
    engine.save_checkpoint(str(tmp_path), tag=".step_00000003.saving", save_latest=False)  # type: ignore[attr-defined]
    # and a partial folder under the real name, as an older ldmscale left it
    engine.save_checkpoint(str(tmp_path), tag=tag_for(3), save_latest=False)  # type: ignore[attr-defined]
    assert latest_tag(tmp_path) == "step_00000002"
    assert resolve_resume(tmp_path, "auto") == (tmp_path / "step_00000002", [])
    with pytest.raises(CheckpointError, match="interrupted"):
        resolve_resume(tmp_path, str(tmp_path / "step_00000003"))
    ck.load(engine, tmp_path / "step_00000002")
    assert read_trainer_state(tmp_path / "step_00000002") == {"step": 2}
    assert torch.equal(_weights(engine), at_step_2)
    # the next complete save takes `latest` and removes the older partial folders
    _train_step(engine)
    ck.save(engine, 4, {"step": 4}, None, "cfg: 4\n")
    assert latest_tag(tmp_path) == "step_00000004"
    assert not (tmp_path / "step_00000003").exists() and not (tmp_path / ".step_00000003.saving").exists()
    assert (tmp_path / "step_00000004" / "config.yaml").read_text() == "cfg: 4\n"


def test_keep_last_prunes_old_complete_checkpoints(engine: object, tmp_path: Path) -> None:
    ck = CheckpointStore(tmp_path, keep_last=2)
    for step in range(1, 5):
        _train_step(engine)
        ck.save(engine, step, {"step": step}, {"w": torch.zeros(1)}, "")
    assert sorted(p.name for p in tmp_path.glob("step_*")) == ["step_00000003", "step_00000004"]
    assert (tmp_path / "step_00000004" / "ema.safetensors").exists()


def test_latest_naming_incomplete_save_falls_back_or_is_an_error(engine: object, tmp_path: Path) -> None:
    (tmp_path / "step_00000007").mkdir()
    (tmp_path / "latest").write_text("step_00000007")
    with pytest.raises(CheckpointError, match="did not finish"):
        resolve_resume(tmp_path, "auto")
    assert resolve_resume(tmp_path / "fresh", "auto") == (None, [])
    assert resolve_resume(tmp_path, "never") == (None, [])
    (tmp_path / "step_00000005").mkdir()
    (tmp_path / "step_00000005" / "COMPLETE").write_text("")
    folder, notes = resolve_resume(tmp_path, "auto")
    assert folder == tmp_path / "step_00000005" and "step_00000007, which is not complete" in notes[0]


def test_deepspeed_load_failure_is_not_silent(engine: object, tmp_path: Path) -> None:
    bad = tmp_path / "step_00000001"
    bad.mkdir()
    (bad / "COMPLETE").write_text("")
    with pytest.raises(CheckpointError, match="lacks DeepSpeed's model states"):
        CheckpointStore(tmp_path, 2).load(engine, bad)


def test_each_rank_state_is_saved_by_its_rank_and_read_back(engine: object, tmp_path: Path) -> None:
    ck = CheckpointStore(tmp_path, keep_last=2)
    _train_step(engine)
    tag_dir = ck.save(engine, 1, {"step": 1, "world_size": 1}, None, "", rank_state={"data": {"epoch": 3}})
    assert read_rank_states(tag_dir, 1) == [{"data": {"epoch": 3}}]
    with pytest.raises(CheckpointError, match="lacks the per-rank state of rank 1 of 2"):
        read_rank_states(tag_dir, 2)


def test_a_folder_that_is_no_checkpoint_is_named_so(tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(CheckpointError, match="is not a checkpoint"):
        resolve_resume(tmp_path, str(tmp_path))
    with pytest.raises(CheckpointError, match="no such checkpoint"):
        resolve_resume(tmp_path, str(tmp_path / "no" / "such"))
