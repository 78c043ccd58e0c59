"""Shared fixtures: real digit shards and offline model folders, written once per test session."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
os.environ["HF_HUB_OFFLINE"] = "1"  # an accidental hub call fails fast instead of hanging
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(REPO / ".cache" / "torch_extensions"))

pytest_plugins = [
    p for p in ("tests.s3_fixtures", "tests.slurm_fixtures") if (REPO / (p.replace(".", "/") + ".py")).exists()
]


# The fast tier (`tools/run_tests.sh -m unit`): every test that needs no child process, server or second rank.
# Such tests carry one of these markers (or use the `assets` fixture, which runs two tool scripts); the rest are
# marked `unit` here, so a new test joins the fast tier unless it says otherwise.
SLOW_MARKERS = {"multiproc", "s3", "slurm", "subprocess"}


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        slow = any(item.get_closest_marker(m) for m in SLOW_MARKERS) or "assets" in getattr(item, "fixturenames", ())
        if not slow:
            item.add_marker(pytest.mark.unit)


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


@pytest.fixture(scope="session")
def assets(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """digits/train, digits/heldout (LAION layout) and models/{vae,text_encoder,tokenizer} (random init)."""
    root = tmp_path_factory.mktemp("assets")
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    subprocess.run([sys.executable, str(REPO / "tools/make_digit_shards.py"), "--out", str(root / "digits"),
                    "--samples-per-shard", "200"], check=True, env=env, capture_output=True)
    subprocess.run([sys.executable, str(REPO / "tools/make_offline_models.py"), "--shards",
                    str(root / "digits/train/*.tar"), "--out", str(root / "models")],
                   check=True, env=env, capture_output=True)
    return root


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
