"""srun must hand every rank the CPUs the job asked for: since Slurm 22.05 it no longer inherits the job's
--cpus-per-task, so both launch paths pass it to srun themselves. On the real local Slurm cluster."""

from __future__ import annotations

import re
import subprocess
import time
from pathlib import Path

import pytest

from ldmscale.launch import slurm_job_fields
from tests.conftest import tiny_overrides
from tests.runs import launch_in_process
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


def job_end(job_id: str, timeout_s: float) -> dict[str, str]:
    """The job's fields once it is over, polled every 0.2 s (`sbatch --wait` polls after 2, 10, 42 s...)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        fields = slurm_job_fields(job_id)
        if fields.get("JobState", "GONE") not in {"PENDING", "CONFIGURING", "RUNNING", "COMPLETING", "REQUEUED"}:
            return fields
        time.sleep(0.2)
    raise TimeoutError(f"job {job_id} still running after {timeout_s} s")


def test_sbatch_script_passes_cpus_per_task_to_srun(slurm_cluster: SlurmCluster, tmp_path: Path) -> None:
    probe, report = tmp_path / "probe.sh", tmp_path / "report.txt"
    probe.write_text(PROBE)
    probe.chmod(0o755)
    env = slurm_cluster.env(CONFIG="configs/tiny.yaml", NODES="2", GPUS_PER_NODE="0", CPUS_PER_TASK="2",
                            PYTHON=str(probe), PROBE_OUT=str(report), LDMSCALE_ROOT=str(REPO))
    proc = subprocess.run(["bash", "slurm/train.sbatch", f"--output={tmp_path}/job-%j.out"], cwd=REPO,
                          env=env, capture_output=True, text=True, timeout=60)
    job_id = re.search(r"Submitted batch job (\d+)", proc.stdout)
    assert proc.returncode == 0 and job_id, proc.stdout + proc.stderr
    fields = job_end(job_id.group(1), timeout_s=300)
    assert fields.get("JobState") == "COMPLETED", (fields, (tmp_path / f"job-{job_id.group(1)}.out").read_text())
    lines = report.read_text().splitlines()
    tasks = sorted(ln for ln in lines if ln.startswith("rank="))
    assert tasks == ["rank=0 cpus_per_task=2 TRES=cpu=4", "rank=1 cpus_per_task=2 TRES=cpu=4"], lines
    assert all("--cpus-per-task=2" in ln for ln in lines if ln.startswith("srun:")), lines


def test_launcher_passes_cpus_per_task_to_srun(slurm_cluster: SlurmCluster, assets: Path, tmp_path: Path,
                                               capsys: pytest.CaptureFixture) -> None:
    """The submission submitit wrote (and Slurm accepted) runs srun with the job's CPUs per task."""
    out = tmp_path / "run"
    args = ["--config", "configs/tiny.yaml", *tiny_overrides(assets, out), "--nodes", "2", "--cpus-per-task", "2",
            "--no-wait"]
    code, out_text, err = launch_in_process(args, capsys)
    job_id = re.search(r"submitted job (\d+)", out_text)
    assert code == 0 and job_id, out_text + err
    subprocess.run(["scancel", job_id.group(1)], check=False, timeout=30)
    script = next((out / "slurm").glob("*/*_submission.sh")).read_text()
    assert "#SBATCH --cpus-per-task=2" in script
    srun = next(ln for ln in script.splitlines() if ln.startswith("srun "))
    assert "--cpus-per-task=2" in srun, srun
