"""Preemption as a GPU cluster delivers it, on CPU: two ranks started the way srun starts them (one process
group, rendezvous from the environment), loader workers started with `spawn` (the CUDA default), and SIGUSR1
sent to the whole process group, as slurmstepd signals every process of the step. All ranks save one
checkpoint together, PREEMPTED is printed, both exit 0; the resumed run then logs exactly the losses and
sample keys of an uninterrupted run. A notice during start-up (before the first step) makes both ranks exit 0 for
requeue without saving, with the run's state in the status file the sbatch reads."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import REPO, free_port, tiny_overrides, train_env

MAX_STEPS = 10


def _ranks(assets: Path, out: Path, **env_extra: str) -> list[subprocess.Popen]:
    """Two trainer ranks in one new process group (rank 0 leads it), like the tasks of one srun step."""
    args = [sys.executable, "-m", "ldmscale.train", "--config", str(REPO / "configs/tiny.yaml"), "--resume", "auto",
            *tiny_overrides(assets, out, **{"data.start_method": "spawn", "data.num_workers": 2,
                                            "train.max_steps": MAX_STEPS, "train.ckpt_every": 1000,
                                            "train.log_sample_keys": "true"})]
    port = str(free_port())
    procs: list[subprocess.Popen] = []
    for rank in range(2):
        env = {**train_env(), "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": "2",
               "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port, **env_extra}
        log = open(out.parent / f"{out.name}.rank{rank}.log", "a")
        group = procs[0].pid if procs else 0  # 0: a new group led by rank 0
        procs.append(subprocess.Popen(args, env=env, cwd=REPO, stdout=log, stderr=subprocess.STDOUT,
                                      process_group=group))
    return procs


def _wait(procs: list[subprocess.Popen], out: Path, timeout: float = 400) -> list[int]:
    try:
        return [p.wait(timeout=timeout) for p in procs]
    except subprocess.TimeoutExpired:
        os.killpg(procs[0].pid, signal.SIGKILL)
        raise


def _log(out: Path, rank: int = 0) -> str:
    return (out.parent / f"{out.name}.rank{rank}.log").read_text()


def _losses(out: Path) -> dict[int, float]:
    f = out / "log.jsonl"
    rows = [json.loads(x) for x in f.read_text().splitlines()] if f.exists() else []
    return {r["step"]: r["loss"] for r in rows if "loss" in r}  # later lines (after the resume) win


def _keys(out: Path, rank: int) -> dict[int, list[str]]:
    lines = (out / "sample_keys" / f"rank{rank:05d}.jsonl").read_text().splitlines()
    return {r["step"]: r["keys"] for r in map(json.loads, lines)}


def _catches_usr1(pid: int) -> bool:
    """Whether the process has a handler for SIGUSR1 (its SigCgt mask in /proc)."""
    status = Path(f"/proc/{pid}/status").read_text()
    caught = int(status.split("SigCgt:")[1].split()[0], 16)
    return bool(caught & (1 << (signal.SIGUSR1 - 1)))


@pytest.fixture(scope="module")
def runs(assets: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    root = tmp_path_factory.mktemp("spawn_preempt")
    reference, preempted, early = root / "reference", root / "preempted", root / "early"

    # a notice while the ranks are still importing and starting: as soon as both have a handler
    procs = _ranks(assets, early, LDMSCALE_STATUS_FILE=str(root / "early.status"))
    deadline = time.time() + 120
    while time.time() < deadline and not all(p.poll() is None and _catches_usr1(p.pid) for p in procs):
        time.sleep(0.05)
    os.killpg(procs[0].pid, signal.SIGUSR1)
    early_codes = _wait(procs, early)

    assert _wait(_ranks(assets, reference), reference) == [0, 0], _log(reference)[-3000:]

    procs = _ranks(assets, preempted)
    deadline = time.time() + 400
    while time.time() < deadline and not any(s >= 3 for s in _losses(preempted)):
        assert all(p.poll() is None for p in procs), _log(preempted)[-3000:]
        time.sleep(0.2)
    os.killpg(procs[0].pid, signal.SIGUSR1)  # every rank and every spawned loader worker
    codes = _wait(procs, preempted)
    first_log = [_log(preempted, r) for r in range(2)]
    latest = (preempted / "checkpoints" / "latest").read_text()
    tags = sorted(p.name for p in (preempted / "checkpoints").glob("step_*"))
    files = sorted(p.name for p in (preempted / "checkpoints" / latest).iterdir())
    assert _wait(_ranks(assets, preempted), preempted) == [0, 0], _log(preempted)[-3000:]
    return {"reference": reference, "preempted": preempted, "codes": codes, "log": first_log, "latest": latest,
            "tags": tags, "files": files, "early": early, "early_codes": early_codes,
            "early_status": (root / "early.status").read_text()}


def test_a_notice_before_the_first_step_exits_for_requeue_saving_nothing(runs: dict) -> None:
    early = runs["early"]
    logs = [_log(early, r) for r in range(2)]
    assert runs["early_codes"] == [0, 0], logs[0][-3000:]
    assert "PREEMPTED step=0 before the first step" in logs[0] and "SIGUSR1" in logs[0], logs[0][-3000:]
    assert not any("Traceback" in text or "killed by signal" in text for text in logs)
    assert "state=preempted" in runs["early_status"] and "resumed_from=\n" in runs["early_status"]
    assert not list(early.glob("checkpoints/step_*"))  # nothing new saved



def test_all_ranks_save_one_checkpoint_print_preempted_and_exit_0(runs: dict) -> None:
    assert runs["codes"] == [0, 0], runs["log"][0][-3000:]
    assert "PREEMPTED step=" in runs["log"][0] and "SIGUSR1" in runs["log"][0]
    assert "killed by signal" not in runs["log"][0] + runs["log"][1]
    step = int(runs["latest"].split("_")[1])
    assert 3 <= step < MAX_STEPS and runs["tags"] == [runs["latest"]]  # one checkpoint: the preemption save
    # ZeRO-2: each rank wrote its own optimizer shard
    shards = [f for f in runs["files"] if f.endswith("optim_states.pt")]
    assert len(shards) == 2 and all(any(f"zero_pp_rank_{r}_" in f for f in shards) for r in range(2))

def test_resumed_run_continues_exactly(runs: dict) -> None:
    ref, res = runs["reference"], runs["preempted"]
    assert _losses(res) == _losses(ref) and sorted(_losses(ref)) == list(range(1, MAX_STEPS + 1))
    for rank in range(2):
        assert _keys(res, rank) == _keys(ref, rank)
