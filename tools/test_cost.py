"""What a test run costs, measured so that other work on the machine does not change the figures: the CPU seconds
of pytest and of every process it starts (servers and Slurm jobs included), the programs it starts and the training
steps its runs log. Wall time is printed too, but on a shared machine only the first three compare across runs.

    python tools/test_cost.py tests/unit tests/integration/test_multiproc.py ... [-- PYTEST_ARGS]

One pytest run per path, under `perf stat` (task-clock and sched:sched_process_exec, counted over every descendant,
daemons that detach included). Without a usable perf it falls back to getrusage (pytest and the children it waited
for: a server's or a Slurm job's CPU is then missing) and prints no program count. Training steps are the rows with
a loss in every log.jsonl under the run's --basetemp (rank 0 logs each step once; a resumed run logs its steps
again). Prints one Markdown table row per path, then the total; with --top N, the N tests of each path that used
the most CPU (pytest's process and the children it waited for, setup and teardown included: a module fixture's cost
goes to the first test that asks for it); with --by-file, a table per path of its test files' CPU seconds, their
share of the path's CPU, and their wall seconds (a file whose wall time is far above its CPU time waits: sleeps,
timeouts, servers), what pytest spent outside any test (imports, collection) last.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PERF_EVENTS = ["task-clock", "sched:sched_process_exec"]


@dataclass
class Cost:
    path: str
    outcome: str
    cpu_s: float
    programs: int | None
    steps: int
    wall_s: float

    def row(self) -> str:
        programs = "-" if self.programs is None else str(self.programs)
        return f"| {self.path} | {self.outcome} | {self.cpu_s:.0f} | {programs} | {self.steps} | {self.wall_s:.0f} |"


def _cpu_now() -> float:
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


class PerTestCpu:
    """pytest plugin (this file, loaded with `-p test_cost`): CPU seconds per test, one JSON line each, appended to
    $TEST_COST_PER_TEST."""

    def __init__(self, path: str) -> None:
        self.path, self.start, self.start_wall = path, 0.0, 0.0

    def pytest_runtest_logstart(self, nodeid: str, location: object) -> None:
        self.start, self.start_wall = _cpu_now(), time.monotonic()

    def pytest_runtest_logfinish(self, nodeid: str, location: object) -> None:
        row = {"test": nodeid, "cpu_s": round(_cpu_now() - self.start, 2),
               "wall_s": round(time.monotonic() - self.start_wall, 2)}
        with open(self.path, "a") as f:
            f.write(json.dumps(row) + "\n")


def pytest_configure(config: object) -> None:  # the plugin's entry point
    path = os.environ.get("TEST_COST_PER_TEST")
    option = config.option  # type: ignore[attr-defined]
    if getattr(option, "numprocesses", None) and not hasattr(config, "workerinput"):
        return  # pytest-xdist: the workers run the tests and measure them, not the process that hands them out
    if path:
        config.pluginmanager.register(PerTestCpu(path), "test_cost_per_test")  # type: ignore[attr-defined]


def perf_usable() -> bool:
    if shutil.which("perf") is None:
        return False
    probe = subprocess.run(["perf", "stat", "-x,", *sum((["-e", e] for e in PERF_EVENTS), []), "true"],
                           capture_output=True, text=True)
    return probe.returncode == 0 and "not supported" not in probe.stderr


def training_steps(basetemp: Path) -> int:
    steps = 0
    for log in basetemp.rglob("log.jsonl"):
        for line in log.read_text(errors="replace").splitlines():
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                continue
            steps += isinstance(row, dict) and "step" in row and "loss" in row
    return steps


def outcome(text: str) -> str:
    """pytest's summary counts, e.g. '12 passed, 1 skipped'."""
    found = re.findall(r"(\d+) (passed|failed|skipped|errors?|xfailed|xpassed)", text.splitlines()[-1] if text else "")
    return ", ".join(f"{n} {what}" for n, what in found) or "no summary"


