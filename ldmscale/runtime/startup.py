"""A rank's start-up imports without the cyclic garbage collector in their way.

Before its first step a rank imports torch, DeepSpeed, diffusers and transformers: ~770,000 Python objects (classes,
functions, module dictionaries), nearly all of them alive until the process ends. While they are made, the
collector runs every few hundred allocations and its full collections rescan everything made so far; after them,
every later full collection (model build, engine build, checkpoint loads, each step's Python objects) rescans them
again. `frozen_imports` pauses the collector for the imports and then moves what they made into the permanent
generation (`gc.freeze`), which collections skip. tools/bench/startup_gc.py measures what a rank saves.

Freezing also serves the loader: forked workers share the parent's memory pages, and their collections skip the
frozen objects instead of writing to their headers, so those pages stay shared rather than copied into each worker
(the Python documentation's advice for processes that fork without exec).

The cost is that cyclic garbage made during the imports (~1.5% of their objects) is frozen too and never freed:
a few MB once per process, against the ~0.4 CPU s a `gc.collect()` over the whole import heap would take first.
"""

from __future__ import annotations

import gc
from collections.abc import Iterator
from contextlib import contextmanager


@contextmanager
def frozen_imports() -> Iterator[None]:
    """Run the block (a process's first heavy imports) with the collector paused, then freeze every object tracked
    so far and restore the collector's previous state. Nesting and repeating are harmless: each exit freezes what
    was made since."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        gc.freeze()
        if enabled:
            gc.enable()
