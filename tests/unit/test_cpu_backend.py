"""DeepSpeed on CPU ranks: its shared-memory all-reduce op is marked unavailable (it would JIT-compile on every rank),
without probing every op builder's compatibility (a compile and link of test programs on every rank's start)."""

from __future__ import annotations

import deepspeed.ops
import pytest
from deepspeed.comm.torch import build_shm_op

from ldmscale.runtime.dist import _skip_cpu_shm_op


def test_the_shm_op_is_skipped_without_probing_the_op_builders(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delitem(vars(deepspeed.ops), "__compatible_ops__", raising=False)  # as in a rank that just started

    def probe() -> dict:
        raise AssertionError("every op builder was probed (compiler runs) to mark one op unavailable")

    monkeypatch.setattr(deepspeed.ops, "_probe_compatible_ops", probe)
    _skip_cpu_shm_op()
    assert build_shm_op() is None  # what DeepSpeed's CPU backend asks at init_distributed


def test_an_earlier_probe_is_kept_and_only_the_shm_op_marked(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(vars(deepspeed.ops), "__compatible_ops__", {"deepspeed_shm_comm": True, "cpu_adam": True})
    _skip_cpu_shm_op()
    assert deepspeed.ops.__compatible_ops__ == {"deepspeed_shm_comm": False, "cpu_adam": True}
    assert build_shm_op() is None
