"""Turn SIGUSR1/SIGUSR2/SIGTERM into a flag the training loop checks at step boundaries.

A signal handler must not save a checkpoint itself: ZeRO saves are collectives, so every rank
has to reach the save together. The loop all-reduces the flag each step and saves on all ranks.

The handler is installed before anything else a rank does (ldmscale/train.py, first line): a notice during the
imports, the engine build, a universal conversion or the restore sets the flag instead of killing the rank, and
the loop then exits for requeue before its first step. Child processes (a converter, compiler workers) are
started with the signals blocked and ignore them (`child_ignores_preemption`, `blocked`): Slurm signals every
process of the step, and only the trainer decides what a notice means.
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from types import FrameType

PREEMPT_SIGNALS = (signal.SIGUSR1, signal.SIGUSR2, signal.SIGTERM)

_requested = threading.Event()
_received: list[int] = []


def _handler(signum: int, frame: FrameType | None) -> None:
    _received.append(signum)
    _requested.set()


def install() -> None:
    """Install the handlers (main thread only; later calls re-install over anything set since)."""
    if threading.current_thread() is not threading.main_thread():
        return
    for sig in PREEMPT_SIGNALS:
        signal.signal(sig, _handler)


def installed() -> bool:
    return all(signal.getsignal(sig) is _handler for sig in PREEMPT_SIGNALS)


def request() -> None:
    """Ask for a checkpoint-and-stop from code (a launcher's checkpoint hook, a test)."""
    _requested.set()


def requested() -> bool:
    return _requested.is_set()


def received() -> list[str]:
    return [signal.Signals(s).name for s in _received]


def clear() -> None:
    _requested.clear()
    _received.clear()


@contextmanager
def blocked() -> Iterator[None]:
    """Block the preemption signals in this thread while child processes start: a child inherits the mask across
    fork and exec, so a signal sent before it could ignore them stays pending instead of killing it (and a child
    that never unblocks never receives one). Signals sent to this process meanwhile arrive when the block ends."""
    old = signal.pthread_sigmask(signal.SIG_BLOCK, PREEMPT_SIGNALS)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)


# `python -c CHILD_PRELUDE module args...` runs `python -m module args...` ignoring the preemption signals
# (ignored dispositions survive fork and exec, so its own worker pools ignore them too)
CHILD_PRELUDE = (
    "import runpy, signal, sys\n"
    "for s in (signal.SIGUSR1, signal.SIGUSR2, signal.SIGTERM): signal.signal(s, signal.SIG_IGN)\n"
    "signal.pthread_sigmask(signal.SIG_UNBLOCK, (signal.SIGUSR1, signal.SIGUSR2, signal.SIGTERM))\n"
    "module = sys.argv[1]\n"
    "sys.argv = [module] + sys.argv[2:]\n"
    "runpy.run_module(module, run_name='__main__', alter_sys=True)\n"
)


def child_ignores_preemption(python: str, module: str, args: list[str]) -> list[str]:
    """The command line of `python -m module args` in a child that SIGUSR1/USR2/TERM do not kill; start it inside
    `blocked()` so no signal lands before it ignores them."""
    return [python, "-c", CHILD_PRELUDE, module, *args]


def start_compile_workers() -> None:
    """Start inductor's compile workers (a sidecar process and its pool) now, with the preemption signals
    blocked: they inherit the mask and never unblock it, so the notices Slurm sends every process of the step
    cannot kill them mid-compile. Later compiles reuse this pool. A no-op when inductor compiles in-process."""
    from torch._inductor.async_compile import AsyncCompile

    with blocked():
        AsyncCompile.warm_pool()
