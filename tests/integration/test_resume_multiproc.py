"""Resume at scale with real DeepSpeed processes: every rank's own data position (faults on one rank only), and
elastic resume on another number of ranks (2 -> 1 under ZeRO-2, 1 -> 2 under ZeRO-3) where every sample of the
interrupted epoch is seen exactly once."""

from __future__ import annotations

import io
import shutil
import subprocess
import sys
import tarfile
from collections import Counter
from pathlib import Path

import pytest

from ldmscale.config import load_config
from ldmscale.data import ResumableLoader, expand_shard_urls, source_shards
from tests.conftest import REPO, free_port, tiny_overrides, train_env
from tests.integration.test_multiproc import _keys, _steps, kill_after_step

TINY = REPO / "configs/tiny.yaml"


def _launch(assets: Path, out: Path, nproc: int, extra: dict[str, object]) -> subprocess.Popen:
    args = ["--config", str(TINY), "--resume", "auto", *tiny_overrides(assets, out, **{
        "train.log_sample_keys": "true", "train.sample_every": 0, **extra})]
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", f"--master_port={free_port()}",
           "-m", "ldmscale.train", *args]
    log = open(out.parent / f"{out.name}.log", "a")
    return subprocess.Popen(cmd, env=train_env(), stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                            cwd=REPO)


def _finish(proc: subprocess.Popen, out: Path) -> str:
    rc = proc.wait(timeout=400)
    text = (out.parent / f"{out.name}.log").read_text()
    assert rc == 0, text[-3000:]
    return text


def _corrupt_every_fifth_jpeg(tar_path: Path) -> None:
    with tarfile.open(tar_path) as tar:
        members = [(m, tar.extractfile(m).read()) for m in tar.getmembers() if m.isfile()]  # type: ignore[union-attr]
    jpgs = [m.name for m, _ in members if m.name.endswith(".jpg")]
    bad = set(jpgs[::5])
    with tarfile.open(tar_path, "w") as tar:
        for m, data in members:
            payload = b"\xff\xd8 not a jpeg" if m.name in bad else data
            m.size = len(payload)
            tar.addfile(m, io.BytesIO(payload))


def test_faults_on_one_rank_resume_with_that_ranks_own_position(assets: Path, tmp_path: Path) -> None:
    """1 in 5 JPEGs corrupt in rank 1's shards only; kill -9 after step 8, resume to 16 (one epoch of 20 steps):
    every rank's keys, and the losses, are those of the run that was never killed."""
    data = tmp_path / "digits"
    shutil.copytree(assets / "digits/train", data)
    extra: dict[str, object] = {"data.shards": f"[{data}]", "data.samples_per_epoch": 160, "train.max_steps": 16,
                                "train.ckpt_every": 4, "train.keep_last": 1}
    cfg = load_config(TINY, tiny_overrides(assets, tmp_path / "x", **extra))
    urls = expand_shard_urls(cfg.data.shards)
    for i in source_shards(len(urls), cfg.train.seed, 0, (1, 2, 0, max(1, cfg.data.num_workers))):
        _corrupt_every_fifth_jpeg(Path(urls[i]))
    reference, killed = tmp_path / "reference", tmp_path / "killed"
    ref = _launch(assets, reference, 2, extra)
    proc = _launch(assets, killed, 2, extra)  # the two runs share the two cores
    kill_after_step(proc, killed, 9)
    _finish(ref, reference)
    text = _finish(_launch(assets, killed, 2, extra), killed)
    assert "rank 1 data resume:" in text and "rank 0 data resume:" in text
    ref_log = {r["step"]: r for r in _steps(reference)}
    assert ref_log[16].get("data/dropped_decode_error", 0) > 0  # the faults were met, and summed over ranks
    for rank in range(2):
        assert _keys(killed, rank) == _keys(reference, rank), rank
    resumed = {r["step"]: r["loss"] for r in _steps(killed)}
    assert resumed == {s: r["loss"] for s, r in ref_log.items()}


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


@pytest.mark.parametrize(("before", "after", "zero"), [(2, 1, 2), (1, 2, 3)], ids=["2to1-zero2", "1to2-zero3"])
def test_elastic_resume_sees_the_rest_of_the_epoch_once(assets: Path, tmp_path: Path, before: int, after: int,
                                                        zero: int) -> None:
    """8 steps an epoch; 4 on `before` ranks, then `after` ranks resume to the epoch's end: every key of the
    epoch of an uninterrupted `before`-rank run exactly once, a universal checkpoint made once, finite losses."""
    extra: dict[str, object] = {"deepspeed.zero_stage": zero, "train.ckpt_every": 4, "train.max_steps": 4}
    out = tmp_path / "run"
    _finish(_launch(assets, out, before, extra), out)
    text = _finish(_launch(assets, out, after, {**extra, "train.max_steps": 8}), out)
    line = f"resuming a {before}-rank checkpoint on {after} ranks: converting ("
    assert line in text and "epoch 0 continues with 32 samples left" in text, text[-3000:]
    assert (out / "checkpoints" / "step_00000004_universal" / "COMPLETE").exists()
    seen: Counter[str] = Counter()
    for rank in range(max(before, after)):
        for step, keys in _keys(out, rank).items():
            seen.update(keys if step <= 8 else [])
    assert seen == _epoch_keys(assets, before, extra) and set(seen.values()) == {1}
    losses = {r["step"]: r["loss"] for r in _steps(out)}
    assert sorted(losses) == list(range(1, 9)) and all(0 < v < 10 for v in losses.values())
