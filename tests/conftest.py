"""Shared fixtures: real digit shards and offline model folders, written once per test session.

The folder is the tier: tests/unit/ (in-process: no child process, server or second rank), tests/integration/
(several DeepSpeed processes, CLIs in child processes), tests/system/ (the local Ceph S3 server and Slurm cluster).
`tools/run_tests.sh unit` runs one tier."""

from __future__ import annotations

import os
import shutil
import socket
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SAMPLE_CLI = [sys.executable, "-m", "ldmscale.inference.sample"]  # ldmscale-sample in a child process
os.environ["HF_HUB_OFFLINE"] = "1"  # an accidental hub call fails fast instead of hanging
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(REPO / ".cache" / "torch_extensions"))

pytest_plugins = [
    p for p in ("tests.s3_fixtures", "tests.slurm_fixtures") if (REPO / (p.replace(".", "/") + ".py")).exists()
]


@pytest.fixture(scope="session")
def _single_rank_group() -> Iterator[dict[str, str]]:
    """One process group of world size 1, made once per session: DeepSpeed keeps its own handles on the groups it
    saw, so a group destroyed and made again breaks the next engine. Yields the variables its rendezvous set."""
    saved = dict(os.environ)
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        os.environ.pop(var, None)
    from ldmscale.runtime import dist  # not at the top: importing DeepSpeed would slow every test's start

    dist.init_distributed()
    rendezvous = {k: v for k, v in os.environ.items() if saved.get(k) != v}
    os.environ.clear()
    os.environ.update(saved)
    yield rendezvous
    dist.cleanup()


@pytest.fixture(scope="module")
def single_rank_group(_single_rank_group: dict[str, str]) -> Iterator[None]:
    """The session's world-size-1 group, with its rendezvous variables set (DeepSpeed reads them) only while the
    module that asked for it runs: left set, they would reach later tests' child processes (torchrun, sbatch)."""
    saved = dict(os.environ)
    os.environ.update(_single_rank_group)
    yield
    os.environ.clear()
    os.environ.update(saved)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def written_once(tmp_path_factory: pytest.TempPathFactory, name: str, write: Callable[[Path], None]) -> Path:
    """The folder `name` of this test run, written by `write(folder)` once per run: pytest-xdist's workers share the
    run's temporary folder (the parent of each worker's own), and the first to take the lock writes it while the
    others wait, instead of each writing the same files. Read-only for the tests (copy what a test changes)."""
    from filelock import FileLock  # torch's own dependency

    run_root = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        run_root = run_root.parent
    root, done = run_root / name, run_root / f"{name}.complete"
    with FileLock(str(run_root / f"{name}.lock")):
        if not done.exists():  # a worker that died half-way leaves no marker: write it again from scratch
            shutil.rmtree(root, ignore_errors=True)
            root.mkdir(parents=True)
            write(root)
            done.touch()
    return root


@pytest.fixture(scope="session")
def assets(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """digits/train, digits/heldout (LAION layout) and models/{vae,text_encoder,tokenizer} (random init), written
    in-process as tools/make_digit_shards.py and tools/make_offline_models.py write them, once per test run
    (written_once: ~2 CPU s and an sklearn import per worker saved)."""

    def write(root: Path) -> None:
        from ldmscale.demo.digits import write_digit_shards
        from ldmscale.models.offline import captions_from_shards, write_offline_models

        written = write_digit_shards(root / "digits", samples_per_shard=200)
        write_offline_models(list(captions_from_shards(written["train"])), root / "models")

    return written_once(tmp_path_factory, "assets", write)


def tiny_overrides(assets: Path, out_dir: Path, **extra: object) -> list[str]:
    """Overrides that point configs/tiny.yaml at the session's assets."""
    items = {
        "train.out_dir": str(out_dir),
        "data.shards": f"[{assets / 'digits/train'}]",
        "model.vae": str(assets / "models/vae"),
        "model.text_encoder": str(assets / "models/text_encoder"),
        "model.tokenizer": str(assets / "models/tokenizer"),
    }
    items.update({k: str(v) for k, v in extra.items()})
    return [f"{k}={v}" for k, v in items.items()]


def train_env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}


def pytest_collection_finish(session: pytest.Session) -> None:
    """Freeze what collecting imported (torch, DeepSpeed, diffusers: ~800,000 objects) into the garbage collector's
    permanent generation, as the trainer does after its imports (ldmscale/runtime/startup.py): each later full
    collection of the run then skips them instead of rescanning them."""
    import gc

    gc.freeze()
