"""`ldmscale-launch`: submit training to Slurm with submitit (or run it locally), requeue on preemption.

    ldmscale-launch --config configs/laion-256.yaml train.out_dir=runs/a \
        --partition gpu --nodes 4 --gpus-per-node 8 --cpus-per-task 8 --time 1440 --slurm-extra qos=high

The config is loaded and validated here first, so a typo fails on this terminal, not in the queue.

Preemption / time limit: submitit asks Slurm for USR2 `--signal-delay` seconds before the limit; Slurm
sends it to every task. submitit's own handler would checkpoint and requeue from rank 0 alone, mid-step
("Not checkpointing nor requeuing since I am a slave" on the others), which cannot work when a save is a
collective. So the trainer's handler (ldmscale.runtime.preemption, installed first thing in TrainTask on every
rank) takes the signal instead; all ranks save together at the next step boundary (or, before the first step,
stop without saving) and main() returns "preempted".
Only then does rank 0 call the submitit handler it saved before training: that runs checkpoint(), dumps
the resubmission and `scontrol requeue`s the job with submitit's timeout accounting. The requeued job
resumes with resume="auto". A job that fails (e.g. a rank killed) is resubmitted up to
--max-submissions times, each resuming from the last complete checkpoint.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import submitit

from ldmscale.config import Config
from ldmscale.runtime.cli import ArgumentParser, UsageError, at_least, one_line, output_dir_problem, run_cli
from ldmscale.runtime.errors import InputError

# Slurm job states after which the job will not run again by itself (a requeued job is PENDING).
TERMINAL_STATES = {
    "COMPLETED",
    "FAILED",
    "CANCELLED",
    "TIMEOUT",
    "NODE_FAIL",
    "OUT_OF_MEMORY",
    "BOOT_FAIL",
    "DEADLINE",
    "PREEMPTED",
    "SPECIAL_EXIT",
    "REVOKED",
}


class TrainTask(submitit.helpers.Checkpointable):
    """Runs the trainer in-process on every task of the job; picklable, so submitit can requeue it."""

    def __init__(self, config: str | None, overrides: list[str]) -> None:
        self.config = config
        self.overrides = list(overrides)

    def __call__(self) -> dict[str, Any]:
        env = submitit.JobEnvironment()
        # torchrun-style variables (first host, a port derived from the job id) that every rank agrees on;
        # CUDA_VISIBLE_DEVICES stays as Slurm set it: dist.init_distributed picks GPU LOCAL_RANK, or the one visible
        submitit.helpers.TorchDistributedEnvironment().export(set_cuda_visible_devices=False, overwrite=True)
        if not os.environ.get("CUDA_VISIBLE_DEVICES"):
            os.environ.setdefault("OMP_NUM_THREADS", "1")  # CPU ranks share cores: one BLAS thread each
        # submitit installed its checkpoint-and-requeue handler before calling us; keep it for after the save,
        # and put the trainer's in its place before any work (a notice during the imports and start-up below then
        # makes main() return "preempted" before its first step, and this task requeues as after a save).
        usr_sig = env._usr_sig()
        submitit_handler = signal.getsignal(usr_sig)
        from ldmscale.runtime import preemption

        preemption.install()

        from ldmscale.config import load_config
        from ldmscale.runtime import dist
        from ldmscale.runtime.startup import frozen_imports

        with frozen_imports():
            from ldmscale.trainer.loop import main

        result = main(load_config(self.config, self.overrides), resume="auto")
        dist.cleanup()
        outcome = {"status": str(getattr(result, "status", result)), "step": getattr(result, "step", None)}
        # Requeue only for submitit's signal (preemption notice / time limit). A SIGTERM alone is a cancel,
        # or Slurm's own preemption which requeues by itself.
        asked = signal.Signals(usr_sig).name in preemption.received()
        if outcome["status"] == "preempted" and asked and env.cluster == "slurm" and env.global_rank == 0:
            # Every rank has saved (the trainer's save is collective). Requeue now, through submitit.
            if callable(submitit_handler):
                submitit_handler(usr_sig, None)  # checkpoint() + dump + scontrol requeue; exits this process
            subprocess.run(["scontrol", "requeue", env.job_id], check=True, timeout=60)
        return outcome

    def checkpoint(self, *args: Any, **kwargs: Any) -> submitit.helpers.DelayedSubmission:
        """The resubmission after a requeue: the same task; resume="auto" finds the checkpoint just saved.

        By the time submitit calls this (see __call__), all ranks have written their shards, or all of them
        stopped before their first step with nothing new to save; either way the requeued job resumes from the
        newest complete checkpoint.
        """
        return submitit.helpers.DelayedSubmission(self, *args, **kwargs)


# Pending reasons that no amount of waiting fixes (clusters without EnforcePartLimits accept such jobs).
HOPELESS_REASONS = {
    "PartitionNodeLimit",
    "PartitionTimeLimit",
    "PartitionConfig",
    "BadConstraints",
    "InvalidAccount",
    "InvalidQOS",
    "QOSMaxNodePerJobLimit",
    "QOSMaxWallDurationPerJobLimit",
    "AccountNotAllowed",
}


@dataclass
class JobReport:
    job_id: str
    state: str
    restarts: int
    reason: str
    outcome: (
        dict[str, Any] | None
    )  # rank 0's return value (or {"status": "error", ...}), None if it wrote none


def slurm_job_fields(job_id: str) -> dict[str, str]:
    """`scontrol show job` as a dict ({} once the job has aged out of slurmctld's memory).

    Works without accounting (sacct), unlike submitit's own job state, which then reads UNKNOWN.
    """
    proc = subprocess.run(
        ["scontrol", "show", "job", "-o", job_id], check=False, capture_output=True, text=True, timeout=30
    )
    if proc.returncode != 0:
        return {}
    return dict(kv.split("=", 1) for kv in proc.stdout.split() if "=" in kv)


def wait_for_job(job: submitit.Job, poll_s: float = 2.0, timeout_s: float | None = None) -> JobReport:
    """Block until the job (including its requeued runs) is over, then read rank 0's outcome.

    A job pending for a reason that cannot clear is cancelled and reported with state "UNSCHEDULABLE".
    """
    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    state, restarts, reason = "UNKNOWN", 0, ""
    while True:
        if isinstance(job, submitit.local.local.LocalJob):
            job.wait()
            state = "COMPLETED" if job.exception() is None else "FAILED"
            break
        fields = slurm_job_fields(job.job_id)
        state, reason = fields.get("JobState", "GONE"), fields.get("Reason", "")
        restarts = max(restarts, int(fields.get("Restarts", "0")))
        if state in TERMINAL_STATES or state == "GONE":
            break
        if state == "PENDING" and reason in HOPELESS_REASONS:
            subprocess.run(["scancel", job.job_id], check=False, timeout=30)
            state = "UNSCHEDULABLE"
            break
        if deadline is not None and time.monotonic() > deadline:
            raise TimeoutError(f"job {job.job_id} still {state} after {timeout_s} s")
        time.sleep(poll_s)
    return JobReport(job.job_id, state, restarts, reason, _read_outcome(job))


def _read_outcome(job: submitit.Job) -> dict[str, Any] | None:
    pickle_path = job.paths.result_pickle  # rank 0's
    if not pickle_path.exists():
        return None
    kind, value = submitit.core.utils.pickle_load(pickle_path)
    if kind == "success":
        return value if isinstance(value, dict) else {"status": str(value)}
    return {"status": "error", "error": str(value).strip().splitlines()[-1:]}


def slurm_error_text(exc: BaseException) -> str:
    """Slurm's own words (`sbatch: error: ...`) from a failed submission."""
    text = str(getattr(exc, "stderr", "") or exc)
    lines = [ln.strip() for ln in text.splitlines() if "error" in ln.lower()]
    return "\n".join(lines) or text.strip()


def build_executor(args: argparse.Namespace) -> submitit.Executor:
    folder = Path(args.log_dir) / "%j"
    if args.local:
        ex: submitit.Executor = submitit.LocalExecutor(folder=folder)
        ex.update_parameters(
            tasks_per_node=args.tasks_per_node or max(args.gpus_per_node, 1),
            timeout_min=args.time,
            gpus_per_node=args.gpus_per_node,
        )
        return ex
    ex = submitit.SlurmExecutor(folder=folder, max_num_timeout=args.max_timeouts)
    tasks = args.tasks_per_node or max(args.gpus_per_node, 1)  # one task per GPU
    params: dict[str, Any] = {
        "job_name": args.job_name,
        "nodes": args.nodes,
        "ntasks_per_node": tasks,
        "time": args.time,
        "signal_delay_s": args.signal_delay,
        "stderr_to_stdout": True,
        # a rank that dies ends the step, so the others never sit in a collective until NCCL's timeout
        "srun_args": ["--kill-on-bad-exit=1", *srun_cpus(args.cpus_per_task)],
    }
    if args.gpus_per_node:
        params["gpus_per_node"] = args.gpus_per_node
    for key in ("partition", "cpus_per_task", "constraint", "account"):
        if getattr(args, key):
            params[key] = getattr(args, key)
    extra = dict(_split_extra(item) for item in args.slurm_extra)
    if extra:
        params["additional_parameters"] = extra
    ex.update_parameters(**params)
    return ex


def srun_cpus(cpus_per_task: int | None) -> list[str]:
    """Since Slurm 22.05 srun no longer inherits the job's --cpus-per-task: without it in the srun line every
    rank (and its loader workers) would get one CPU."""
    return [f"--cpus-per-task={cpus_per_task}"] if cpus_per_task else []


def _split_extra(item: str) -> tuple[str, Any]:
    key, sep, value = item.partition("=")
    return key.strip().lstrip("-"), (value if sep else True)  # a bare key is a flag (e.g. exclusive)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = ArgumentParser(prog="ldmscale-launch", description=__doc__.split("\n\n")[0])
    p.add_argument("--config", required=True, help="trainer YAML")
    p.add_argument("overrides", nargs="*", help="section.key=value overrides (options may come anywhere)")
    p.add_argument("--local", action="store_true", help="run here with submitit's local executor")
    for name in ("--partition", "--account", "--constraint"):
        p.add_argument(name)
    p.add_argument("--nodes", type=at_least(1), default=1)
    p.add_argument("--gpus-per-node", type=at_least(0), default=0, help="0 = CPU, no GPU request")
    p.add_argument("--tasks-per-node", type=at_least(0), default=0, help="default: gpus-per-node, or 1 on CPU")
    p.add_argument("--cpus-per-task", type=at_least(1))
    p.add_argument("--time", type=at_least(1), default=60, help="minutes per job run")
    p.add_argument("--signal-delay", type=at_least(0), default=120,
                   help="USR2 this many seconds before the limit (less than --time)")
    p.add_argument("--job-name", default="ldmscale")
    p.add_argument(
        "--slurm-extra", action="append", default=[], metavar="KEY=VALUE", help="more sbatch options"
    )
    p.add_argument("--log-dir", default="", help="submitit logs (default: <out_dir>/slurm)")
    p.add_argument(
        "--max-submissions", type=at_least(1), default=3, help="submit a failed job up to this many times in all"
    )
    p.add_argument("--max-timeouts", type=at_least(0), default=20, help="requeues on time limit within one job")
    p.add_argument("--no-wait", action="store_true", help="submit and print the job id, then exit")
    return p.parse_args(argv)  # overrides may come after options


def world_size(args: argparse.Namespace) -> int:
    """Ranks of the job: nodes x tasks per node (one task per GPU, or 1 on CPU)."""
    return args.nodes * (args.tasks_per_node or max(args.gpus_per_node, 1))


def check_launch(args: argparse.Namespace) -> Config:
    """Everything the job would otherwise find out in the queue, minutes or hours later: the command line, Slurm's
    presence, and the config against this job's world size (batch split, shards per rank, the resume folder)."""
    from ldmscale.checkpoint import resolve_resume
    from ldmscale.config import load_config, validate

    if args.local and args.nodes > 1:
        raise UsageError(f"--local runs on this machine: --nodes {args.nodes} needs Slurm (drop --local)")
    if args.signal_delay >= args.time * 60:
        raise UsageError(f"--signal-delay {args.signal_delay} s is not shorter than --time {args.time} min: the job "
                         f"would be told to checkpoint as it starts; give a delay < {args.time * 60} s")
    for item in args.slurm_extra:
        key = item.partition("=")[0].strip().lstrip("-")
        if not key or not all(c.isalnum() or c in "-_" for c in key):
            raise UsageError(f"--slurm-extra {item!r}: give KEY=VALUE (an sbatch option without its dashes, e.g. "
                             f"qos=high) or a bare flag such as exclusive")
    world = world_size(args)
    cfg = load_config(args.config, args.overrides)
    validate(cfg, world_size=world, device_type="cuda" if args.gpus_per_node else "cpu")
    from ldmscale.trainer.loop import check_data_early  # not at the top: it imports DeepSpeed

    check_data_early(cfg, world)
    resolve_resume(Path(cfg.train.out_dir) / "checkpoints", "auto")  # the job resumes with resume="auto"
    log_dir = Path(args.log_dir or Path(cfg.train.out_dir) / "slurm")
    problem = output_dir_problem(log_dir)
    if problem:
        raise UsageError(f"--log-dir {log_dir}: {problem}; give a folder for submitit's logs")
    if not args.local and shutil.which("sbatch") is None:
        raise UsageError("sbatch is not on PATH: this machine has no Slurm client; run ldmscale-launch on the "
                         "cluster's login node, or pass --local to run here")
    return cfg


def run(args: argparse.Namespace) -> int:
    """Validate, submit, wait and resubmit until finished. Returns the process exit code."""
    try:
        cfg = check_launch(args)
    except InputError as exc:  # say plainly that nothing reached the queue: "nothing submitted: config error: ..."
        exc.kind = "nothing submitted" + (f": {exc.kind}" if exc.kind else "")
        raise
    out_dir = Path(cfg.train.out_dir)
    args.log_dir = args.log_dir or str(out_dir / "slurm")
    executor = build_executor(args)
    task = TrainTask(args.config, args.overrides)
    for attempt in range(1, args.max_submissions + 1):
        try:
            job = executor.submit(task)
        except (submitit.core.utils.FailedJobError, subprocess.CalledProcessError, OSError) as exc:
            print(f"ldmscale-launch: Slurm rejected the job: {one_line(slurm_error_text(exc))}", file=sys.stderr)
            return 3
        print(
            f"submitted job {job.job_id} (submission {attempt}/{args.max_submissions}); "
            f"log {job.paths.stdout}; out_dir {out_dir}",
            flush=True,
        )
        if args.no_wait:
            return 0
        report = wait_for_job(job)
        if report.state == "UNSCHEDULABLE":
            print(
                f"ldmscale-launch: Slurm cannot run job {report.job_id} ({report.reason}); cancelled it",
                file=sys.stderr,
            )
            return 3
        _print_wandb(out_dir)
        outcome = report.outcome or {}
        status = outcome.get("status")
        print(
            f"job {report.job_id}: state={report.state} restarts={report.restarts} outcome={report.outcome}",
            flush=True,
        )
        if status == "finished":
            print(f"FINISHED step={outcome.get('step')}", flush=True)
            return 0
        print(f"job {report.job_id} ended without finishing; see {job.paths.stdout}", file=sys.stderr)
    print(f"ldmscale-launch: gave up after {args.max_submissions} submissions", file=sys.stderr)
    return 1


def _print_wandb(out_dir: Path) -> None:
    run_id = out_dir / "wandb_run_id"
    if run_id.exists():
        print(f"W&B run id: {run_id.read_text().strip()}", flush=True)


def cli(argv: list[str] | None = None) -> None:
    run_cli("ldmscale-launch", lambda: run(parse_args(argv)))


if __name__ == "__main__":
    cli()
