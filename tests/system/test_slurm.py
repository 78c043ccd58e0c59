"""Preemption, time limits, killed ranks and submission errors on a REAL two-node Slurm cluster.

Every training job here is 2 nodes x 1 task (n1, n2 on this host) running the real trainer on
configs/tiny.yaml. A resumed run must log exactly the steps an uninterrupted run logs, with the same loss
at every step, and end with a checkpoint at max_steps.
"""

from __future__ import annotations

import json
import math
import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from ldmscale.checkpoint import latest_tag, read_trainer_state
from ldmscale.launch import slurm_job_fields
from tests.conftest import tiny_overrides
from tests.runs import launch_in_process
from tests.slurm_fixtures import SlurmCluster

pytestmark = pytest.mark.slurm

REPO = Path(__file__).resolve().parents[2]
# A signal at step 10 stops the run one or two steps later (the ranks agree at the next step boundary); 40 steps
# leave room for that, a periodic checkpoint after the resume and a kill two steps after it.
MAX_STEPS = 40
# Without periodic checkpoints only a preemption save makes one, so "resumed at the PREEMPTED step" proves that
# save worked. Tests that also need periodic ones (a killed rank) check instead that no periodic save wrote it.
NO_PERIODIC = {"train.max_steps": MAX_STEPS, "train.ckpt_every": 1000}
CKPT_EVERY = 5
JOB_TIMEOUT_S = 300  # one job incl. requeues; a tiny run needs ~20-60 s on 2 loaded cores


# ------------------------------------------------------------------------------------------ helpers


def wait_until(pred: Callable[[], Any], timeout_s: float, what: str, poll_s: float = 0.5) -> Any:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = pred()
        if value:
            return value
        time.sleep(poll_s)
    raise TimeoutError(f"timed out after {timeout_s} s waiting for {what}")


def step_losses(out_dir: Path) -> list[tuple[int, float]]:
    """(step, loss) per training step line of rank 0's log.jsonl, in file order."""
    path = out_dir / "log.jsonl"
    if not path.exists():
        return []
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [(r["step"], r["loss"]) for r in rows if "step" in r and "loss" in r]


def steps_after_event(out_dir: Path, prefix: str) -> list[tuple[int, float]]:
    """(step, loss) rows logged after the last event starting with `prefix`."""
    rows = [json.loads(line) for line in (out_dir / "log.jsonl").read_text().splitlines() if line.strip()]
    start = max(i for i, r in enumerate(rows) if r.get("event", "").startswith(prefix))
    return [(r["step"], r["loss"]) for r in rows[start + 1 :] if "step" in r and "loss" in r]


def runs_by_resume(out_dir: Path) -> list[list[tuple[int, float]]]:
    """(step, loss) rows of rank 0's log.jsonl, one list per run: a new list at every "resumed from" event."""
    runs: list[list[tuple[int, float]]] = [[]]
    for line in (out_dir / "log.jsonl").read_text().splitlines():
        row = json.loads(line) if line.strip() else {}
        if row.get("event", "").startswith("resumed from"):
            runs.append([])
        elif "step" in row and "loss" in row:
            runs[-1].append((row["step"], row["loss"]))
    return runs


def resumed_steps(out_dir: Path) -> list[int]:
    """The step of every "resumed from DIR at step N" event, in order."""
    return [int(e.rsplit(" ", 1)[1]) for e in events(out_dir) if e.startswith("resumed from")]


def assert_runs_resume_where_they_saved(
    out_dir: Path, reference: dict[int, float], starts: list[int], context: str
) -> None:
    """Run k (k = 0, 1, ...) trained steps starts[k]+1, +2, ... consecutively, each with the uninterrupted run's
    loss bitwise; the last run reached MAX_STEPS. Steps a killed run trained past its checkpoint appear twice."""
    runs = runs_by_resume(out_dir)
    assert [0, *resumed_steps(out_dir)] == starts and len(runs) == len(starts), (starts, runs, context)
    for start, rows in zip(starts, runs):
        steps = [s for s, _ in rows]
        assert steps == list(range(start + 1, start + 1 + len(steps))) and steps, (
            f"a run resumed at {start} logged {steps}\n{context}"
        )
    assert runs[-1][-1][0] == MAX_STEPS, context
    bad = [(s, loss, reference[s]) for rows in runs for s, loss in rows if loss != reference[s]]
    assert not bad, f"loss differs from the uninterrupted run at (step, got, want) {bad[:5]}\n{context}"


