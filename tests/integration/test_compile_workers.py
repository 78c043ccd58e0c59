"""Inductor's compile workers (a sidecar process and its pool, started the way the trainer starts them for
model.compile) live through the SIGUSR1/SIGUSR2 that Slurm sends every process of a step."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from tests.conftest import REPO, train_env

CHILD = """
import time
from torch._inductor.async_compile import AsyncCompile
from ldmscale.runtime import preemption
preemption.install()
preemption.start_compile_workers()
AsyncCompile.wait_pool_ready()
print("ready", flush=True)
time.sleep(120)
"""


def _descendants(pid: int) -> list[int]:
    found, todo = [], [pid]
    while todo:
        parent = todo.pop()
        for stat in Path("/proc").glob("[0-9]*/stat"):
            try:
                if int(stat.read_text().rsplit(")", 1)[1].split()[1]) == parent:
                    found.append(int(stat.parent.name))
                    todo.append(found[-1])
            except (OSError, IndexError, ValueError):
                continue
    return found


def test_compile_workers_survive_preemption_signals() -> None:
    env = {**train_env(), "TORCHINDUCTOR_COMPILE_THREADS": "2"}  # a pool even on two cores
    proc = subprocess.Popen([sys.executable, "-c", CHILD], env=env, cwd=REPO, stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == "ready"
        workers = _descendants(proc.pid)
        assert len(workers) >= 2  # the sidecar and its pool
        for pid in workers:
            for sig in (signal.SIGUSR1, signal.SIGUSR2):
                os.kill(pid, sig)
        time.sleep(2)
        alive = [pid for pid in workers if Path(f"/proc/{pid}").exists()
                 and Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"]
        assert alive == workers
    finally:
        for pid in [*_descendants(proc.pid), proc.pid]:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        proc.wait()
