"""A rank's start-up imports run with the garbage collector paused and end frozen (ldmscale/runtime/startup.py):
the trainer's entry point leaves the collector on, with what it imported in the permanent generation. (What that
saves: tools/bench/startup_gc.py.)"""

from __future__ import annotations

import gc
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from ldmscale.runtime.startup import frozen_imports
from tests.conftest import REPO, tiny_overrides


@pytest.fixture(autouse=True)
def collector_restored() -> Iterator[None]:
    """Each test starts with the collector on and leaves it as it found it (what a test froze stays frozen: the
    test run itself freezes what its modules imported, tests/conftest.py)."""
    enabled = gc.isenabled()
    gc.enable()
    yield
    (gc.enable if enabled else gc.disable)()


class _Node:
    def __init__(self) -> None:
        self.me = self  # a cycle: only the cyclic collector could free it


def test_the_block_runs_without_the_collector_and_its_objects_end_frozen() -> None:
    before = gc.get_freeze_count()
    with frozen_imports():
        assert not gc.isenabled()
        made = _Node()
    assert gc.isenabled()
    # frozen: in the permanent generation, in none of those the collector scans
    assert gc.get_freeze_count() > before and not any(o is made for o in gc.get_objects())
    frozen = gc.get_freeze_count()
    with frozen_imports():  # a second block freezes what was made since, on top
        again = _Node()
    assert gc.get_freeze_count() > frozen and not any(o is again for o in gc.get_objects())


def test_a_disabled_collector_stays_disabled() -> None:
    gc.disable()
    with frozen_imports():
        pass
    assert not gc.isenabled()


def test_the_collector_comes_back_when_an_import_fails() -> None:
    with pytest.raises(ImportError), frozen_imports():
        import ldmscale_no_such_module  # noqa: F401
    assert gc.isenabled()


def test_the_trainer_entry_point_freezes_its_imports_and_leaves_the_collector_on(
        monkeypatch: pytest.MonkeyPatch, assets: Path, tmp_path: Path) -> None:
    """Through `python -m ldmscale.train`'s function, up to the process-group setup (made to fail here): both
    import blocks (the command line's, then the loop's after the config is read) have run."""
    from ldmscale.runtime import dist

    class Stop(Exception):
        pass

    def stop(*args: object, **kwargs: object) -> None:
        assert gc.isenabled()  # the loop's own work runs with the collector on
        raise Stop

    monkeypatch.setattr(dist, "init_distributed", stop)
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setattr(sys, "argv", ["ldmscale-train", "--config", str(REPO / "configs/tiny.yaml"),
                                      "--resume", "never", *tiny_overrides(assets, tmp_path / "run")])
    from ldmscale.train import cli

    before = gc.get_freeze_count()
    with pytest.raises(Stop):
        cli()
    assert gc.isenabled() and gc.get_freeze_count() > before
