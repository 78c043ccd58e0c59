"""Style step 2 under two processes: initialised from a step-1 checkpoint, resumed from its step-3 checkpoint, and
bitwise equal to the uninterrupted run (losses, KL, sample keys, EMA including the style weights). Two cases:
ZeRO-3 with metadata references (the digits' json `label` stands in for a style key: the pairs must be rebuilt
before the resume skip) and ZeRO-2 with augmented-view references and the colour-statistics input (the view is
redrawn from (seed, key) after the resume). Then ldmscale-sample draws with a style image."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from ldmscale.style.encoder import COLOUR_STATS_DIM
from tests.conftest import REPO, SAMPLE_CLI, free_port, train_env
from tests.runs import (
    finish,
    last_per_step,
    launch_command,
    sample_in_process,
    sample_keys,
    start,
    step_rows,
    train_args,
    wait_for_checkpoint,
)

MAX_STEPS = 6  # the style loss's beta warm-up (4 steps) and its end
RESUME_AT = 3  # a checkpoint every 3 steps; the resumed run starts from the first

CASES = {
    "zero3-metadata": {"deepspeed.zero_stage": 3, "style.reference": "metadata", "style.metadata_key": "label"},
    "zero2-augment": {"deepspeed.zero_stage": 2, "style.reference": "augment", "style.colour_stats": "true"},
}


def _style_run(assets: Path, out: Path, step1: Path, case: str, resume: str = "auto") -> subprocess.Popen:
    args = train_args(assets, out, resume, **{
        "train.max_steps": MAX_STEPS, "train.ckpt_every": RESUME_AT, "train.keep_last": 3, **CASES[case],
        "train.log_sample_keys": "true", "style.enabled": "true", "style.num_tokens": 2,
        "style.conv_channels": "[8,16]", "style.beta_warmup_steps": 4, "style.dropout": 0.25,
        "style.init_from": str(step1), "data.caption_dropout": 0.2})
    return start(launch_command("torchrun", free_port(), args), out)


@pytest.fixture(scope="module")
def step1(trained_tiny: Path) -> Path:
    """A style-free checkpoint (2 steps, ZeRO-0) for step 2 to start from."""
    return trained_tiny


def _style_world(case: str, assets: Path, step1: Path, root: Path) -> dict:
    """The case's uninterrupted reference, and a copy resumed from its step-3 checkpoint beside it."""
    reference, resumed = root / "reference", root / "resumed"
    ref = _style_run(assets, reference, step1, case)
    checkpoint = wait_for_checkpoint(ref, reference, RESUME_AT)
    res = _style_run(assets, resumed, step1, case, resume=str(checkpoint))
    finish(ref, reference)
    finish(res, resumed)
    return {"case": case, "step1": step1, "reference": reference, "resumed": resumed}


@pytest.fixture(scope="module")
def zero3_metadata(assets: Path, step1: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    return _style_world("zero3-metadata", assets, step1, tmp_path_factory.mktemp("zero3-metadata"))


@pytest.fixture(scope="module")
def zero2_augment(assets: Path, step1: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    return _style_world("zero2-augment", assets, step1, tmp_path_factory.mktemp("zero2-augment"))


@pytest.fixture(params=sorted(CASES))
def style_runs(request: pytest.FixtureRequest) -> dict:
    return request.getfixturevalue(request.param.replace("-", "_"))


def test_style_run_starts_from_step1_and_logs_both_loss_parts(style_runs: dict) -> None:
    lines = [json.loads(x) for x in (style_runs["reference"] / "log.jsonl").read_text().splitlines()]
    assert any("U-Net initialised from" in r.get("event", "") and "ema weights" in r["event"] for r in lines)
    steps = [r for r in lines if "step" in r]
    assert all({"kl", "denoise", "beta"} <= r.keys() for r in steps)
    assert [r["beta"] for r in steps[:5]] == pytest.approx([0.0, 0.25e-5, 0.5e-5, 0.75e-5, 1e-5])  # warm-up
    assert all(abs(r["loss"] - (r["denoise"] + r["beta"] * r["kl"])) < 1e-4 * max(1.0, r["loss"]) for r in steps)


def test_style_resume_is_bitwise(style_runs: dict) -> None:
    ref, res = style_runs["reference"], style_runs["resumed"]
    events = [r.get("event", "") for r in map(json.loads, (res / "log.jsonl").read_text().splitlines())]
    assert any(e.startswith(f"resumed from {ref / 'checkpoints'}/step_{RESUME_AT:08d}") for e in events)
    after = list(range(RESUME_AT + 1, MAX_STEPS + 1))
    for key in ("loss", "kl", "denoise"):
        want = {s: v for s, v in last_per_step(step_rows(ref), key).items() if s > RESUME_AT}
        assert sorted(want) == after and last_per_step(step_rows(res), key) == want
    for rank in range(2):
        want_keys = {s: k for s, k in sample_keys(ref, rank).items() if s > RESUME_AT}
        assert sample_keys(res, rank) == want_keys
    tag = f"step_{MAX_STEPS:08d}"
    a, b = (load_file(d / "checkpoints" / tag / "ema.safetensors") for d in (ref, res))
    assert any(k.startswith("style.") for k in a) and any(".to_v_style." in k for k in a)
    if style_runs["case"] == "zero2-augment":  # the head takes the colour statistics next to the conv features
        assert a["style.head.weight"].shape[1] == 2 * 16 + COLOUR_STATS_DIM
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_sample_cli_with_style_image(zero3_metadata: dict, tmp_path: Path, assets: Path,
                                     capsys: pytest.CaptureFixture) -> None:
    """Sampling is the same for both reference modes: checked once, on the ZeRO-3 shards."""
    from ldmscale.inference.export import load_trained

    m = load_trained(zero3_metadata["reference"], "raw")  # ZeRO-3 shards consolidated, style path rebuilt
    assert m.style is not None and any(".to_v_style." in k for k in m.unet.state_dict())
    from ldmscale.data.shard_writer import iter_tar_samples

    sample = next(iter_tar_samples(sorted((assets / "digits/train").glob("*.tar"))[0]))
    ref = tmp_path / "ref.jpg"
    ref.write_bytes(sample["jpg"])
    out = tmp_path / "samples"
    args = [str(zero3_metadata["reference"]), "--prompt", "a handwritten digit 3", "--prompt", "", "--style-image",
            str(ref), "--style-scale", "2", "--num-images", "2", "--steps", "3", "--out", str(out)]
    r = subprocess.run([*SAMPLE_CLI, *args], env=train_env(), capture_output=True, text=True, timeout=300, cwd=REPO)
    assert r.returncode == 0, r.stderr[-3000:]
    records = json.loads((out / "samples.json").read_text())
    assert len(records) == 4 and all(rec["style_scale"] == 2 for rec in records)
    code, err = sample_in_process([*args[:3], "--out", str(tmp_path / "s1"), "--steps", "2"], capsys)
    assert code == 0, err[-3000:]  # text-only sampling of a style checkpoint
    code, err = sample_in_process([str(zero3_metadata["step1"]), *args[1:]], capsys)
    assert code != 0 and "not a style-conditioned checkpoint" in err
