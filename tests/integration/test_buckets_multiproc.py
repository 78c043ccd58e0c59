"""Aspect-bucket batches with real DeepSpeed processes: 2 ranks killed with -9 and resumed give every rank the keys
of a run that was never killed (the loader's own sequence, computed in this process: one training run, not two),
and every logged micro-batch holds one shape."""

from __future__ import annotations

import io
import subprocess
import tarfile
from pathlib import Path

import numpy as np
from PIL import Image

from ldmscale.config import load_config
from ldmscale.data import ResumableLoader
from ldmscale.data.shard_writer import ShardSample, write_laion_shards
from tests.conftest import tiny_overrides
from tests.runs import TINY, finish, kill_after_step, sample_keys, start_training

SIZES = [(48, 24), (32, 32), (24, 48)]  # (width, height): wide, square, tall


def _aspect_shards(root: Path) -> dict[str, tuple[int, int]]:
    rng = np.random.default_rng(0)
    samples = []
    for i in range(160):
        w, h = SIZES[rng.integers(0, 3)]
        samples.append(ShardSample(Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)),
                                   f"a handwritten digit {i % 10}"))
    sizes = {}
    for tar_path in write_laion_shards(samples, root, samples_per_shard=20, progress=False):
        with tarfile.open(tar_path) as tar:
            for m in tar.getmembers():
                if m.name.endswith(".jpg"):
                    sizes[m.name[:-4]] = Image.open(io.BytesIO(tar.extractfile(m).read())).size  # type: ignore[union-attr]
    return sizes


def _start(assets: Path, out: Path, extra: dict[str, object]) -> subprocess.Popen:
    return start_training(assets, out, "torchrun", 2, **{"train.log_sample_keys": "true", "train.sample_every": 0,
                                                         **extra})


def _uninterrupted_keys(assets: Path, extra: dict[str, object], steps: int) -> list[dict[int, list[str]]]:
    """Each rank's keys per step (one micro-batch a step) of a run never killed, from the loader itself."""
    cfg = load_config(TINY, tiny_overrides(assets, Path("unused"), **extra))
    out = []
    for rank in range(2):
        loader = ResumableLoader(cfg.data, None, seed=cfg.train.seed, rank=rank, world=2,
                                 micro_batch=cfg.train.micro_batch_size, samples_per_epoch=cfg.data.samples_per_epoch,
                                 global_batch=cfg.train.global_batch_size)
        out.append({step: next(loader)["keys"] for step in range(1, steps + 1)})
    return out


def test_bucketed_kill_and_resume_gives_the_same_keys(assets: Path, tmp_path: Path) -> None:
    sizes = _aspect_shards(tmp_path / "aspects")
    extra: dict[str, object] = {"data.shards": f"[{tmp_path / 'aspects'}]", "data.samples_per_epoch": 80,
                                "data.buckets.enabled": "true", "data.buckets.step": 8, "data.center_crop": "false",
                                "model.size_conditioning": "true", "train.max_steps": 12, "train.ckpt_every": 4,
                                "train.keep_last": 1}
    killed = tmp_path / "killed"
    # after the step-8 checkpoint, in epoch 0's read-ahead (10 steps an epoch): the resumed run crosses into epoch 1
    kill_after_step(_start(assets, killed, extra), killed, 9)
    text = finish(_start(assets, killed, extra), killed)
    reference = _uninterrupted_keys(assets, extra, 12)
    assert "rank 1 data resume:" in text
    for rank in range(2):
        keys = sample_keys(killed, rank)
        assert keys == reference[rank], rank
        assert sorted(keys) == list(range(1, 13))
        for step_keys in keys.values():  # micro-batches of 4, each of one shape
            assert all(len({sizes[k] for k in step_keys[i : i + 4]}) == 1 for i in range(0, len(step_keys), 4))