def events(out_dir: Path) -> list[str]:
    path = out_dir / "log.jsonl"
    return [json.loads(line)["event"] for line in path.read_text().splitlines() if '"event"' in line]


def last_step(out_dir: Path) -> int:
    rows = step_losses(out_dir)
    return rows[-1][0] if rows else 0


def job_done(job_id: str) -> dict[str, str] | None:
    fields = slurm_job_fields(job_id)
    state = fields.get("JobState", "GONE")
    return fields if state not in {"PENDING", "RUNNING", "REQUEUED", "COMPLETING", "CONFIGURING"} else None


def final_checkpoint_step(out_dir: Path) -> int:
    root = out_dir / "checkpoints"
    return int(read_trainer_state(root / latest_tag(root))["step"])


def sbatch_train(cluster: SlurmCluster, assets: Path, out_dir: Path, **extra: object) -> str:
    """Submit slurm/train.sbatch (self-submitting mode) on 2 nodes x 1 CPU task; returns the job id."""
    env = cluster.env(
        CONFIG="configs/tiny.yaml",
        OVERRIDES=" ".join(tiny_overrides(assets, out_dir, **{**NO_PERIODIC, **extra})),
        NODES="2",
        GPUS_PER_NODE="0",
        PYTHON=sys.executable,
        LDMSCALE_ROOT=str(REPO),
        # a submitting shell left with a single process's rendezvous (as after an in-process torch run): sbatch
        # exports it to every task, which must still take its rank from Slurm
        RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_PORT="29500",
    )
    out_dir.mkdir(parents=True, exist_ok=True)
    proc = subprocess.run(
        ["bash", "slurm/train.sbatch", f"--output={out_dir}/job-%j.out"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    return re.search(r"Submitted batch job (\d+)", proc.stdout).group(1)


class Launcher:
    """`python -m ldmscale.launch ...` in the background, its output in a file."""

    def __init__(self, cluster: SlurmCluster, out_dir: Path, args: list[str]) -> None:
        out_dir.mkdir(parents=True, exist_ok=True)
        self.log = out_dir.parent / f"{out_dir.name}-launch.log"
        self._fh = open(self.log, "w")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "ldmscale.launch", *args],
            cwd=REPO,
            env=cluster.env(),
            stdout=self._fh,
            stderr=subprocess.STDOUT,
        )

    def text(self) -> str:
        return self.log.read_text()

    def job_ids(self) -> list[str]:
        return re.findall(r"submitted job (\d+)", self.text())

    def first_job(self) -> str:
        return wait_until(lambda: (self.job_ids() or [None])[0], 60, f"a job id in {self.log}")

    def wait(self, timeout_s: float) -> int:
        try:
            return self.proc.wait(timeout=timeout_s)
        finally:
            self._fh.close()

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


def launch_args(assets: Path, out_dir: Path, *more: str, **extra: object) -> list[str]:
    return [
        "--config",
        "configs/tiny.yaml",
        *tiny_overrides(assets, out_dir, **{**NO_PERIODIC, **extra}),
        "--nodes",
        "2",
        *more,
    ]


def rank_pid(job_id: str, rank: int) -> int | None:
    """The pid of the submitit task running `rank` of `job_id` (both fake nodes live on this host).

    Data-loader workers are forks with the same command line and environment: take the one whose parent
    is not itself a task process.
    """

    def task_of(pid: str) -> bool:
        try:
            env = dict(
                kv.split("=", 1) for kv in Path(f"/proc/{pid}/environ").read_text().split("\0") if "=" in kv
            )
            cmd = Path(f"/proc/{pid}/cmdline").read_text()
        except OSError:
            return False
        return env.get("SLURM_JOB_ID") == job_id and env.get("SLURM_PROCID") == str(rank) and "_submit" in cmd

    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and task_of(entry.name):
            try:
                ppid = (entry / "stat").read_text().rsplit(")", 1)[1].split()[1]
            except (OSError, IndexError):
                continue
            if not task_of(ppid):
                return int(entry.name)
    return None


