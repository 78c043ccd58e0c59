"""Training from latent shards in child processes: the run from latents matches the run from their image shards.
(A mismatched latent set stopping ldmscale-train with exit 2: tests/unit/test_latents.py.)"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO, tiny_overrides, train_env
from tests.unit.test_latents import copy_shard_head, encode_cfg, run_encode


@pytest.fixture(scope="module")
def encoded(assets: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """The first 64 samples of two digit shards, as images and encoded: the runs below draw 48 samples (6 steps of
    8 from a 64-sample epoch), so both read the same few samples, and only those are encoded."""
    root = tmp_path_factory.mktemp("latents")
    images = root / "images"
    images.mkdir()
    for tar in sorted((assets / "digits/train").glob("*.tar"))[:2]:
        copy_shard_head(tar, images / tar.name, 64)
    cfg = encode_cfg(assets, images)
    out = root / "set"
    return {"out": out, "images": images, "res": run_encode(cfg, out, dtype="fp32", batch_size=32), "cfg": cfg}


def _train(assets: Path, out: Path, shards: Path, steps: int, *extra: str) -> list[dict]:
    args = ["--config", str(REPO / "configs/tiny.yaml"), "--resume", "never", *tiny_overrides(assets, out, **{
        "data.shards": f"[{shards}]", "train.max_steps": steps, "train.log_every": 1, "train.ckpt_every": 1000,
        "train.log_sample_keys": "true"}), *extra]
    r = subprocess.run([sys.executable, "-m", "ldmscale.train", *args], env=train_env(), capture_output=True,
                       text=True, timeout=400, cwd=REPO)
    assert r.returncode == 0, r.stderr[-3000:]
    keys = [json.loads(x) for x in (out / "sample_keys/rank00000.jsonl").read_text().splitlines()]
    losses = {json.loads(x)["step"]: json.loads(x)["loss"] for x in (out / "log.jsonl").read_text().splitlines()
              if '"loss"' in x}
    return [{"step": k["step"], "keys": k["keys"], "loss": losses[k["step"]]} for k in keys]


def test_run_from_latent_shards_matches_the_run_from_their_image_shards(encoded: dict, assets: Path,
                                                                        tmp_path: Path) -> None:
    """Same seed, same sample ids, same posterior noise: the loss curve agrees to float tolerance, for moments
    stored in fp32 (only the batch composition of the VAE forward differs) and in fp16."""
    fp16 = tmp_path / "fp16"
    run_encode(encoded["cfg"], fp16, dtype="fp16", batch_size=50)
    steps = 6
    images = _train(assets, tmp_path / "images", encoded["images"], steps)
    for shards, rtol in ((encoded["out"], 1e-5), (fp16, 1e-4)):
        latents = _train(assets, tmp_path / shards.name, shards, steps, "data.format=latents")
        assert [r["keys"] for r in latents] == [r["keys"] for r in images]  # the same samples in the same order
        for a, b in zip(latents, images):
            assert a["loss"] == pytest.approx(b["loss"], rel=rtol), (shards.name, a["step"])
    assert len({r["loss"] for r in images}) == steps  # the curve moves: agreement is not trivial
