"""Two DeepSpeed ranks trained, interrupted and resumed: the resumed run is bitwise the run that was never
interrupted (per-step losses, validation losses, every rank's sample keys, the EMA weights). Then the checkpoints
feed ldmscale-sample and the export.

Two worlds, each an uninterrupted reference and interrupted copies of it:
- ZeRO-2 (torchrun), with validation every 4 steps and 1 in 5 JPEGs corrupt in rank 1's shards only: killed -9
  mid-run and resumed (every rank resumes its own data position) after rank 1's optimizer shard of the latest
  checkpoint was cut short (--resume auto falls back to the one before); and, started as srun starts tasks (one
  process group, rendezvous from the environment) with `spawn` loader workers, preempted by SIGUSR1 sent to the
  whole group as slurmstepd signals every process of a step: all ranks save one checkpoint, exit 0, and resume;
  a notice during start-up (before the first step) makes both ranks exit 0 for requeue without saving.
- ZeRO-3 (the deepspeed launcher), 8 steps an epoch: a copy resumed from the reference's own step-4 checkpoint
  beside it, across the epoch boundary (what a kill -9 adds to a resume is checked on ZeRO-2).
"""

from __future__ import annotations

import io
import json
import os
import shutil
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from ldmscale.config import load_config
from ldmscale.data import expand_shard_urls, source_shards
from tests.conftest import REPO, free_port, tiny_overrides, train_env
from tests.runs import (
    finish,
    kill_after_step,
    kill_tree,
    last_per_step,
    log_file,
    sample_in_process,
    sample_keys,
    start_training,
    step_rows,
    train_args,
    wait_for_checkpoint,
)

VAL_KEYS = ("val/mse_low", "val/mse_mid", "val/mse_high", "val/mse", "val/loss")


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


