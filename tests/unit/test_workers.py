"""The loader workers' start method: spawn where CUDA runs, fork on the CPU. (Workers outliving the cluster's
preemption signals, in child processes: tests/integration/test_workers_signals.py.)"""

from __future__ import annotations


def test_auto_start_method_is_spawn_on_cuda_and_fork_on_cpu() -> None:
    from ldmscale.data.workers import resolve_start_method

    assert resolve_start_method("auto", "cuda") == "spawn"
    assert resolve_start_method("auto", "cpu") == "fork"
    assert resolve_start_method("spawn", "cpu") == "spawn"
