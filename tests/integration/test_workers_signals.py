"""Loader workers and the cluster's preemption signals: slurmstepd signals every process of the step, so a
worker (fork or spawn) must outlive SIGUSR1/SIGUSR2/SIGTERM sent to its whole process group, even one sent
while the workers are still starting, and the trainer's handler must still see the signal."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO, train_env

# Runs in a session of its own (start_new_session), so killpg(0) reaches exactly it and its workers. One process
# tries each start method in turn (the handler's record cleared between them): the imports are paid once.
PROBE = r"""
import json, os, signal, sys, threading
from ldmscale.runtime import preemption
from ldmscale.config import DataConfig
from ldmscale.data import ResumableLoader

shards, methods = sys.argv[1], sys.argv[2:]
preemption.install()
results = {}
for method in methods:
    preemption.clear()
    cfg = DataConfig(shards=[shards], resolution=16, num_workers=2, shuffle_buffer=8, start_method=method)
    loader = ResumableLoader(cfg, None, seed=0, rank=0, world=1, micro_batch=4, samples_per_epoch=64)
    # one signal of each kind while the workers start (a spawned worker imports torch for ~1 s first) ...
    timers = [threading.Timer(0.2 * (i + 1), os.killpg, (0, s)) for i, s in enumerate(preemption.PREEMPT_SIGNALS)]
    for t in timers:
        t.start()
    batches = [next(loader)]
    for t in timers:
        t.join()
    for s in preemption.PREEMPT_SIGNALS:  # ... and one of each while they work
        os.killpg(0, s)
    batches += [next(loader) for _ in range(2 * loader.batches_per_epoch)]  # through an epoch change (new workers)
    results[method] = {"batches": len(batches), "received": sorted(set(preemption.received()))}
    del loader
print(json.dumps(results))
"""
METHODS = ["spawn", "fork"]


@pytest.fixture(scope="module")
def probed(assets: Path) -> dict:
    r = subprocess.run([sys.executable, "-c", PROBE, str(assets / "digits/train"), *METHODS], env=train_env(),
                       cwd=REPO, capture_output=True, text=True, timeout=300, start_new_session=True)
    assert r.returncode == 0, r.stderr[-3000:]
    return json.loads(r.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("method", METHODS)
def test_workers_survive_preemption_signals_to_the_process_group(probed: dict, method: str) -> None:
    out = probed[method]
    assert out["batches"] == 33  # 1 + 2 epochs of 16
    assert out["received"] == ["SIGTERM", "SIGUSR1", "SIGUSR2"]