def by_file(tests: list[dict], path_cpu_s: float) -> str:
    """A Markdown table of the tests' CPU and wall seconds summed per test file, most CPU first, with each file's share
    of the whole run's CPU; the rest of the run's CPU (imports, collection, session fixtures' teardown) last."""
    files: dict[str, list[float]] = {}
    for r in tests:
        acc = files.setdefault(r["test"].split("::")[0], [0, 0.0, 0.0])
        acc[0] += 1
        acc[1] += r["cpu_s"]
        acc[2] += r.get("wall_s", 0.0)
    lines = ["| file | tests | CPU s | share | wall s |", "|---|---|---|---|---|"]
    for name, (n, cpu, wall) in sorted(files.items(), key=lambda kv: -kv[1][1]):
        lines.append(f"| {name} | {n:.0f} | {cpu:.1f} | {100 * cpu / path_cpu_s:.0f}% | {wall:.1f} |")
    rest = path_cpu_s - sum(v[1] for v in files.values())
    lines.append(f"| (outside the tests: imports, collection) | | {rest:.1f} | {100 * rest / path_cpu_s:.0f}% | |")
    return "\n".join(lines) + "\n"


def measure(path: str, pytest_args: list[str], use_perf: bool, top: int, per_file: bool) -> Cost:
    basetemp = Path(tempfile.mkdtemp(prefix="test-cost-"))
    stats = basetemp.parent / f"{basetemp.name}.perf"
    per_test = basetemp.parent / f"{basetemp.name}.tests"
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "test_cost",
           f"--basetemp={basetemp}", *path.split(), *pytest_args]
    env = {**os.environ, "TEST_COST_PER_TEST": str(per_test),
           "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO / "tools"), os.environ.get("PYTHONPATH")]))}
    if use_perf:
        cmd = ["perf", "stat", "-x,", "-o", str(stats), *sum((["-e", e] for e in PERF_EVENTS), []), "--", *cmd]
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.monotonic()
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
    wall = time.monotonic() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    output = basetemp.parent / f"{basetemp.name}.out"
    output.write_text(proc.stdout + proc.stderr)
    sys.stderr.write(f"{path}: pytest's output in {output}\n")
    cpu, programs = after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime, None
    if use_perf:
        counts = {}
        for line in stats.read_text().splitlines():
            fields = line.split(",")
            if len(fields) > 2 and fields[2] in PERF_EVENTS:
                counts[fields[2]] = float(fields[0]) if fields[0].replace(".", "", 1).isdigit() else 0.0
        cpu, programs = counts["task-clock"] / 1000.0, int(counts["sched:sched_process_exec"])
        stats.unlink()
    tests = [json.loads(x) for x in per_test.read_text().splitlines()] if per_test.exists() else []
    if top:
        rows = sorted(tests, key=lambda r: -r["cpu_s"])
        sys.stderr.write("".join(f"  {r['cpu_s']:8.1f} s  {r['test']}\n" for r in rows[:top]))
    if per_file and tests:
        sys.stderr.write(f"\n{path}, per file:\n\n{by_file(tests, cpu)}\n")
    per_test.unlink(missing_ok=True)
    steps = training_steps(basetemp)
    if proc.returncode == 0:
        shutil.rmtree(basetemp, ignore_errors=True)
    else:
        sys.stderr.write(f"{path}: failed; its files are kept in {basetemp}\n")
    return Cost(path, outcome(proc.stdout.strip()), cpu, programs, steps, wall)


def main() -> None:
    argv = sys.argv[1:]
    split = argv.index("--") if "--" in argv else len(argv)
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("paths", nargs="+", help="test folders or files, one pytest run each ('A B': one run of both)")
    parser.add_argument("--top", type=int, default=0, help="list the N tests of each path that used the most CPU")
    parser.add_argument("--by-file", action="store_true", help="a table of each path's test files' CPU and wall s")
    args = parser.parse_args(argv[:split])
    use_perf = perf_usable()
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    print("| path | tests | CPU s | programs started | training steps | wall s |")
    print("|---|---|---|---|---|---|")
    costs = []
    for path in args.paths:
        costs.append(measure(path, argv[split + 1:], use_perf, args.top, args.by_file))
        print(costs[-1].row(), flush=True)
    if len(costs) > 1:
        programs = None if not use_perf else sum(c.programs or 0 for c in costs)
        print(Cost("total", "", sum(c.cpu_s for c in costs), programs, sum(c.steps for c in costs),
                   sum(c.wall_s for c in costs)).row())


if __name__ == "__main__":
    main()
