"""Aspect-bucket batches with real DeepSpeed processes: 2 ranks killed with -9 and resumed give every rank the keys
of the run that was never killed, and every logged micro-batch holds one shape."""

from __future__ import annotations

import io
import subprocess
import tarfile
from pathlib import Path

import numpy as np
from PIL import Image

from ldmscale.data.shard_writer import ShardSample, write_laion_shards
from tests.runs import finish, kill_after_step, sample_keys, start_training

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


def test_bucketed_kill_and_resume_gives_the_same_keys(assets: Path, tmp_path: Path) -> None:
    sizes = _aspect_shards(tmp_path / "aspects")
    extra: dict[str, object] = {"data.shards": f"[{tmp_path / 'aspects'}]", "data.samples_per_epoch": 80,
                                "data.buckets.enabled": "true", "data.buckets.step": 8, "data.center_crop": "false",
                                "model.size_conditioning": "true", "train.max_steps": 16, "train.ckpt_every": 4,
                                "train.keep_last": 1}
    reference, killed = tmp_path / "reference", tmp_path / "killed"
    ref = _start(assets, reference, extra)
    proc = _start(assets, killed, extra)  # the two runs share the two cores
    kill_after_step(proc, killed, 9)  # after the step-8 checkpoint, inside the read-ahead at epoch 0's end
    finish(ref, reference)
    text = finish(_start(assets, killed, extra), killed)
    assert "rank 1 data resume:" in text
    for rank in range(2):
        keys = sample_keys(killed, rank)
        assert keys == sample_keys(reference, rank), rank
        assert sorted(keys) == list(range(1, 17))
        for step_keys in keys.values():  # micro-batches of 4, each of one shape
            assert all(len({sizes[k] for k in step_keys[i : i + 4]}) == 1 for i in range(0, len(step_keys), 4))
