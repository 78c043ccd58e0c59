"""How a save reaches the disk, with a real single-process DeepSpeed engine: every file is fsynced before COMPLETE,
a re-saved step replaces the old folder whole, a kill at any point of a re-save leaves `latest` on a complete
checkpoint, and pruning removes COMPLETE before anything else."""

from __future__ import annotations

import os
import re
import shutil
from collections.abc import Iterator
from pathlib import Path

import deepspeed
import pytest
import torch

from ldmscale.checkpoint import CheckpointStore, universal_dir
from ldmscale.checkpoint import store as store_module
from ldmscale.checkpoint.integrity import damage, is_complete, read_manifest
from ldmscale.checkpoint.resume import latest_tag


@pytest.fixture(scope="module")
def engine(single_rank_group: None) -> Iterator[object]:
    torch.manual_seed(0)
    model = torch.nn.Linear(8, 8)
    ds = {"train_batch_size": 2, "optimizer": {"type": "AdamW", "params": {"lr": 0.1, "torch_adam": True}},
          "zero_optimization": {"stage": 2}}
    eng, *_ = deepspeed.initialize(model=model, model_parameters=list(model.parameters()), config=ds)
    yield eng


def _step(eng: object) -> None:
    loss = eng(torch.ones(2, 8)).pow(2).mean()  # type: ignore[operator]
    eng.backward(loss)  # type: ignore[attr-defined]
    eng.step()  # type: ignore[attr-defined]


def _save(ck: CheckpointStore, eng: object, step: int) -> Path:
    return ck.save(eng, step, {"step": step, "world_size": 1}, {"w": torch.full((3,), float(step))}, "cfg\n",
                   rank_state={"data": {"step": step}})