def slurm_text(job_out: Path) -> str:
    return job_out.read_text() if job_out.exists() else f"(no {job_out})"


# ------------------------------------------------------------------------------------------ fixtures


@pytest.fixture
def jobs(slurm_cluster: SlurmCluster) -> Iterator[list[str]]:
    """Job ids a test submitted; what still runs at teardown is cancelled so the next test starts clean."""
    ids: list[str] = []
    yield ids
    for job_id in ids:
        subprocess.run(["scancel", job_id], check=False, capture_output=True, timeout=30)


@pytest.fixture(scope="module")
def reference(
    slurm_cluster: SlurmCluster, assets: Path, tmp_path_factory: pytest.TempPathFactory
) -> dict[int, float]:
    """Loss per step of an uninterrupted run through the same sbatch script (same world size, same config).

    While it runs, another program holds the job-specific rendezvous port (20000 + job id % 20000) of the next
    few job ids, as a daemon or a killed run's lingering rank may on a real node: the script must pick a free
    port instead of failing every rank with EADDRINUSE.
    """
    out = tmp_path_factory.mktemp("slurm") / "reference"
    next_id = int(slurm_last_job_id())
    held_ports = [20000 + (next_id + k) % 20000 for k in range(3)]
    held = [held_port(port) for port in held_ports]
    try:
        job_id = sbatch_train(slurm_cluster, assets, out)
        try:
            fields = wait_until(lambda: job_done(job_id), JOB_TIMEOUT_S, f"reference job {job_id}")
        finally:
            subprocess.run(["scancel", job_id], check=False, timeout=30)
    finally:
        for sock in held:
            sock.close()
    text = slurm_text(out / f"job-{job_id}.out")
    assert fields.get("JobState") == "COMPLETED", text
    port = int(re.search(r"master=\S+:(\d+)", text).group(1))
    assert port not in held_ports, text
    assert f"FINISHED step={MAX_STEPS}" in text, text
    rows = step_losses(out)
    assert [s for s, _ in rows] == list(range(1, MAX_STEPS + 1)), text
    return dict(rows)


# ------------------------------------------------------------------------------------------ sbatch


def sbatch_rank_pid(job_id: str, rank: int) -> int | None:
    """The pid of the trainer process of `rank` in sbatch job `job_id` (not one of its forked loader workers)."""

    def is_rank(pid: str) -> bool:
        try:
            env = dict(kv.split("=", 1) for kv in Path(f"/proc/{pid}/environ").read_text().split("\0") if "=" in kv)
            cmd = Path(f"/proc/{pid}/cmdline").read_text()
        except OSError:
            return False
        return env.get("SLURM_JOB_ID") == job_id and env.get("SLURM_PROCID") == str(rank) and "ldmscale.train" in cmd

    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and is_rank(entry.name):
            try:
                ppid = (entry / "stat").read_text().rsplit(")", 1)[1].split()[1]
            except (OSError, IndexError):
                continue
            if not is_rank(ppid):
                return int(entry.name)
    return None


def job_sections(text: str) -> list[str]:
    """A sbatch job's output, one section per run of the job (each run's shell prints an `=== ldmscale job` line)."""
    return text.split("=== ldmscale job")[1:]


