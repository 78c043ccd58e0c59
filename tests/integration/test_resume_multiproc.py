"""Elastic resume with real DeepSpeed processes: on another number of ranks (2 -> 1 under ZeRO-2, 1 -> 2 under
ZeRO-3) every sample of the interrupted epoch is seen exactly once. (Every rank resuming its own data position, with
faults on one rank only: tests/integration/test_multiproc.py.)"""

from __future__ import annotations

import subprocess
from collections import Counter
from pathlib import Path

import pytest

from ldmscale.config import load_config
from ldmscale.data import ResumableLoader
from tests.conftest import tiny_overrides
from tests.runs import TINY, finish, log_file, sample_keys, start_training, step_rows


def _start(assets: Path, out: Path, nproc: int, extra: dict[str, object]) -> subprocess.Popen:
    """A torchrun run of `nproc` ranks (one rank: a plain process), resumed from `out` if it holds a checkpoint."""
    return start_training(assets, out, "torchrun" if nproc > 1 else "python", nproc, **{
        "train.log_sample_keys": "true", "train.sample_every": 0, **extra})


def _run(assets: Path, out: Path, nproc: int, extra: dict[str, object]) -> str:
    """_start's run to its end; its output."""
    return finish(_start(assets, out, nproc, extra), out)


def _epoch_keys(assets: Path, world: int, extra: dict[str, object]) -> Counter[str]:
    """The keys an uninterrupted run at `world` ranks sees in epoch 0, from the loader itself."""
    cfg = load_config(TINY, tiny_overrides(assets, Path("unused"), **extra))
    keys: Counter[str] = Counter()
    for rank in range(world):
        loader = ResumableLoader(cfg.data, None, seed=cfg.train.seed, rank=rank, world=world,
                                 micro_batch=cfg.train.micro_batch_size, samples_per_epoch=cfg.data.samples_per_epoch,
                                 global_batch=cfg.train.global_batch_size)
        for _ in range(loader.batches_per_epoch):
            keys.update(next(loader)["keys"])
    return keys


@pytest.mark.parametrize(("before", "after", "zero", "micro"), [(2, 1, 2, 8), (1, 2, 3, 4)],
                         ids=["2to1-zero2-micro4to8", "1to2-zero3"])
def test_elastic_resume_sees_the_rest_of_the_epoch_once(assets: Path, tmp_path: Path, before: int, after: int,
                                                        zero: int, micro: int) -> None:
    """8 steps an epoch (global batch 8); 4 on `before` ranks x micro-batch 4, then `after` ranks x `micro` resume to
    the epoch's end: every key of the epoch of an uninterrupted `before`-rank run exactly once, a universal checkpoint
    made once, finite losses. Then (2to1) a resume over a shard list with one shard less is refused on every rank,
    before any model is built."""
    extra: dict[str, object] = {"deepspeed.zero_stage": zero, "train.ckpt_every": 4, "train.max_steps": 4}
    out = tmp_path / "run"
    _run(assets, out, before, extra)
    text = _run(assets, out, after, {**extra, "train.max_steps": 8, "train.micro_batch_size": micro})
    line = f"resuming a {before}-rank checkpoint on {after} ranks: converted in "
    assert line in text and "epoch 0 continues with 32 samples left" in text, text[-3000:]
    assert (out / "checkpoints" / "step_00000004_universal" / "COMPLETE").exists()
    seen: Counter[str] = Counter()
    for rank in range(max(before, after)):
        for step, keys in sample_keys(out, rank).items():
            seen.update(keys if step <= 8 else [])
    assert seen == _epoch_keys(assets, before, extra) and set(seen.values()) == {1}
    losses = {r["step"]: r["loss"] for r in step_rows(out)}
    assert sorted(losses) == list(range(1, 9)) and all(0 < v < 10 for v in losses.values())
    if before != 2:
        return
    shards = sorted((assets / "digits/train").glob("*.tar"))
    refused = log_file(out)
    mark = refused.stat().st_size
    fewer = f"[{','.join(map(str, shards[1:]))}]"
    proc = _start(assets, out, 2, {**extra, "train.max_steps": 12, "data.shards": fewer})
    assert proc.wait(timeout=400) != 0
    text = refused.read_bytes()[mark:].decode()
    lines = [ln for ln in text.splitlines() if "resume error: data.shards lists other shards than when the checkpoint "
             "was saved (0 shard(s) added and 1 removed)" in ln]
    assert len(lines) == 2 and "on_shard_list_change=new_epoch" in lines[0], text[-3000:]  # every rank, one line
    # before the conversion and the engine; no traceback of ours (torchrun prints its own for the failed children)
    assert "converting" not in text and "ldmscale: stage=" not in text and "ldmscale/" not in text, text[-3000:]
