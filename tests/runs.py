"""The trainer in child processes, as the integration and system tests start, kill and resume it, readers of what
its runs leave behind (log.jsonl, sample_keys/rank*.jsonl), and ldmscale-sample's entry function in this process."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from tests.conftest import REPO, free_port, tiny_overrides, train_env

TINY = REPO / "configs/tiny.yaml"


def train_args(assets: Path, out: Path, resume: str = "auto", **overrides: object) -> list[str]:
    """ldmscale.train's arguments: configs/tiny.yaml on the session's assets, written to `out`."""
    return ["--config", str(TINY), "--resume", resume, *tiny_overrides(assets, out, **overrides)]


def launch_command(launcher: str, port: int, args: list[str], nproc: int = 2) -> list[str]:
    """`python -m ldmscale.train ARGS` on `nproc` ranks, started by torchrun or by the deepspeed launcher; launcher
    "python": one process without a launcher (the trainer picks its own free port), a Python start-up less."""
    if launcher == "python":
        assert nproc == 1, "launcher 'python' starts one rank"
        return [sys.executable, "-m", "ldmscale.train", *args]
    if launcher == "torchrun":
        return [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", f"--master_port={port}",
                "-m", "ldmscale.train", *args]
    return [shutil.which("deepspeed") or "deepspeed", "--num_gpus", str(nproc), "--master_port", str(port),
            "--module", "ldmscale.train", *args]


def log_file(out: Path) -> Path:
    """Where a run's console output goes: beside its folder (a resumed run appends to it)."""
    return out.parent / f"{out.name}.log"


def start(cmd: list[str], out: Path, env: dict[str, str] | None = None) -> subprocess.Popen:
    """The command in a session of its own (so that the whole tree can be killed), its output in log_file(out)."""
    with open(log_file(out), "a") as log:
        return subprocess.Popen(cmd, env=env or train_env(), stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True, cwd=REPO)


def start_training(assets: Path, out: Path, launcher: str = "torchrun", nproc: int = 2, resume: str = "auto",
                   **overrides: object) -> subprocess.Popen:
    return start(launch_command(launcher, free_port(), train_args(assets, out, resume, **overrides), nproc), out)


def finish(proc: subprocess.Popen, out: Path, timeout: float = 600) -> str:
    """Wait for a run started by start(); it must exit 0. Returns its console output."""
    try:
        rc = proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # the launcher and every rank: a hung run must not outlive the test
        proc.wait()
        raise
    text = log_file(out).read_text()
    assert rc == 0, text[-3000:]
    return text


def _children(pid: int) -> list[int]:
    out = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            out.append(int(stat.parent.name))
    return out


def kill_tree(pid: int) -> None:
    """SIGKILL a process and all its descendants (torchrun starts its workers in sessions of their own)."""
    todo, seen = [pid], []
    while todo:
        p = todo.pop()
        seen.append(p)
        todo += _children(p)
    for p in seen:
        try:
            os.kill(p, signal.SIGKILL)
        except ProcessLookupError:
            pass


def wait_for_step(procs: list[subprocess.Popen], out: Path, step: int, timeout: float = 400) -> None:
    """Until the run's log shows `step`; every process must still run meanwhile."""
    deadline = time.time() + timeout
    while not any(r["step"] >= step for r in step_rows(out)):
        assert all(p.poll() is None for p in procs), f"the run ended before step {step}"
        assert time.time() < deadline, f"no step {step} within {timeout} s"
        time.sleep(0.2)


def kill_after_step(proc: subprocess.Popen, out: Path, step: int, timeout: float = 400) -> None:
    """SIGKILL the run (every rank and the launcher) once its log shows `step`: mid-run, no chance to save."""
    try:
        wait_for_step([proc], out, step, timeout)
    except AssertionError as e:
        raise AssertionError(f"{e}:\n{log_file(out).read_text()[-3000:]}") from None
    kill_tree(proc.pid)
    proc.wait()


def wait_for_checkpoint(proc: subprocess.Popen, out: Path, step: int, timeout: float = 400) -> Path:
    """Until the run has completed its checkpoint of `step` (so that another run can resume from it while this one
    goes on); the checkpoint's folder."""
    tag_dir = out / "checkpoints" / f"step_{step:08d}"
    deadline = time.time() + timeout
    while not (tag_dir / "COMPLETE").exists():
        assert proc.poll() is None, f"the run ended without {tag_dir}:\n{log_file(out).read_text()[-3000:]}"
        assert time.time() < deadline, f"no {tag_dir} within {timeout} s"
        time.sleep(0.2)
    return tag_dir


def step_rows(out: Path) -> list[dict]:
    """Rank 0's per-step rows of log.jsonl (a resumed run's rows follow the killed run's)."""
    f = out / "log.jsonl"
    return [r for r in map(json.loads, f.read_text().splitlines()) if "step" in r] if f.exists() else []


def last_per_step(rows: list[dict], key: str) -> dict[int, object]:
    """{step: row[key]} over the rows that have `key`; later rows (after a resume) win."""
    return {r["step"]: r[key] for r in rows if key in r}


def events(out: Path) -> list[str]:
    return [r["event"] for r in map(json.loads, (out / "log.jsonl").read_text().splitlines()) if "event" in r]


def sample_keys(out: Path, rank: int) -> dict[int, list[str]]:
    """The sample keys `rank` trained on, per step (train.log_sample_keys); later lines win."""
    lines = (out / "sample_keys" / f"rank{rank:05d}.jsonl").read_text().splitlines()
    return {r["step"]: r["keys"] for r in map(json.loads, lines)}


def cli_in_process(cli: Callable[[list[str]], None], argv: list[str], capsys: pytest.CaptureFixture
                   ) -> tuple[int, str, str]:
    """A console script's entry function (`cli(argv)`, which always ends in SystemExit) in this process, one thread
    as the ranks run: (exit code, stdout, stderr). Saves a child process's ~10 s of imports; test_cli_inputs runs
    every console script in a child process."""
    capsys.readouterr()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # OMP_NUM_THREADS=1 in the ranks and child processes: the same roundings
    try:
        with pytest.raises(SystemExit) as exit_info:
            cli(argv)
    finally:
        torch.set_num_threads(threads)
    captured = capsys.readouterr()
    return int(exit_info.value.code or 0), captured.out, captured.err


def sample_in_process(argv: list[str], capsys: pytest.CaptureFixture) -> tuple[int, str]:
    """ldmscale-sample's entry function in this process: (exit code, stderr). `python -m ldmscale.inference.sample`
    itself runs in test_style_multiproc."""
    from ldmscale.inference.sample import cli

    code, _, err = cli_in_process(cli, argv, capsys)
    return code, err


def launch_in_process(argv: list[str], capsys: pytest.CaptureFixture) -> tuple[int, str, str]:
    """`ldmscale-launch ARGV` through its entry function, from the repository root (configs/ paths resolve there),
    for the cases that end at or before submission: (exit code, stdout, stderr). sbatch and slurmctld are the real
    ones; only the interpreter start is saved."""
    from ldmscale.launch import cli

    with contextlib.chdir(REPO):
        return cli_in_process(cli, argv, capsys)
