"""A mixture with real DeepSpeed processes: the digits (1,500 samples) and a 16-sample set at 0.5/0.5. One world
checks it all: killed with SIGKILL and resumed on 2 ranks, every rank's keys are the uninterrupted run's; resumed
again on 1 rank (micro-batch 4 -> 8) to the epoch's end, every draw of the epoch is seen exactly once; the plan is
printed per source and log.jsonl carries the per-source share, samples and passes summed over ranks."""

from __future__ import annotations

import json
import subprocess
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from ldmscale.config import load_config
from ldmscale.data import ResumableLoader
from ldmscale.data.shard_writer import ShardSample, write_laion_shards
from tests.conftest import REPO, tiny_overrides
from tests.runs import finish, kill_after_step, sample_keys, start_training, step_rows

TINY = REPO / "configs/tiny.yaml"


def _launch(assets: Path, out: Path, nproc: int, extra: dict[str, object]) -> subprocess.Popen:
    """The trainer on `nproc` ranks (torchrun; one rank: a plain process), logging every rank's sample keys, with
    the one sample grid at the end."""
    launcher = "torchrun" if nproc > 1 else "python"
    return start_training(assets, out, launcher, nproc, **{"train.log_sample_keys": "true", "train.sample_every": 0,
                                                           **extra})


def _small_set(root: Path) -> Path:
    rng = np.random.default_rng(3)
    images = [Image.fromarray(rng.integers(0, 255, (16, 16, 3), dtype=np.uint8)) for _ in range(16)]
    write_laion_shards([ShardSample(im, f"a handwritten digit {i % 10}") for i, im in enumerate(images)], root,
                       samples_per_shard=8, start_key=500, progress=False)
    return root


def _uninterrupted(assets: Path, extra: dict[str, object], world: int) -> list[dict[int, list[str]]]:
    """Per rank, the keys an uninterrupted `world`-rank run logs at each step of epoch 0, from the loader itself."""
    cfg = load_config(TINY, tiny_overrides(assets, Path("unused"), **extra))
    t = cfg.train
    runs = []
    for rank in range(world):
        loader = ResumableLoader(cfg.data, None, seed=t.seed, rank=rank, world=world, micro_batch=t.micro_batch_size,
                                 samples_per_epoch=cfg.data.samples_per_epoch, global_batch=t.global_batch_size)
        per_step = t.global_batch_size // (world * t.micro_batch_size)
        keys = [k for _ in range(loader.batches_per_epoch) for k in next(loader)["keys"]]
        n = per_step * t.micro_batch_size
        runs.append({s + 1: keys[s * n:(s + 1) * n] for s in range(len(keys) // n)})
    return runs


def test_a_mixture_resumes_exactly_after_kill_9_and_elastically_on_fewer_ranks(assets: Path, tmp_path: Path) -> None:
    small = _small_set(tmp_path / "small")
    sources = (f"[{{name: digits, shards: [{assets / 'digits/train'}], weight: 0.5}}, "
               f"{{name: small, shards: [{small}], weight: 0.5}}]")
    extra: dict[str, object] = {"data.shards": "[]", "data.sources": sources, "data.samples_per_epoch": 128,
                                "train.ckpt_every": 4, "train.max_steps": 12, "train.log_every": 4,
                                "train.keep_last": 3}
    killed = tmp_path / "killed"
    kill_after_step(_launch(assets, killed, 2, extra), killed, 6)  # SIGKILL after step 6: step 4 was saved
    text = (tmp_path / "killed.log").read_text()
    assert "data: a mixture of 2 sources, epoch = 128 samples drawn by weight" in text
    assert "data:   small: 2 shards, 16 samples in the shards" in text and "passes an epoch" in text

    # the same world: every rank's keys, step by step, are those of the run that was never killed
    text = finish(_launch(assets, killed, 2, {**extra, "train.max_steps": 8}), killed)
    assert "rank 1 data resume:" in text and "rank 0 data resume:" in text
    reference = _uninterrupted(assets, extra, 2)
    for rank in range(2):
        got = sample_keys(killed, rank)
        assert {s: got[s] for s in range(1, 9)} == {s: reference[rank][s] for s in range(1, 9)}, rank

    # 1 rank, micro-batch 8, to the epoch's end (16 steps of 8): the epoch's draws once each
    text = finish(_launch(assets, killed, 1, {**extra, "train.max_steps": 16, "train.micro_batch_size": 8}), killed)
    assert "epoch 0 continues with 64 samples left" in text, text[-3000:]
    seen: Counter[str] = Counter()
    for rank in range(2):
        for step, keys in sample_keys(killed, rank).items():
            seen.update(keys if step <= 16 else [])
    epoch = Counter(k for run in reference for keys in run.values() for k in keys)
    assert seen == epoch
    assert sum(n for k, n in epoch.items() if k.startswith("005")) > 16  # the small set repeated

    # the accounting: the job's draws per source, summed over ranks in the step's reduction
    logged = {r["step"]: r for r in step_rows(killed)}  # the last run's rows: 1 rank, steps 9-16
    row = logged[12]
    assert row["data/digits/samples"] + row["data/small/samples"] == 12 * 8
    assert row["data/digits/share"] + row["data/small/share"] == pytest.approx(1.0)
    assert row["data/small/passes"] == pytest.approx(row["data/small/samples"] / 16)
    assert "data/small/share" not in logged[11]  # per logging window
    plans = [json.loads(line)["data_plan"] for line in (killed / "log.jsonl").read_text().splitlines()
             if "data_plan" in line]
    assert len(plans) == 3 and plans[0]["sources"]["small"]["passes_per_epoch"] == pytest.approx(0.5 * 128 / 16)
