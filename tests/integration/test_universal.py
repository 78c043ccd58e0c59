"""DeepSpeed's universal conversion (ds_to_universal, a child process) of a real single-process ZeRO-2 checkpoint:
it loads into an engine configured with checkpoint.load_universal, it is made once and reused, it is tied to the
save it came from (a re-saved step is converted again), its child survives preemption signals, and
`ldmscale-universal` makes the same conversion offline."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import deepspeed
import pytest
import torch

from ldmscale.checkpoint import CheckpointStore, universal_dir
from ldmscale.checkpoint.elastic import is_converted, prepare_universal
from ldmscale.checkpoint.integrity import read_manifest, save_id
from ldmscale.checkpoint.universal_cli import cli as universal_cli
from tests.conftest import REPO, train_env
from tests.runs import cli_in_process

DS = {"train_batch_size": 2, "optimizer": {"type": "AdamW", "params": {"lr": 0.1, "torch_adam": True}},
      "zero_optimization": {"stage": 2}}


def _engine(**extra: object) -> object:
    model = torch.nn.Linear(8, 8)
    eng, *_ = deepspeed.initialize(model=model, model_parameters=list(model.parameters()), config={**DS, **extra})
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


def _descendants(pid: int) -> list[int]:
    found, todo = [], [pid]
    while todo:
        parent = todo.pop()
        for stat in Path("/proc").glob("[0-9]*/stat"):
            try:
                if int(stat.read_text().rsplit(")", 1)[1].split()[1]) == parent:
                    child = int(stat.parent.name)
                    found.append(child)
                    todo.append(child)
            except (OSError, IndexError, ValueError):
                continue
    return found



def test_conversion_survives_signals_loads_is_made_once_and_is_pruned(engine: object, tmp_path: Path) -> None:
    """SIGUSR1/SIGUSR2 to the converter and its worker pool, over and over, as slurmstepd signals every process
    of a step: the conversion still finishes (the trainer alone decides what a notice means). An engine configured
    with checkpoint.load_universal then gets the saved weights; a second resume reuses the conversion; pruning the
    checkpoint removes it."""
    ck = CheckpointStore(tmp_path, keep_last=1)
    _train_step(engine)
    tag_dir = ck.save(engine, 1, {"step": 1}, None, "")
    saved = _weights(engine)
    result: dict[str, object] = {}

    def convert() -> None:
        try:
            result["seconds"] = prepare_universal(tag_dir)
        except Exception as e:  # noqa: BLE001 - reported by the assertion below
            result["error"] = e

    worker = threading.Thread(target=convert)
    worker.start()
    signalled = 0
    while worker.is_alive():
        for pid in _descendants(os.getpid()):
            for sig in (signal.SIGUSR1, signal.SIGUSR2):
                try:
                    os.kill(pid, sig)
                    signalled += 1
                except ProcessLookupError:
                    pass
        time.sleep(0.05)
    worker.join()
    assert "error" not in result, result.get("error")
    assert signalled > 0 and float(result["seconds"]) > 0 and is_converted(tag_dir)  # type: ignore[arg-type]
    assert read_manifest(universal_dir(tag_dir))["source"] == save_id(tag_dir)
    assert prepare_universal(tag_dir) == 0.0  # reused, not converted again
    assert not (tmp_path / "latest_universal").exists()  # DeepSpeed's pointer would name the staging folder
    other = _engine(checkpoint={"load_universal": True})
    assert not torch.equal(_weights(other), saved)
    ck.load(other, tag_dir, universal=True)
    assert torch.equal(_weights(other), saved)
    _train_step(engine)
    ck.save(engine, 2, {"step": 2}, None, "")
    assert not tag_dir.exists() and not universal_dir(tag_dir).exists()  # pruned with its checkpoint


def test_offline_conversion_is_tied_to_the_save_it_came_from(engine: object, tmp_path: Path,
                                                             capsys: pytest.CaptureFixture) -> None:
    """`ldmscale-universal RUN` converts the latest save. A rolled-back run re-saves that step: the conversion goes
    with the old save, and a stale copy put back by hand is not taken for a conversion of the new one."""
    run = tmp_path / "run"
    ck = CheckpointStore(run / "checkpoints", keep_last=5)
    _train_step(engine)
    ck.save(engine, 1, {"step": 1}, None, "")
    _train_step(engine)
    tag_dir = ck.save(engine, 2, {"step": 2}, None, "")
    cmd = [sys.executable, "-m", "ldmscale.checkpoint.universal_cli", str(run), "--workers", "2"]
    done = subprocess.run(cmd, env=train_env(), capture_output=True, text=True, timeout=300, cwd=REPO)
    assert done.returncode == 0 and "converted in" in done.stdout, done.stderr[-2000:]
    assert is_converted(tag_dir)
    stale = tmp_path / "stale_universal"
    shutil.copytree(universal_dir(tag_dir), stale)
    first_id = save_id(tag_dir)
    ck.load(engine, run / "checkpoints" / "step_00000001")  # the rollback
    _train_step(engine)
    ck.save(engine, 2, {"step": 2}, None, "")  # the same step, another save
    assert save_id(tag_dir) != first_id and not universal_dir(tag_dir).exists()
    os.rename(stale, universal_dir(tag_dir))  # as an older ldmscale, or a copy from elsewhere, would leave it
    assert not is_converted(tag_dir)  # so a resume converts the new save again
    code, _, err = cli_in_process(universal_cli, [str(tmp_path / "nothing")], capsys)  # the same entry function
    assert code == 2 and len(err.strip().splitlines()) == 1 and "no such checkpoint" in err
