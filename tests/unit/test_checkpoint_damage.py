"""A checkpoint damaged after it was declared complete, and a resume under another model.

Each kind of file truncated or deleted (DeepSpeed's model and optimizer shards, the EMA, a rank's JSON): `--resume
auto` falls back to the previous checkpoint with a warning naming the file, an explicit path is refused with one
line, and the inference loaders name the file. A config that builds another model is refused with the keys that
differ, before anything is loaded and without touching the run's config.yaml."""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import deepspeed
import pytest
import torch

from ldmscale.checkpoint import CheckpointError, CheckpointStore, find_tag_dir, load_trained
from ldmscale.checkpoint.resume import check_same_model, resolve_resume, select_intact
from ldmscale.checkpoint.store import ResumeError
from ldmscale.config import Config, dump_config
from ldmscale.runtime.cli import input_error_line


@pytest.fixture(scope="module")
def saved(single_rank_group: None, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """checkpoints/step_00000001 and step_00000002 of a ZeRO-2 engine, with EMA and a rank file each."""
    torch.manual_seed(0)
    model = torch.nn.Linear(8, 8)
    ds = {"train_batch_size": 2, "optimizer": {"type": "AdamW", "params": {"lr": 0.1, "torch_adam": True}},
          "zero_optimization": {"stage": 2}}
    eng, *_ = deepspeed.initialize(model=model, model_parameters=list(model.parameters()), config=ds)
    root = tmp_path_factory.mktemp("damage") / "checkpoints"
    ck = CheckpointStore(root, keep_last=5)
    for step in (1, 2):
        loss = eng(torch.ones(2, 8)).pow(2).mean()
        eng.backward(loss)
        eng.step()
        ck.save(eng, step, {"step": step, "world_size": 1}, {"w": torch.zeros(64)}, dump_config(Config()),
                rank_state={"data": {"epoch": 0, "batches": step}})
    yield root


DAMAGE = {
    "model-shard-truncated": ("mp_rank_00_model_states.pt", "truncate"),
    "optimizer-shard-truncated": ("zero_pp_rank_0_mp_rank_00_optim_states.pt", "truncate"),
    "optimizer-shard-deleted": ("zero_pp_rank_0_mp_rank_00_optim_states.pt", "delete"),
    "ema-truncated": ("ema.safetensors", "truncate"),
    "rank-json-truncated": ("ranks/rank00000.json", "truncate"),
}


@pytest.mark.parametrize("kind", list(DAMAGE))
def test_a_damaged_checkpoint_falls_back_or_is_refused(saved: Path, tmp_path: Path, kind: str) -> None:
    root = tmp_path / "checkpoints"
    shutil.copytree(saved, root)
    name, how = DAMAGE[kind]
    path = root / "step_00000002" / name
    if how == "delete":
        path.unlink()
    else:
        os.truncate(path, path.stat().st_size // 2)
    # --resume auto: latest names step 2; the manifest check gives way to step 1, naming the file
    chosen, notes = resolve_resume(root, "auto")
    assert chosen == root / "step_00000002"
    chosen, notes = select_intact(chosen, auto=True)
    assert chosen == root / "step_00000001"
    assert len(notes) == 1 and "step_00000002 is damaged" in notes[0] and name in notes[0]
    # an explicit path: one line naming the file
    chosen, _ = resolve_resume(root, str(root / "step_00000002"))
    with pytest.raises(ResumeError, match=name.replace(".", r"\.")) as refused:
        select_intact(chosen, auto=False)
    assert "\n" not in input_error_line("ldmscale-train", refused.value)
    # ldmscale-sample / -export / -eval open checkpoints through find_tag_dir and load_trained
    for load in (find_tag_dir, load_trained):
        with pytest.raises(CheckpointError, match=name.replace(".", r"\.")):
            load(root)


def test_no_intact_checkpoint_left_is_refused(saved: Path, tmp_path: Path) -> None:
    root = tmp_path / "checkpoints"
    shutil.copytree(saved, root)
    for step in (1, 2):
        (root / f"step_0000000{step}" / "ema.safetensors").unlink()
    with pytest.raises(ResumeError, match="no complete checkpoint precedes it"):
        select_intact(root / "step_00000002", auto=True)


def _config(**changes: object) -> Config:
    cfg = Config()
    for key, value in changes.items():
        section, name = key.split("__")
        setattr(getattr(cfg, section), name, value)
    return cfg


def test_another_model_is_refused_with_the_keys_that_differ(tmp_path: Path) -> None:
    tag_dir = tmp_path / "step_00000010"
    tag_dir.mkdir()
    (tag_dir / "config.yaml").write_text(dump_config(_config(model__unet="tiny")))
    with pytest.raises(ResumeError, match=r"model\.unet: 'tiny' -> 'small'"):
        check_same_model(tag_dir, _config(model__unet="small"))
    # settings that do not change the weights' shapes may change on resume
    check_same_model(tag_dir, _config(model__unet="tiny", model__compile=True, train__max_steps=5))
    (tag_dir / "config.yaml").write_text(dump_config(_config(train__stage="autoencoder")))
    with pytest.raises(ResumeError, match=r"train\.stage: 'autoencoder' -> 'diffusion'"):
        check_same_model(tag_dir, _config())


def test_a_refused_resume_leaves_the_runs_config_alone(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The check runs before any process group, and config.yaml is written only once a resume is accepted."""
    from ldmscale.trainer.loop import main

    out = tmp_path / "run"
    tag_dir = out / "checkpoints" / "step_00000010"
    tag_dir.mkdir(parents=True)
    (tag_dir / "config.yaml").write_text(dump_config(_config(model__unet="tiny")))
    (tag_dir / "COMPLETE").write_text("")
    (out / "checkpoints" / "latest").write_text("step_00000010")
    (out / "config.yaml").write_text("the run's own config\n")
    for var, value in {"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1",
                       "MASTER_PORT": "1"}.items():
        monkeypatch.setenv(var, value)
    cfg = _config(model__unet="small", train__out_dir=str(out), data__shards=[str(tmp_path / "shards")])
    with pytest.raises(ResumeError, match=r"model\.unet: 'tiny' -> 'small'"):
        main(cfg, "auto")
    assert (out / "config.yaml").read_text() == "the run's own config\n"
