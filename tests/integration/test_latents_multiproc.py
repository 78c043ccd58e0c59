"""Two processes: ldmscale-encode killed with SIGKILL mid-run and started again completes the latent set without
rewriting a finished shard; the trainer reading those latent shards, resumed from a mid-run checkpoint, reproduces
its uninterrupted run bitwise (losses and every rank's sample keys)."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from ldmscale.data import decode_image, normalize_pixels, stack_uint8
from ldmscale.data.latent_format import LATENT_EXT, decode_latent
from ldmscale.data.shard_writer import iter_tar_samples
from tests.conftest import REPO, free_port, tiny_overrides, train_env
from tests.runs import (
    finish,
    kill_tree,
    last_per_step,
    sample_keys,
    start_training,
    step_rows,
    wait_for_checkpoint,
)

MAX_STEPS = 6
RESUME_AT = 3  # checkpoints at 3 and 6: the resumed run trains three steps


def encode_command(assets: Path, out: str, shards: str, *extra: str) -> list[str]:
    """ldmscale-encode on 2 ranks under torchrun (no process group: each rank takes its share of the shards)."""
    return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={free_port()}",
            "-m", "ldmscale.latents.encode", "--config", str(REPO / "configs/tiny.yaml"), "--out", out,
            "--batch-size", "8", "--no-progress", *tiny_overrides(assets, Path("unused"), **{"data.shards": shards}),
            *extra]


def _popen(cmd: list[str], log: Path, env: dict | None = None) -> subprocess.Popen:
    return subprocess.Popen(cmd, env=env or train_env(), stdout=open(log, "a"), stderr=subprocess.STDOUT,
                            start_new_session=True, cwd=REPO)


@pytest.fixture(scope="module")
def latent_set(assets: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    root = tmp_path_factory.mktemp("encode")
    out, log = root / "latents", root / "encode.log"
    cmd = encode_command(assets, str(out), f"[{assets / 'digits/train'}]")
    proc = _popen(cmd, log)
    deadline = time.time() + 300
    while time.time() < deadline and not list(out.glob("*_stats.json")):
        assert proc.poll() is None, log.read_text()[-3000:]
        time.sleep(0.05)
    kill_tree(proc.pid)  # both ranks and their loader workers, mid-shard
    proc.wait()
    assert not (out / "manifest.json").exists(), "the encoder finished before it could be killed"
    done = {p.name[: -len("_stats.json")] for p in out.glob("*_stats.json")}
    mtimes = {n: (out / f"{n}.tar").stat().st_mtime_ns for n in done}
    finish(_popen(cmd, log), root / "encode")
    return {"out": out, "done_before_kill": done, "mtimes": mtimes, "log": log.read_text()}


def test_encoder_killed_and_restarted_completes_without_rewriting_finished_shards(latent_set: dict,
                                                                                  assets: Path) -> None:
    from ldmscale.config import load_config
    from ldmscale.models.encoders import load_vae

    out = latent_set["out"]
    assert 0 < len(latent_set["done_before_kill"]) < 8
    for name, mtime in latent_set["mtimes"].items():
        assert (out / f"{name}.tar").stat().st_mtime_ns == mtime  # skipped, not rewritten
    skipped = sum(int(x.split("skipped ")[1].split()[0]) for x in latent_set["log"].splitlines() if "skipped " in x)
    assert skipped == len(latent_set["done_before_kill"])
    sources = sorted((assets / "digits/train").glob("*.tar"))
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["counts"]["samples"] == sum(len(list(iter_tar_samples(p))) for p in sources)
    for src in sources:  # every shard whole, the same samples in the same order
        assert [s["__key__"] for s in iter_tar_samples(out / src.name)] == [s["__key__"] for s in iter_tar_samples(src)]
    cfg = load_config(REPO / "configs/tiny.yaml", tiny_overrides(assets, Path("unused")))
    vae = load_vae(cfg.model).eval()
    want = list(iter_tar_samples(sources[-1]))[:8]
    with torch.no_grad():
        post = vae.encode(normalize_pixels(stack_uint8([decode_image(w["jpg"], 32, True) for w in want]))).latent_dist
    stored = list(iter_tar_samples(out / sources[-1].name))[:8]
    got = torch.stack([decode_latent(s[LATENT_EXT])["moments"] for s in stored])
    torch.testing.assert_close(got, torch.cat([post.mean, post.logvar], 1), rtol=2e-3, atol=2e-3)  # fp16 storage


def _train(assets: Path, shards: Path, out: Path, resume: str = "never") -> subprocess.Popen:
    return start_training(assets, out, "torchrun", resume=resume, **{
        "data.shards": f"[{shards}]", "data.format": "latents", "train.max_steps": MAX_STEPS,
        "train.ckpt_every": RESUME_AT, "train.keep_last": 3, "train.log_sample_keys": "true"})


def test_trainer_from_latents_resumed_matches_the_uninterrupted_run(latent_set: dict, assets: Path,
                                                                     tmp_path: Path) -> None:
    reference, resumed = tmp_path / "reference", tmp_path / "resumed"
    ref = _train(assets, latent_set["out"], reference)
    checkpoint = wait_for_checkpoint(ref, reference, RESUME_AT)  # the resumed run goes on beside the reference
    res = _train(assets, latent_set["out"], resumed, resume=str(checkpoint))
    finish(ref, reference)
    finish(res, resumed)
    events = [r.get("event", "") for r in map(json.loads, (resumed / "log.jsonl").read_text().splitlines())]
    assert sum(e.startswith(f"resumed from {checkpoint}") for e in events) == 1
    ref_loss, res_loss = last_per_step(step_rows(reference), "loss"), last_per_step(step_rows(resumed), "loss")
    assert sorted(ref_loss) == list(range(1, MAX_STEPS + 1))
    assert res_loss == {s: v for s, v in ref_loss.items() if s > RESUME_AT}  # bitwise
    for rank in range(2):
        assert sample_keys(resumed, rank) == {s: k for s, k in sample_keys(reference, rank).items() if s > RESUME_AT}
