"""Session fixture: a real two-node Slurm cluster (tools/slurm_local) on this host, for tests marked `slurm`.

Loaded by tests/conftest.py through `pytest_plugins`. The cluster is started once per session and torn
down at the end only if this session started it (a developer's already-running cluster is left alone).
"""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SLURM_LOCAL = REPO / "tools" / "slurm_local"
# Jobs get their own torch-extensions cache: a job killed mid-way through a JIT build (a preemption test) must
# not leave a lock that hangs the next one. (ldmscale.runtime.dist skips DeepSpeed's CPU shm op, the usual such build.)
EXTENSIONS_DIR = REPO / ".cache" / "torch_extensions_slurm"


@dataclass(frozen=True)
class SlurmCluster:
    conf: Path  # SLURM_CONF for every Slurm client call
    state_dir: Path  # daemons' logs are under state_dir/log

    def env(self, **extra: str) -> dict[str, str]:
        """The environment for sbatch/launcher subprocesses; sbatch passes it on to the job's tasks."""
        return {
            **os.environ,
            "SLURM_CONF": str(self.conf),
            "PYTHONPATH": str(REPO),
            "TORCH_EXTENSIONS_DIR": str(EXTENSIONS_DIR),
            **extra,
        }


def _skip_reason() -> str | None:
    if os.geteuid() != 0:
        return "the local Slurm cluster needs root (slurmd runs jobs as their owner)"
    if shutil.which("sbatch") is None and shutil.which("apt-get") is None:
        return "neither Slurm nor apt-get (to install it) is available"
    return None


def _running(state_dir: Path) -> bool:
    pid_file = state_dir / "run" / "slurmctld.pid"
    try:
        os.kill(int(pid_file.read_text()), 0)
    except (OSError, ValueError):
        return False
    return True


@pytest.fixture(scope="session")
def slurm_cluster() -> Iterator[SlurmCluster]:
    reason = _skip_reason()
    if reason:
        pytest.skip(reason)
    state_dir = Path(os.environ.get("LDMSCALE_SLURM_DIR", "/tmp/ldmscale-slurm"))
    started_here = not _running(state_dir)
    # apt-get install on a fresh machine is the slow part (~10-60 s); the daemons take seconds.
    proc = subprocess.run(
        ["bash", str(SLURM_LOCAL / "start.sh")], capture_output=True, text=True, timeout=900
    )
    if proc.returncode != 0:
        pytest.fail(f"tools/slurm_local/start.sh failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    cluster = SlurmCluster(conf=state_dir / "slurm.conf", state_dir=state_dir)
    old = os.environ.get("SLURM_CONF")
    os.environ["SLURM_CONF"] = str(cluster.conf)  # so ldmscale.launch's scontrol calls in-process find it too
    try:
        yield cluster
    finally:
        if old is None:
            os.environ.pop("SLURM_CONF", None)
        else:
            os.environ["SLURM_CONF"] = old
        if started_here:
            subprocess.run(["bash", str(SLURM_LOCAL / "stop.sh")], capture_output=True, timeout=120)