def test_every_file_is_fsynced_before_complete(engine: object, tmp_path: Path,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """DeepSpeed writes its shards with torch.save and no fsync: the store fsyncs each one (and every file of its
    own) before the manifest that declares the save complete."""
    synced: list[str] = []
    real_fsync = os.fsync

    def recording_fsync(fd: int) -> None:
        synced.append(os.readlink(f"/proc/self/fd/{fd}"))
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", recording_fsync)
    _step(engine)
    tag_dir = _save(CheckpointStore(tmp_path, keep_last=2), engine, 1)
    staging = str(store_module.staging_dir(tmp_path, "step_00000001"))
    complete_at = next(i for i, p in enumerate(synced) if p.startswith(f"{staging}/.COMPLETE.tmp"))
    # atomic writes fsync a temporary ".name.tmpPID" that is then renamed to "name"
    before = {re.sub(r"(^|/)\.([^/]+)\.tmp\d+$", r"\1\2", p[len(staging) + 1:])
              for p in synced[:complete_at] if p.startswith(staging + "/")}
    files = set(read_manifest(tag_dir)["files"])
    assert {"mp_rank_00_model_states.pt", "zero_pp_rank_0_mp_rank_00_optim_states.pt", "ema.safetensors",
            "ranks/rank00000.json", "trainer_state.json", "config.yaml"} <= files
    assert files <= before, f"written but not fsynced before COMPLETE: {sorted(files - before)}"


def test_a_resaved_step_replaces_the_old_folder_whole(engine: object, tmp_path: Path) -> None:
    """A run rolled back to step 1 re-reaches step 2: nothing of the abandoned step 2 (a rank file of a larger
    world, a shard, its universal conversion) survives into the new one, and later steps of the abandoned branch
    are left alone until re-saved."""
    ck = CheckpointStore(tmp_path, keep_last=5)
    for step in (1, 2, 3):
        _step(engine)
        _save(ck, engine, step)
    old = tmp_path / "step_00000002"
    (old / "ranks" / "rank00005.json").write_text("{}")  # as a 6-rank save of the abandoned branch left it
    (old / "zero_pp_rank_5_mp_rank_00_optim_states.pt").write_bytes(b"old")
    universal_dir(old).mkdir()
    (universal_dir(old) / "COMPLETE").write_text("")
    ck.load(engine, tmp_path / "step_00000001")
    _step(engine)
    new = _save(ck, engine, 2)
    assert sorted(p.name for p in (new / "ranks").iterdir()) == ["rank00000.json"]
    assert not (new / "zero_pp_rank_5_mp_rank_00_optim_states.pt").exists() and not universal_dir(new).exists()
    assert damage(new) is None and latest_tag(tmp_path) == "step_00000002"
    assert is_complete(tmp_path / "step_00000003")  # the abandoned branch's later save: not pruned, not latest
    assert not list(tmp_path.glob(".step_*"))  # no staging or replaced folder left behind


@pytest.mark.parametrize("killed_at", [0, 1, 2], ids=["aside", "into-place", "latest"])
def test_a_kill_during_a_resave_leaves_latest_complete(engine: object, tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch, killed_at: int) -> None:
    """`latest` names step 2 and step 2 is being re-saved (a rollback): a kill when the old folder was moved aside,
    when the new one is renamed into place, or before `latest` is rewritten, leaves `latest` naming a complete
    checkpoint (the previous one, or the new step 2 itself)."""
    ck = CheckpointStore(tmp_path, keep_last=5)
    for step in (1, 2):
        _step(engine)
        _save(ck, engine, step)
    ck.load(engine, tmp_path / "step_00000001")
    _step(engine)
    moments = {"rename": 0}
    real_rename, real_write = os.rename, store_module.atomic_write_text

    def killing_rename(src: object, dst: object) -> None:
        if killed_at == moments["rename"]:
            raise KeyboardInterrupt("killed")
        moments["rename"] += 1
        real_rename(src, dst)

    def killing_write(path: Path, text: str) -> None:
        if killed_at == 2 and path.name == "latest" and text == "step_00000002":
            raise KeyboardInterrupt("killed")
        real_write(path, text)

    monkeypatch.setattr(store_module.os, "rename", killing_rename)
    monkeypatch.setattr(store_module, "atomic_write_text", killing_write)
    with pytest.raises(KeyboardInterrupt):
        _save(ck, engine, 2)
    tag = latest_tag(tmp_path)
    assert tag is not None and is_complete(tmp_path / tag) and damage(tmp_path / tag) is None


def test_pruning_removes_complete_first(engine: object, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A prune killed half-way through deleting a folder leaves it without COMPLETE: never a complete-looking
    checkpoint with files missing."""
    ck = CheckpointStore(tmp_path, keep_last=1)
    _step(engine)
    _save(ck, engine, 1)
    real_rmtree = shutil.rmtree

    def half_rmtree(path: object, *args: object, **kwargs: object) -> None:
        folder = Path(str(path))
        if folder.name == "step_00000001":
            (folder / "mp_rank_00_model_states.pt").unlink()  # some files gone, then the kill
            raise KeyboardInterrupt("killed")
        real_rmtree(path, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(store_module.shutil, "rmtree", half_rmtree)
    _step(engine)
    with pytest.raises(KeyboardInterrupt):
        _save(ck, engine, 2)
    assert (tmp_path / "step_00000001").exists() and not is_complete(tmp_path / "step_00000001")
    assert latest_tag(tmp_path) == "step_00000002"


def test_pruning_clears_interrupted_saves_but_not_a_conversion_in_progress(engine: object, tmp_path: Path) -> None:
    """A save killed mid-way leaves its staging folder: the next save removes it. `ldmscale-universal` may be
    converting a kept checkpoint right now: its folder stays."""
    ck = CheckpointStore(tmp_path, keep_last=2)
    _step(engine)
    _save(ck, engine, 1)
    (tmp_path / ".step_00000009.saving").mkdir()
    (tmp_path / ".step_00000001_universal.converting").mkdir()
    _step(engine)
    _save(ck, engine, 2)
    assert not (tmp_path / ".step_00000009.saving").exists()
    assert (tmp_path / ".step_00000001_universal.converting").exists()
