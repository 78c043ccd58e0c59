"""Turn SIGUSR1/SIGUSR2/SIGTERM into a flag the training loop checks at step boundaries.

A signal handler must not save a checkpoint itself: ZeRO saves are collectives, so every rank
has to reach the save together. The loop all-reduces the flag each step and saves on all ranks.
"""

from __future__ import annotations

import signal
import threading
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