def _preempted_ranks(assets: Path, out: Path, env_extra: dict[str, str] | None = None, **overrides: object
                     ) -> list[subprocess.Popen]:
    """Two trainer ranks in one new process group (rank 0 leads it), like the tasks of one srun step."""
    args = [sys.executable, "-m", "ldmscale.train", *train_args(assets, out, **overrides)]
    port = str(free_port())
    procs: list[subprocess.Popen] = []
    for rank in range(2):
        env = {**train_env(), "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": "2",
               "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port, **(env_extra or {})}
        with open(out.parent / f"{out.name}.rank{rank}.log", "a") as log:
            group = procs[0].pid if procs else 0  # 0: a new group led by rank 0
            procs.append(subprocess.Popen(args, env=env, cwd=REPO, stdout=log, stderr=subprocess.STDOUT,
                                          process_group=group))
    return procs


def _wait_ranks(procs: list[subprocess.Popen], timeout: float = 600) -> list[int]:
    try:
        return [p.wait(timeout=timeout) for p in procs]
    except subprocess.TimeoutExpired:
        os.killpg(procs[0].pid, signal.SIGKILL)
        raise


def _rank_log(out: Path, rank: int) -> str:
    return (out.parent / f"{out.name}.rank{rank}.log").read_text()


def _catches_usr1(pid: int) -> bool:
    """Whether the process has a handler for SIGUSR1 (its SigCgt mask in /proc)."""
    status = Path(f"/proc/{pid}/status").read_text()
    caught = int(status.split("SigCgt:")[1].split()[0], 16)
    return bool(caught & (1 << (signal.SIGUSR1 - 1)))


def _kill_and_resume(assets: Path, out: Path, launcher: str, kill_at: int, cfg: dict, damage: bool) -> dict:
    """Start the run, SIGKILL it (launcher and ranks) once it logged `kill_at`, resume it with --resume auto. With
    `damage`, rank 1's optimizer shard of the latest checkpoint is cut short first: the resume falls back to the
    checkpoint before it."""
    kill_after_step(start_training(assets, out, launcher, **cfg), out, kill_at)
    time.sleep(1.0)
    killed_at = max(r["step"] for r in step_rows(out))
    saved = int((out / "checkpoints" / "latest").read_text().split("_")[1])
    if damage:
        shard = out / "checkpoints" / f"step_{saved:08d}" / "zero_pp_rank_1_mp_rank_00_optim_states.pt"
        shard.write_bytes(shard.read_bytes()[:1000])
    finish(start_training(assets, out, launcher, **cfg), out)
    return {"killed_at": killed_at, "saved_before_kill": saved,
            "resumed_from": saved - int(cfg["train.ckpt_every"]) if damage else saved}


def _beside_reference(assets: Path, reference: Path, out: Path, launcher: str, kill_at: int, cfg: dict,
                      damage: bool = False) -> dict:
    """The uninterrupted reference and the killed-and-resumed run side by side (they share the two cores)."""
    ref = start_training(assets, reference, launcher, **cfg)
    try:
        result = _kill_and_resume(assets, out, launcher, kill_at, cfg, damage)
    except BaseException:
        kill_tree(ref.pid)
        raise
    finish(ref, reference)
    return result


@pytest.fixture(scope="module")
def zero2(assets: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    root = tmp_path_factory.mktemp("zero2")
    data = root / "digits"
    shutil.copytree(assets / "digits/train", data)
    cfg: dict[str, object] = {
        "deepspeed.zero_stage": 2, "data.shards": f"[{data}]", "data.samples_per_epoch": 160, "data.num_workers": 2,
        "train.max_steps": 16, "train.ckpt_every": 4, "train.keep_last": 2, "train.log_sample_keys": "true",
        "train.eval_every": 4, "train.eval_samples": 12, "data.val_shards": f"[{assets / 'digits/heldout'}]",
    }
    parsed = load_config(REPO / "configs/tiny.yaml", tiny_overrides(assets, root / "x", **cfg))
    urls = expand_shard_urls(parsed.data.shards)
    for i in source_shards(len(urls), parsed.train.seed, 0, (1, 2, 0, parsed.data.num_workers)):
        _corrupt_every_fifth_jpeg(Path(urls[i]))  # rank 1's first worker's shards in the (only) epoch

    reference, killed, preempted = root / "reference", root / "killed", root / "preempted"
    world = {"cfg": cfg, "reference": reference, "killed": killed, "resumed": killed, "first_step": 1, "max_steps": 16,
             **_beside_reference(assets, reference, killed, "torchrun", 9, cfg, damage=True)}

    # only the preemption saves; no validation and a one-step grid: these copies' losses and keys are what is read
    spawn = {**cfg, "data.start_method": "spawn", "train.ckpt_every": 1000, "train.eval_every": 0,
             "sample.num_steps": 1, "sample.images_per_prompt": 1}
    # a notice while the ranks are still importing and starting: as soon as both have a handler
    early = root / "early"
    procs = _preempted_ranks(assets, early, {"LDMSCALE_STATUS_FILE": str(root / "early.status")}, **spawn)
    deadline = time.time() + 120
    while time.time() < deadline and not all(p.poll() is None and _catches_usr1(p.pid) for p in procs):
        time.sleep(0.05)
    os.killpg(procs[0].pid, signal.SIGUSR1)
    world["early"] = {"out": early, "codes": _wait_ranks(procs), "logs": [_rank_log(early, r) for r in range(2)],
                      "status": (root / "early.status").read_text()}

    procs = _preempted_ranks(assets, preempted, **spawn)
    deadline = time.time() + 400
    while time.time() < deadline and not any(r["step"] >= 3 for r in step_rows(preempted)):
        assert all(p.poll() is None for p in procs), _rank_log(preempted, 0)[-3000:]
        time.sleep(0.2)
    os.killpg(procs[0].pid, signal.SIGUSR1)  # every rank and every spawned loader worker
    codes = _wait_ranks(procs)
    latest = (preempted / "checkpoints" / "latest").read_text()
    world["preemption"] = {
        "codes": codes, "log": [_rank_log(preempted, r) for r in range(2)], "latest": latest,
        "tags": sorted(p.name for p in (preempted / "checkpoints").glob("step_*")),
        "files": sorted(p.name for p in (preempted / "checkpoints" / latest).iterdir()),
    }
    assert _wait_ranks(_preempted_ranks(assets, preempted, **spawn)) == [0, 0], _rank_log(preempted, 0)[-3000:]
    world["preempted"] = preempted
    return world


@pytest.fixture(scope="module")
def zero3(assets: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """The reference, and a copy started from its step-4 checkpoint as soon as that is complete: keep_last 3, so
    that the reference prunes nothing the copy may still be loading (pruning is checked on ZeRO-2)."""
    root = tmp_path_factory.mktemp("zero3")
    cfg: dict[str, object] = {"deepspeed.zero_stage": 3, "train.max_steps": 12, "train.ckpt_every": 4,
                              "train.log_sample_keys": "true", "train.keep_last": 3}  # 8 steps an epoch
    reference, resumed = root / "reference", root / "resumed"
    ref = start_training(assets, reference, "deepspeed", **cfg)
    try:
        checkpoint = wait_for_checkpoint(ref, reference, 4)
        res = start_training(assets, resumed, "deepspeed", resume=str(checkpoint), **cfg)
    except BaseException:
        kill_tree(ref.pid)
        raise
    finish(ref, reference)
    finish(res, resumed)
    return {"cfg": cfg, "reference": reference, "resumed": resumed, "resumed_from": 4, "first_step": 5,
            "max_steps": 12}


@pytest.fixture(params=["zero2", "zero3"])
def world(request: pytest.FixtureRequest) -> dict:
    return request.getfixturevalue(request.param)


def test_resumed_run_reproduces_the_uninterrupted_run(world: dict) -> None:
    """ZeRO-2: the copy killed -9 and resumed (its log holds steps 1-16, the resumed run's rows win); ZeRO-3: the copy
    started from the reference's step-4 checkpoint (steps 5-12)."""
    ref, res, first, max_steps = world["reference"], world["resumed"], world["first_step"], world["max_steps"]
    resumed = [e for e in map(json.loads, (res / "log.jsonl").read_text().splitlines())
               if e.get("event", "").startswith("resumed from")]
    assert len(resumed) == 1
    assert f"step_{world['resumed_from']:08d}" in resumed[0]["event"]
    ref_loss, res_loss = last_per_step(step_rows(ref), "loss"), last_per_step(step_rows(res), "loss")
    assert sorted(ref_loss) == list(range(1, max_steps + 1))
    assert sorted(res_loss) == list(range(first, max_steps + 1))
    assert res_loss == {s: v for s, v in ref_loss.items() if s >= first}  # bitwise: the floats' JSON text
    for rank in range(2):  # same samples, same order, none skipped or repeated
        assert sample_keys(res, rank) == {s: k for s, k in sample_keys(ref, rank).items() if s >= first}
    tag = f"step_{max_steps:08d}"
    ema_ref = load_file(ref / "checkpoints" / tag / "ema.safetensors")
    ema_res = load_file(res / "checkpoints" / tag / "ema.safetensors")
    assert ema_ref.keys() == ema_res.keys() and all(torch.equal(ema_ref[k], ema_res[k]) for k in ema_ref)


def test_checkpoints_are_complete_and_pruned(world: dict) -> None:
    ck, last, keep = world["reference"] / "checkpoints", world["max_steps"], int(world["cfg"]["train.keep_last"])
    assert (ck / "latest").read_text() == f"step_{last:08d}"
    tags = sorted(p.name for p in ck.glob("step_*"))
    assert tags == [f"step_{s:08d}" for s in range(last - 4 * (keep - 1), last + 1, 4)]  # ckpt_every=4, keep_last
    assert all((ck / t / "COMPLETE").exists() for t in tags)


def test_faults_on_one_rank_resume_with_that_ranks_own_position(zero2: dict) -> None:
    """Rank 1 met the corrupt JPEGs; each rank resumed its own position (the keys and losses are checked above),
    from step 4: rank 1's optimizer shard of step 8 was cut short before the resume."""
    text = log_file(zero2["killed"]).read_text()
    assert zero2["killed_at"] < zero2["max_steps"] and zero2["saved_before_kill"] == 8
    assert ("WARNING: checkpoint step_00000008 is damaged (zero_pp_rank_1_mp_rank_00_optim_states.pt is 1000 "
            "bytes" in text), text[-3000:]
    assert f"resumed from {zero2['killed'] / 'checkpoints' / 'step_00000004'} at step 4" in text
    assert "rank 1 data resume:" in text and "rank 0 data resume:" in text
    ref_log = {r["step"]: r for r in step_rows(zero2["reference"]) if "loss" in r}
    assert ref_log[16].get("data/dropped_decode_error", 0) > 0  # the faults were met, and summed over ranks


def _val(out: Path) -> dict[int, dict]:
    return {r["step"]: {k: r[k] for k in VAL_KEYS} for r in step_rows(out) if "val/mse" in r}


def test_validation_loss_per_bucket_and_the_same_after_resume(zero2: dict) -> None:
    full, resumed = _val(zero2["reference"]), _val(zero2["killed"])  # later rows (after the resume) win
    assert sorted(full) == sorted(resumed) == [4, 8, 12, 16]
    assert resumed == full  # bitwise: fixed samples, noise and timesteps, exactly resumed weights
    assert full[4] != full[8]  # it measures the weights
    assert len({full[16][k] for k in ("val/mse_low", "val/mse_mid", "val/mse_high")}) == 3


def test_grid_drawn_by_all_ranks_is_the_single_process_grid(zero2: dict, tmp_path: Path,
                                                            capsys: pytest.CaptureFixture) -> None:
    """tiny.yaml: 2 prompts x 2 images, 4 steps, DDIM, guidance 7.5; rank 0 drew images 0 and 2, rank 1 1 and 3."""
    grid_dir = zero2["reference"] / "samples" / "step_00000016"
    ref = tmp_path / "single"
    code, err = sample_in_process([str(zero2["reference"]), "--prompt", "a handwritten digit 3", "--prompt",
                                    "a handwritten digit 7", "--num-images", "2", "--steps", "4", "--out", str(ref)],
                                   capsys)
    assert code == 0, err[-3000:]
    got, want = (json.loads((d / "samples.json").read_text()) for d in (grid_dir, ref))
    assert [e["prompt"] for e in got] == [e["prompt"] for e in want]
    for g, w in zip(got, want):
        a = np.asarray(Image.open(grid_dir / g["file"]), dtype=np.int16)
        b = np.asarray(Image.open(ref / w["file"]), dtype=np.int16)
        assert np.abs(a - b).max() <= 1, g["file"]  # batch composition may move a rounding by one level
    events = [json.loads(ln).get("event", "") for ln in (zero2["reference"] / "log.jsonl").read_text().splitlines()]
    assert any(e.startswith(f"sample grid {grid_dir}") and "images per rank 2+2" in e for e in events)
    images = [np.asarray(Image.open(grid_dir / e["file"])) for e in got]
    assert not np.array_equal(images[0], images[1])  # each index its own noise


def test_loss_curve_png_from_the_log(zero2: dict, tmp_path: Path) -> None:
    from ldmscale.eval.curves import plot_curves, read_log

    train, val = read_log(zero2["reference"])
    assert sorted(train) == list(range(1, 17))
    evals = [4, 8, 12, 16]
    assert {k: sorted(v) for k, v in val.items()} == {f"val/mse_{b}": evals for b in ("low", "mid", "high")} | {
        "val/mse": evals}
    png = plot_curves(zero2["reference"], tmp_path / "loss_curve.png")
    with Image.open(png) as img:
        assert img.format == "PNG" and img.size[0] > img.size[1]


def test_preemption_signal_to_the_group_saves_on_all_ranks_and_exits_0(zero2: dict) -> None:
    p = zero2["preemption"]
    assert p["codes"] == [0, 0], p["log"][0][-3000:]
    assert "PREEMPTED step=" in p["log"][0] and "SIGUSR1" in p["log"][0]
    assert "killed by signal" not in p["log"][0] + p["log"][1]
    step = int(p["latest"].split("_")[1])
    assert 3 <= step < zero2["max_steps"] and p["tags"] == [p["latest"]]  # one checkpoint: the preemption save
    # ZeRO-2: each rank wrote its own optimizer shard
    shards = [f for f in p["files"] if f.endswith("optim_states.pt")]
    assert len(shards) == 2 and all(any(f"zero_pp_rank_{r}_" in f for f in shards) for r in range(2))


def test_a_notice_before_the_first_step_exits_for_requeue_saving_nothing(zero2: dict) -> None:
    early = zero2["early"]
    logs = early["logs"]
    assert early["codes"] == [0, 0], logs[0][-3000:]
    assert "PREEMPTED step=0 before the first step" in logs[0] and "SIGUSR1" in logs[0], logs[0][-3000:]
    assert not any("Traceback" in text or "killed by signal" in text for text in logs)
    assert "state=preempted" in early["status"] and "resumed_from=\n" in early["status"]
    assert not list(early["out"].glob("checkpoints/step_*"))  # nothing new saved


def test_preempted_run_with_spawned_workers_continues_exactly(zero2: dict) -> None:
    """Spawned loader workers (the CUDA default) resume like the reference's forked ones."""
    ref, res = zero2["reference"], zero2["preempted"]
    assert last_per_step(step_rows(res), "loss") == last_per_step(step_rows(ref), "loss")
    for rank in range(2):
        assert sample_keys(res, rank) == sample_keys(ref, rank)


def test_sample_cli_writes_pngs_and_grid(zero2: dict, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "samples"
    argv = [str(zero2["reference"]), "--prompt", "a handwritten digit 3",
            "--prompt", "a handwritten digit 7 " + "very " * 40 + "long", "--num-images", "2", "--steps", "3",
            "--sampler", "dpmsolver++", "--out", str(out)]
    with pytest.warns(UserWarning, match="prompt truncated to 16 tokens"):
        code, err = sample_in_process(argv, capsys)
    assert code == 0, err[-3000:]
    records = json.loads((out / "samples.json").read_text())
    assert len(records) == 4 and all((out / rec["file"]).exists() for rec in records)
    grid = Image.open(out / "grid.png")
    assert grid.height >= 2 * 96  # two rows, upscaled cells


def test_raw_weights_differ_from_ema(world: dict) -> None:
    from ldmscale.inference.export import load_trained

    ema = load_trained(world["reference"], "ema").unet.state_dict()
    raw = load_trained(world["reference"], "raw").unet.state_dict()  # ZeRO-3: the shards consolidated
    assert ema.keys() == raw.keys()
    assert any(not torch.equal(ema[k], raw[k]) for k in ema)


def test_partial_checkpoint_is_refused(zero2: dict, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    partial = tmp_path / "step_00000016"
    shutil.copytree(zero2["reference"] / "checkpoints" / "step_00000016", partial)
    (partial / "COMPLETE").unlink()
    code, err = sample_in_process([str(partial), "--prompt", "x"], capsys)
    assert code != 0 and "partial checkpoint" in err


def test_export_loads_in_stable_diffusion_pipeline(world: dict, tmp_path: Path) -> None:
    from diffusers import StableDiffusionPipeline

    from ldmscale.inference.export import export_pipeline

    out = export_pipeline(world["reference"], tmp_path / "pipe")
    pipe = StableDiffusionPipeline.from_pretrained(out, safety_checker=None)
    image = pipe("a handwritten digit 3", num_inference_steps=2, height=32, width=32, output_type="np").images[0]
    assert image.shape == (32, 32, 3)
