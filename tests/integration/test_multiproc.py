"""Two DeepSpeed processes: train, kill -9 mid-run, resume with --resume auto, and match the uninterrupted run.

Under ZeRO-2 (torchrun) and ZeRO-3 (the deepspeed launcher): the per-step losses after the resume, the
sample keys every rank saw, and the final EMA weights are bitwise those of a run that was never killed.
Then the checkpoints feed ldmscale-sample and ldmscale-export.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.conftest import REPO, SAMPLE_CLI, free_port, tiny_overrides, train_env

MAX_STEPS = 12


def _command(launcher: str, port: int, args: list[str]) -> list[str]:
    if launcher == "torchrun":
        return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={port}",
                "-m", "ldmscale.train", *args]
    return [shutil.which("deepspeed") or "deepspeed", "--num_gpus", "2", "--master_port", str(port),
            "--module", "ldmscale.train", *args]


def _start(assets: Path, out: Path, launcher: str, zero: int) -> subprocess.Popen:
    args = ["--config", str(REPO / "configs/tiny.yaml"), "--resume", "auto", *tiny_overrides(
        assets, out, **{"deepspeed.zero_stage": zero, "train.max_steps": MAX_STEPS, "train.ckpt_every": 4,
                        "train.log_sample_keys": "true", "train.keep_last": 2})]
    log = open(out.parent / f"{out.name}.log", "a")
    return subprocess.Popen(_command(launcher, free_port(), args), env=train_env(), stdout=log,
                            stderr=subprocess.STDOUT, start_new_session=True, cwd=REPO)


def _wait(proc: subprocess.Popen, out: Path, timeout: float = 400) -> None:
    try:
        rc = proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        raise
    assert rc == 0, (out.parent / f"{out.name}.log").read_text()[-3000:]


def _steps(out: Path) -> list[dict]:
    f = out / "log.jsonl"
    return [r for r in map(json.loads, f.read_text().splitlines()) if "step" in r] if f.exists() else []


def _last_per_step(records: list[dict], key: str) -> dict[int, object]:
    return {r["step"]: r[key] for r in records}  # later lines (after the resume) win


def _keys(out: Path, rank: int) -> dict[int, list[str]]:
    lines = (out / "sample_keys" / f"rank{rank:05d}.jsonl").read_text().splitlines()
    return {r["step"]: r["keys"] for r in map(json.loads, lines)}


@pytest.fixture(scope="module", params=[("torchrun", 2), ("deepspeed", 3)], ids=["zero2-torchrun", "zero3-deepspeed"])
def runs(request: pytest.FixtureRequest, assets: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    launcher, zero = request.param
    root = tmp_path_factory.mktemp(f"zero{zero}")
    reference, killed = root / "reference", root / "killed"
    _wait(_start(assets, reference, launcher, zero), reference)

    proc = _start(assets, killed, launcher, zero)
    deadline = time.time() + 400
    while time.time() < deadline and not any(r["step"] >= 6 for r in _steps(killed)):
        assert proc.poll() is None, (root / "killed.log").read_text()[-3000:]
        time.sleep(0.2)
    kill_tree(proc.pid)  # every rank and the launcher, mid-step, no chance to save
    proc.wait()
    time.sleep(1.0)
    killed_at = max(r["step"] for r in _steps(killed))
    assert killed_at < MAX_STEPS
    saved = (killed / "checkpoints" / "latest").read_text()
    _wait(_start(assets, killed, launcher, zero), killed)
    return {"reference": reference, "killed": killed, "killed_at": killed_at, "zero": zero,
            "saved_before_kill": int(saved.split("_")[1])}


def _children(pid: int) -> list[int]:
    out = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            out.append(int(stat.parent.name))
    return out


def kill_tree(pid: int) -> None:
    """SIGKILL a process and all its descendants (torchrun starts its workers in sessions of their own)."""
    todo, seen = [pid], []
    while todo:
        p = todo.pop()
        seen.append(p)
        todo += _children(p)
    for p in seen:
        try:
            os.kill(p, signal.SIGKILL)
        except ProcessLookupError:
            pass


def kill_after_step(proc: subprocess.Popen, out: Path, step: int, timeout: float = 400) -> None:
    """SIGKILL the run (every rank and the launcher) once its log shows `step`: mid-run, no chance to save."""
    deadline = time.time() + timeout
    while time.time() < deadline and not any(r["step"] >= step for r in _steps(out)):
        assert proc.poll() is None, (out.parent / f"{out.name}.log").read_text()[-3000:]
        time.sleep(0.2)
    kill_tree(proc.pid)
    proc.wait()


def test_resume_after_kill_reproduces_the_uninterrupted_run(runs: dict) -> None:
    ref, res = runs["reference"], runs["killed"]
    events = [json.loads(x).get("event", "") for x in (res / "log.jsonl").read_text().splitlines()]
    resumed = [e for e in events if e.startswith("resumed from")]
    assert len(resumed) == 1
    assert f"step_{runs['saved_before_kill']:08d}" in resumed[0]
    ref_loss, res_loss = _last_per_step(_steps(ref), "loss"), _last_per_step(_steps(res), "loss")
    assert sorted(res_loss) == list(range(1, MAX_STEPS + 1))
    assert res_loss == ref_loss  # bitwise: the floats' JSON text is identical
    for rank in range(2):
        assert _keys(res, rank) == _keys(ref, rank)  # same samples, same order, none skipped or repeated
    tag = f"step_{MAX_STEPS:08d}"
    ema_ref = load_file(ref / "checkpoints" / tag / "ema.safetensors")
    ema_res = load_file(res / "checkpoints" / tag / "ema.safetensors")
    assert ema_ref.keys() == ema_res.keys() and all(torch.equal(ema_ref[k], ema_res[k]) for k in ema_ref)


def test_checkpoints_are_complete_and_pruned(runs: dict) -> None:
    ck = runs["reference"] / "checkpoints"
    assert (ck / "latest").read_text() == f"step_{MAX_STEPS:08d}"
    tags = sorted(p.name for p in ck.glob("step_*"))
    assert tags == ["step_00000008", "step_00000012"]  # keep_last=2
    assert all((ck / t / "COMPLETE").exists() for t in tags)


def test_sample_cli_writes_pngs_and_grid(runs: dict, tmp_path: Path) -> None:
    out = tmp_path / "samples"
    cmd = [*SAMPLE_CLI, str(runs["reference"]), "--prompt", "a handwritten digit 3",
           "--prompt", "a handwritten digit 7 " + "very " * 40 + "long", "--num-images", "2", "--steps", "3",
           "--sampler", "dpmsolver++", "--out", str(out)]
    r = subprocess.run(cmd, env=train_env(), capture_output=True, text=True, timeout=300, cwd=REPO)
    assert r.returncode == 0, r.stderr[-3000:]
    records = json.loads((out / "samples.json").read_text())
    assert len(records) == 4 and all((out / rec["file"]).exists() for rec in records)
    assert "prompt truncated to 16 tokens" in r.stderr
    from PIL import Image

    grid = Image.open(out / "grid.png")
    assert grid.height >= 2 * 96  # two rows, upscaled cells


def test_sample_raw_weights_differ_from_ema(runs: dict) -> None:
    from ldmscale.inference.export import load_trained

    ema = load_trained(runs["reference"], "ema").unet.state_dict()
    raw = load_trained(runs["reference"], "raw").unet.state_dict()
    assert ema.keys() == raw.keys()
    assert any(not torch.equal(ema[k], raw[k]) for k in ema)


def test_partial_checkpoint_is_refused(runs: dict, tmp_path: Path) -> None:
    partial = tmp_path / "step_00000012"
    shutil.copytree(runs["reference"] / "checkpoints" / "step_00000012", partial)
    (partial / "COMPLETE").unlink()
    r = subprocess.run([*SAMPLE_CLI, str(partial), "--prompt", "x"], env=train_env(),
                       capture_output=True, text=True, timeout=120, cwd=REPO)
    assert r.returncode != 0 and "partial checkpoint" in r.stderr


def test_export_loads_in_stable_diffusion_pipeline(runs: dict, tmp_path: Path) -> None:
    from diffusers import StableDiffusionPipeline

    from ldmscale.inference.export import export_pipeline

    out = export_pipeline(runs["reference"], tmp_path / "pipe")
    pipe = StableDiffusionPipeline.from_pretrained(out, safety_checker=None)
    image = pipe("a handwritten digit 3", num_inference_steps=2, height=32, width=32, output_type="np").images[0]
    assert image.shape == (32, 32, 3)
