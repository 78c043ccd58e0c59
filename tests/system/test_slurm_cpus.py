"""srun must hand every rank the CPUs the job asked for: since Slurm 22.05 it no longer inherits the job's
--cpus-per-task, so both launch paths pass it to srun themselves. On the real local Slurm cluster."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import tiny_overrides
from tests.slurm_fixtures import SlurmCluster

pytestmark = pytest.mark.slurm
REPO = Path(__file__).resolve().parents[2]

# Stands in for the interpreter in slurm/train.sbatch (its PYTHON parameter): reports what the task sees, and the
# command line of the srun that started it (srun runs on this host, its pid is in the step's record).
PROBE = r"""#!/usr/bin/env bash
step="$(scontrol show step "$SLURM_JOB_ID.$SLURM_STEP_ID")"
pid="$(grep -o 'SrunHost:Pid=[^ ]*' <<<"$step" | cut -d: -f3)"
{ echo "rank=$SLURM_PROCID cpus_per_task=${SLURM_CPUS_PER_TASK:-unset} $(grep -o 'TRES=cpu=[0-9]*' <<<"$step")"
  echo "srun: $(tr '\0' ' ' < /proc/$pid/cmdline)"; } >> "$PROBE_OUT"
echo FINISHED step=0
"""


def test_sbatch_script_passes_cpus_per_task_to_srun(slurm_cluster: SlurmCluster, tmp_path: Path) -> None:
    probe, report = tmp_path / "probe.sh", tmp_path / "report.txt"
    probe.write_text(PROBE)
    probe.chmod(0o755)
    env = slurm_cluster.env(CONFIG="configs/tiny.yaml", NODES="2", GPUS_PER_NODE="0", CPUS_PER_TASK="2",
                            PYTHON=str(probe), PROBE_OUT=str(report), LDMSCALE_ROOT=str(REPO))
    proc = subprocess.run(["bash", "slurm/train.sbatch", "--wait", f"--output={tmp_path}/job-%j.out"], cwd=REPO,
                          env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    lines = report.read_text().splitlines()
    tasks = sorted(ln for ln in lines if ln.startswith("rank="))
    assert tasks == ["rank=0 cpus_per_task=2 TRES=cpu=4", "rank=1 cpus_per_task=2 TRES=cpu=4"], lines
    assert all("--cpus-per-task=2" in ln for ln in lines if ln.startswith("srun:")), lines


def test_launcher_passes_cpus_per_task_to_srun(slurm_cluster: SlurmCluster, assets: Path, tmp_path: Path) -> None:
    """The submission submitit wrote (and Slurm accepted) runs srun with the job's CPUs per task."""
    out = tmp_path / "run"
    args = ["--config", "configs/tiny.yaml", *tiny_overrides(assets, out), "--nodes", "2", "--cpus-per-task", "2",
            "--no-wait"]
    proc = subprocess.run([sys.executable, "-m", "ldmscale.launch", *args], cwd=REPO, env=slurm_cluster.env(),
                          capture_output=True, text=True, timeout=120)
    job_id = re.search(r"submitted job (\d+)", proc.stdout)
    assert proc.returncode == 0 and job_id, proc.stdout + proc.stderr
    subprocess.run(["scancel", job_id.group(1)], check=False, timeout=30)
    script = next((out / "slurm").glob("*/*_submission.sh")).read_text()
    assert "#SBATCH --cpus-per-task=2" in script
    srun = next(ln for ln in script.splitlines() if ln.startswith("srun "))
    assert "--cpus-per-task=2" in srun, srun