def kill_after_next_checkpoint(out: Path, pid_of_rank_1: Callable[[], int | None]) -> int:
    """Once the run resumed after the preemption has saved its first periodic checkpoint and trained two steps
    more, kill rank 1 with -9; returns the step the run resumed at."""
    resumed_at = wait_until(lambda: (resumed_steps(out) or [None])[0], JOB_TIMEOUT_S, "the requeued run's resume")
    next_ckpt = (resumed_at // CKPT_EVERY + 1) * CKPT_EVERY
    wait_until(lambda: last_step(out) >= next_ckpt + 2, JOB_TIMEOUT_S, f"step {next_ckpt + 2}", poll_s=0.2)
    os.kill(wait_until(pid_of_rank_1, 30, "rank 1's process"), signal.SIGKILL)
    return resumed_at


def assert_resumed_from_preemption_then_periodic(out: Path, preempted: int, context: str) -> int:
    """The first resume is at the preemption's own checkpoint (no periodic save wrote that step), the second at a
    periodic checkpoint the resumed run saved before its rank was killed; returns that step."""
    ckpts = out / "checkpoints"
    assert f"resumed from {ckpts}/step_{preempted:08d} at step {preempted}" in events(out), context
    assert f"saved checkpoint step {preempted}" not in events(out), context  # the preemption's save, not a periodic
    resumed = resumed_steps(out)
    assert len(resumed) == 2, (resumed, context)
    periodic = resumed[1]
    assert periodic > preempted and periodic % CKPT_EVERY == 0, (resumed, context)
    assert f"resumed from {ckpts}/step_{periodic:08d} at step {periodic}" in events(out), context
    return periodic


def test_sbatch_usr1_then_a_killed_rank_requeue_and_resume(
    slurm_cluster: SlurmCluster, assets: Path, reference: dict[int, float], tmp_path: Path, jobs: list[str]
) -> None:
    """One job, three runs of slurm/train.sbatch.

    Run 0: USR1 to the batch shell only (`--batch`, as with --signal=B:USR1@grace): its trap forwards it, every
    rank saves the same step, the script requeues. Run 1 resumes from that checkpoint; after its next periodic
    checkpoint rank 1 is killed with -9: srun fails and nothing says PREEMPTED, but the run saved a checkpoint other
    than the one it started from, so the script requeues again (rank 0's status file, not a grep of the output).
    Run 2 resumes from the periodic checkpoint and finishes. Every step has the uninterrupted run's loss.
    """
    out = tmp_path / "run"
    job_id = sbatch_train(slurm_cluster, assets, out, **{"train.ckpt_every": CKPT_EVERY})
    jobs.append(job_id)
    job_out = out / f"job-{job_id}.out"
    wait_until(lambda: last_step(out) >= 10, JOB_TIMEOUT_S, "step 10", poll_s=0.2)
    subprocess.run(["scancel", "--signal=USR1", "--batch", job_id], check=True, timeout=30)
    kill_after_next_checkpoint(out, lambda: sbatch_rank_pid(job_id, 1))
    fields = wait_until(lambda: job_done(job_id), JOB_TIMEOUT_S, f"job {job_id} to end")
    text = slurm_text(job_out)

    assert fields["JobState"] == "COMPLETED" and fields["Restarts"] == "2", (fields, text)
    preempt_run, killed_run, last_run = job_sections(text)  # one section per run of the job
    assert all(f" {job_id} restart={k} " in run for k, run in enumerate(job_sections(text))), text
    # run 0: the batch shell's USR1 reached every rank, which saved and reported it; the script requeued
    preempted = int(re.search(r"^PREEMPTED step=(\d+)", preempt_run, re.M).group(1))
    assert 10 <= preempted < MAX_STEPS, text
    assert "got USR1" in preempt_run and f"preempted: requeueing job {job_id}" in preempt_run, text
    # run 1: killed, not preempted (the trainer's own line, not a traceback that quotes the source comment naming
    # it); requeued because it saved progress
    assert not re.search(r"^PREEMPTED step=", killed_run, re.M), text
    assert "before it stopped" in killed_run and f"requeueing job {job_id}" in killed_run, text
    assert f"FINISHED step={MAX_STEPS}" in last_run, text
    periodic = assert_resumed_from_preemption_then_periodic(out, preempted, text)
    assert_runs_resume_where_they_saved(out, reference, [0, preempted, periodic], text)
    assert final_checkpoint_step(out) == MAX_STEPS


# ------------------------------------------------------------------------------------------ ldmscale-launch


def test_launch_usr2_requeue_then_killed_rank_resubmission(
    slurm_cluster: SlurmCluster, assets: Path, reference: dict[int, float], tmp_path: Path, jobs: list[str]
) -> None:
    """One launcher, two jobs. USR2 to every task (what Slurm sends before a preemption or the time limit with
    submitit's --signal=USR2@N): every rank saves the same step and rank 0 requeues the job (no new submission).
    The requeued run resumes there; after its next periodic checkpoint rank 1 is killed with -9, the job fails,
    and the launcher submits it again (--max-submissions 2): the new job resumes from that periodic checkpoint and
    finishes. Every step has the uninterrupted run's loss."""
    out = tmp_path / "run"
    launcher = Launcher(
        slurm_cluster,
        out,
        launch_args(assets, out, "--time", "10", "--max-submissions", "2", **{"train.ckpt_every": CKPT_EVERY}),
    )
    try:
        first = launcher.first_job()
        jobs.append(first)
        wait_until(lambda: last_step(out) >= 10, JOB_TIMEOUT_S, "step 10", poll_s=0.2)
        subprocess.run(["scancel", "--signal=USR2", first], check=True, timeout=30)
        kill_after_next_checkpoint(out, lambda: rank_pid(first, 1))
        wait_until(lambda: len(launcher.job_ids()) >= 2, 120, "a second submission")
        jobs.append(launcher.job_ids()[1])
        rc = launcher.wait(JOB_TIMEOUT_S)
    finally:
        launcher.kill()
    text = launcher.text()
    rank0 = slurm_text(out / "slurm" / first / f"{first}_0_log.out")
    rank1 = slurm_text(out / "slurm" / first / f"{first}_1_log.out")
    assert rc == 0, text + rank0
    # the preemption requeued the first job (restarts=1) instead of submitting a new one; the kill failed it
    assert re.search(rf"job {first}: state=FAILED restarts=1 ", text), text
    assert len(launcher.job_ids()) == 2, text
    second = launcher.job_ids()[1]
    assert re.search(rf"job {second}: state=COMPLETED restarts=0 ", text), text
    assert f"FINISHED step={MAX_STEPS}" in text, text
    # rank 1 took the signal through the trainer's flag, not submitit's rank-0-only handler ...
    assert "Not checkpointing nor requeuing" not in rank1, rank1
    # ... and rank 0 started submitit's requeue (checkpoint(), then `scontrol requeue`) only after the collective
    # save. Not submitit's "Requeued job" line: the requeue cancels the step, which may kill that scontrol before
    # it returns, and then nothing prints it (the job is requeued all the same: restarts=1 above).
    preempted = int(re.search(r"^PREEMPTED step=(\d+)", rank0, re.M).group(1))
    assert 10 <= preempted < MAX_STEPS, rank0
    assert rank0.index(f"PREEMPTED step={preempted}") < rank0.index("Calling checkpoint method"), rank0
    assert len(re.findall(r"^PREEMPTED step=", rank0, re.M)) == 1, rank0  # the killed run did not say it
    periodic = assert_resumed_from_preemption_then_periodic(out, preempted, rank0)
    assert_runs_resume_where_they_saved(out, reference, [0, preempted, periodic], text + rank0)
    assert final_checkpoint_step(out) == MAX_STEPS


def test_launch_time_limit_signal_requeues_and_resumes(
    slurm_cluster: SlurmCluster, assets: Path, tmp_path: Path, jobs: list[str]
) -> None:
    """Slurm's own time-limit warning: the job's limit is cut so that the USR2 it sends `--signal-delay` s
    before the end falls inside training (slurmctld checks limits every 30 s, so a 1-minute job would race
    the trainer's start-up). After the requeue the limit is restored and the requeued run resumes from the
    preemption's checkpoint; once it has trained a step the job is cancelled (a requeued run that goes on to
    finish, on every rank, with the uninterrupted run's losses: the USR1 and USR2 tests above)."""
    out = tmp_path / "run"
    # training must outlast the next 30-s limit check after step 10 even on an idle machine (300 tiny steps took
    # only 27 s there and finished before the warning); the steps after the resume are not run
    steps = 1000
    launcher = Launcher(
        slurm_cluster,
        out,
        launch_args(assets, out, "--time", "10", "--signal-delay", "120", **{"train.max_steps": steps}),
    )
    job_id = ""
    try:
        job_id = launcher.first_job()
        jobs.append(job_id)
        wait_until(lambda: last_step(out) >= 10, JOB_TIMEOUT_S, "step 10", poll_s=0.2)
        started = slurm_job_fields(job_id)["RunTime"]  # H:MM:SS or MM:SS
        elapsed_s = sum(int(x) * 60**i for i, x in enumerate(reversed(started.split(":"))))
        # remaining time in (60, 120] s <= signal delay: the warning comes at the next check, the kill never
        new_limit = math.ceil(elapsed_s / 60) + 1
        subprocess.run(
            ["scontrol", "update", f"JobId={job_id}", f"TimeLimit={new_limit}"], check=True, timeout=30
        )
        wait_until(
            lambda: int(slurm_job_fields(job_id).get("Restarts", "0")) >= 1, 120, "the time-limit requeue"
        )
        subprocess.run(["scontrol", "update", f"JobId={job_id}", "TimeLimit=10"], check=True, timeout=30)
        wait_until(lambda: any(e.startswith("resumed from") for e in events(out))
                   and steps_after_event(out, "resumed from"), JOB_TIMEOUT_S, "a step of the requeued run")
    finally:
        launcher.kill()
        if job_id:  # stopped before the log is read: no line is half written
            subprocess.run(["scancel", job_id], check=False, timeout=30)
            wait_until(lambda: job_done(job_id), 120, f"job {job_id} to end")
    rank0 = slurm_text(out / "slurm" / job_id / f"{job_id}_0_log.out")
    assert "PREEMPTED step=" in rank0 and "signals: ['SIGUSR2']" in rank0, rank0
    preempted = int(re.search(r"^PREEMPTED step=(\d+)", rank0, re.M).group(1))
    assert 10 <= preempted < steps, rank0
    assert f"resumed from {out / 'checkpoints'}/step_{preempted:08d} at step {preempted}" in events(out), rank0
    steps_logged = [s for s, _ in step_losses(out)]
    assert steps_logged == list(range(1, len(steps_logged) + 1)), steps_logged  # each once, in order, none lost
    assert len(steps_logged) > preempted


def test_launch_config_error_is_reported_before_submission(
    slurm_cluster: SlurmCluster, assets: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    out = tmp_path / "run"
    before = slurm_last_job_id()
    code, _, err = launch_in_process(launch_args(assets, out, "train.bogus_key=1"), capsys)
    assert code == 2, err
    assert "nothing submitted: config error" in err and "bogus_key" in err, err
    assert slurm_last_job_id() == before and not (out / "slurm").exists()


def test_launch_missing_partition_passes_slurms_message(
    slurm_cluster: SlurmCluster, assets: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    out = tmp_path / "run"
    code, _, err = launch_in_process(launch_args(assets, out, "--partition", "nosuch"), capsys)
    assert code == 3, err
    assert "Slurm rejected the job" in err and "invalid partition specified: nosuch" in err, err


def test_launch_impossible_node_count_passes_slurms_message(
    slurm_cluster: SlurmCluster, assets: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    out = tmp_path / "run"
    # a batch 3 ranks divide, so that the node count is the one thing wrong and Slurm is who says so
    args = [*launch_args(assets, out, **{"train.global_batch_size": 12}), "--nodes", "3"]
    code, _, err = launch_in_process(args, capsys)
    assert code == 3, err
    assert "Node count specification invalid" in err, err


def held_port(port: int) -> socket.socket:
    """A socket listening on 127.0.0.1:port (or the port left alone if something already holds it)."""
    sock = socket.socket()
    try:
        sock.bind(("127.0.0.1", port))
        sock.listen()
    except OSError:
        pass  # already taken by someone else: just as good for the test
    return sock


def slurm_last_job_id() -> str:
    """slurmctld's next job id: it moves if anything at all was submitted."""
    proc = subprocess.run(
        ["scontrol", "show", "config"], capture_output=True, text=True, check=True, timeout=30
    )
    return re.search(r"NEXT_JOB_ID\s*=\s*(\d+)", proc.stdout).group(1)
