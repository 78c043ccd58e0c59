"""DataLoader worker processes that survive the cluster's preemption signals.

slurmstepd delivers srun-forwarded and `--signal` signals (SIGUSR1/SIGUSR2/SIGTERM) to every process of the
step, loader workers included. The trainer's main process turns them into a checkpoint (ldmscale.runtime.preemption);
a worker must not die of them, or the main process fails with "DataLoader worker killed by signal" before it
can save. Forked workers (the CPU default) inherit the trainer's handler, spawned ones (the CUDA default, as
fork after CUDA init is unsafe) start with the default action, which terminates. So every worker ignores them,
and the signals stay blocked while the workers start, so none lands before the worker ignores it.
"""

from __future__ import annotations

import atexit
import functools
import multiprocessing
import signal
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from multiprocessing import resource_tracker
from typing import Any, Literal

import torch

from ldmscale.runtime.preemption import PREEMPT_SIGNALS

StartMethod = Literal["auto", "fork", "spawn"]


def resolve_start_method(method: str, device_type: str | None = None) -> str:
    """auto: spawn on CUDA (forking a process that initialised CUDA is unsafe), fork on CPU (starts faster)."""
    if method != "auto":
        return method
    cuda = torch.cuda.is_available() if device_type is None else device_type == "cuda"
    return "spawn" if cuda else "fork"


def _ignore_preemption_signals(then: Callable[[int], None] | None, worker_id: int) -> None:
    for sig in PREEMPT_SIGNALS:
        signal.signal(sig, signal.SIG_IGN)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, PREEMPT_SIGNALS)  # what arrived while blocked is now discarded
    if then is not None:
        then(worker_id)


def worker_init(then: Callable[[int], None] | None = None) -> Callable[[int], None]:
    """A picklable worker_init_fn (spawn pickles it) that ignores the preemption signals, then calls `then`."""
    return functools.partial(_ignore_preemption_signals, then)


@contextmanager
def preemption_signals_blocked(start_method: str) -> Iterator[None]:
    """Block the preemption signals in this thread while worker processes start: children inherit the mask
    (across fork and the exec of spawn), so a signal sent before a worker ran worker_init waits instead of
    killing it. Signals sent to this process meanwhile are delivered when the block ends."""
    old = signal.pthread_sigmask(signal.SIG_BLOCK, PREEMPT_SIGNALS)
    try:
        if start_method != "fork":
            # Spawn needs Python's resource tracker, a process of its own that slurmstepd signals too: started
            # under the block it keeps SIGUSR1/2 blocked for life (it ignores SIGINT/SIGTERM itself). Starting
            # it unblocks SIGINT/SIGTERM here, so block again.
            resource_tracker.ensure_running()
            signal.pthread_sigmask(signal.SIG_BLOCK, PREEMPT_SIGNALS)
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)


def _kill_workers_left_at_exit() -> None:
    """At interpreter exit multiprocessing terminates daemonic children with SIGTERM, then joins them: workers
    that ignore SIGTERM would hang the exit. This runs first (atexit is last-in, first-out) and kills them."""
    for child in multiprocessing.active_children():
        if child.daemon:
            child.kill()


def loader_options(start_method: str, pin_memory: bool | None = None,
                   then: Callable[[int], None] | None = None) -> dict[str, Any]:
    """DataLoader keyword arguments for worker processes: start method, signal-proof init, pinned batches
    (default: when CUDA is there to receive them). Start the workers inside preemption_signals_blocked."""
    atexit.unregister(_kill_workers_left_at_exit)  # registered once, after multiprocessing's own exit hook
    atexit.register(_kill_workers_left_at_exit)
    return {
        "multiprocessing_context": resolve_start_method(start_method),
        "worker_init_fn": worker_init(then),
        "pin_memory": torch.cuda.is_available() if pin_memory is None else pin_memory,
    }
