"""ldmscale-eval end to end on a trained tiny checkpoint: 1 rank and 2 ranks (torchrun, gloo) give the same
reference statistics, images and scores; the 1-rank eval is SIGKILLed after a few images and resumed (with the
2-rank eval's saved reference statistics), reusing the images it had written.

Batch size 1 everywhere: every image is then computed alone, so images are bitwise the same whatever the
world size or the point of interruption, and only the cross-rank summation order of the metric states differs.
"""

from __future__ import annotations

import importlib.util
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from ldmscale.eval.fid import GaussianStats
from tests.conftest import REPO, free_port, train_env
from tests.eval_assets import write_tiny_clip

GUIDANCE = "1,3"
NUM_IMAGES = 8


@pytest.fixture(scope="module")
def setup(assets: Path, trained_tiny: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("eval")
    (root / "prompts.txt").write_text("".join(f"a handwritten digit {d}\n" for d in range(4)))
    return {"root": root, "run": trained_tiny, "prompts": root / "prompts.txt", "heldout": assets / "digits/heldout",
            "clip": write_tiny_clip(root / "clip", assets / "models/tokenizer")}


def _args(s: dict[str, Path], out: Path, reference: Path, *extra: str) -> list[str]:
    return [str(s["run"]), "--prompts", str(s["prompts"]), "--reference", str(reference), "--features", "pixels:4",
            "--clip-model", str(s["clip"]), "--num-images", str(NUM_IMAGES), "--guidance", GUIDANCE, "--steps", "12",
            "--batch-size", "1", "--out", str(out), *extra]


def _eval(args: list[str], world: int = 1) -> subprocess.CompletedProcess:
    launch = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={world}",
              f"--master_port={free_port()}"] if world > 1 else [sys.executable]
    proc = subprocess.run([*launch, "-m", "ldmscale.eval.cli", *args], env=train_env(), cwd=REPO,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def _results(out: Path) -> list[dict]:
    return json.loads((out / "eval.json").read_text())["results"]


def _images(out: Path) -> dict[str, bytes]:
    return {str(p.relative_to(out)): p.read_bytes() for p in sorted((out / "images").rglob("*.png"))}


@pytest.fixture(scope="module")
def evals(setup: dict[str, Path]) -> dict:
    """1 rank, killed once it wrote 3 images of the first guidance scale (its reference statistics were saved before
    any image); then 2 ranks; then the 1-rank eval resumed, reading the 2-rank eval's statistics file."""
    root, heldout = setup["root"], setup["heldout"]
    out = root / "w1"
    cmd = [sys.executable, "-m", "ldmscale.eval.cli",
           *_args(setup, out, heldout, "--save-reference-stats", str(root / "ref_w1.npz"))]
    proc = subprocess.Popen(cmd, env=train_env(), cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    first = out / "images" / "guidance_1"
    deadline = time.time() + 300
    while time.time() < deadline and len(list(first.glob("0*.png"))) < 3 and proc.poll() is None:
        time.sleep(0.02)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    before = {p.name: p.stat().st_mtime_ns for p in first.glob("*.png")}
    w2 = root / "w2"
    _eval(_args(setup, w2, heldout, "--save-reference-stats", str(root / "ref_w2.npz")), world=2)
    resumed = _eval(_args(setup, out, root / "ref_w2.npz"))
    return {"w1": out, "w2": w2, "before": before, "first": first, "resumed_stdout": resumed.stdout}


@pytest.fixture(scope="module")
def one_rank(evals: dict) -> Path:
    return evals["w1"]


def test_one_and_two_ranks_give_the_same_scores(setup: dict[str, Path], evals: dict) -> None:
    one_rank, out = evals["w1"], evals["w2"]
    r1, r2 = (GaussianStats.load(setup["root"] / f"ref_w{w}.npz") for w in (1, 2))
    assert r1.n == r2.n == 270  # every held-out digit once, split over the ranks
    np.testing.assert_allclose(r2.mu, r1.mu, rtol=1e-12)
    np.testing.assert_allclose(r2.sigma, r1.sigma, rtol=1e-9, atol=1e-12)
    assert _images(out) == _images(one_rank) and len(_images(out)) == NUM_IMAGES * 2
    a, b = _results(one_rank), _results(out)
    assert [r["guidance"] for r in a] == [r["guidance"] for r in b] == [1.0, 3.0]
    for x, y in zip(a, b):
        assert y["fid"] == pytest.approx(x["fid"], rel=1e-5) and y["clip_score"] == pytest.approx(x["clip_score"],
                                                                                                   rel=1e-5)
    assert a[0]["fid"] != a[1]["fid"]  # the guidance scale reached the sampler
    assert (out / "fid_vs_clip.png").stat().st_size > 0
    index = json.loads((out / "images" / "guidance_3" / "samples.json").read_text())
    assert [(e["index"], e["prompt"]) for e in index] == [(i, f"a handwritten digit {i % 4}") for i in range(8)]


def test_killed_eval_resumes_and_reuses_its_images(evals: dict) -> None:
    """Its images are the uninterrupted 2-rank eval's (compared above), and its scores those of the same images."""
    before, first = evals["before"], evals["first"]
    assert 3 <= len(before) < NUM_IMAGES, "the kill came too late to interrupt the eval"
    assert "guidance 1: " in evals["resumed_stdout"]
    assert f"(drew {NUM_IMAGES - len(before)} here)" in evals["resumed_stdout"]
    assert {n: (first / n).stat().st_mtime_ns for n in before} == before  # reused, not redrawn


def test_images_drawn_with_other_settings_are_not_mixed_in(setup: dict[str, Path], one_rank: Path,
                                                           monkeypatch: pytest.MonkeyPatch,
                                                           capsys: pytest.CaptureFixture) -> None:
    """ldmscale-eval's entry function in this process: the check comes before any process group or image."""
    from ldmscale.eval.cli import cli
    from ldmscale.runtime import dist

    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("a process group was started before the settings were checked")

    monkeypatch.setattr(dist, "init_distributed", refuse)
    saved = dict(os.environ)  # reading the world from the environment fills in RANK, WORLD_SIZE, ...
    capsys.readouterr()
    try:
        with pytest.raises(SystemExit) as exit_info:
            cli(_args(setup, one_rank, setup["root"] / "ref_w1.npz", "--sampler", "euler"))
    finally:
        os.environ.clear()
        os.environ.update(saved)
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and "other settings" in err and "sampler" in err, err


def test_digit_sweep_reads_the_eval_folder(setup: dict[str, Path], one_rank: Path, assets: Path) -> None:
    """The demo's reading of an eval: digit accuracy per guidance scale beside FID, and the real-vs-real floor."""
    spec = importlib.util.spec_from_file_location("digit_accuracy", REPO / "tools/bench/digit_accuracy.py")
    assert spec is not None and spec.loader is not None
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    run_sweep = bench.run_sweep

    sweep = run_sweep(one_rank, assets / "digits/heldout", assets / "digits/train", folds=3, seed=0)
    assert [r["guidance"] for r in sweep["results"]] == [1.0, 3.0]
    assert all(r["fid"] == e["fid"] for r, e in zip(sweep["results"], _results(one_rank)))
    assert all(0.0 <= r["digit_accuracy"] <= 1.0 and r["real_accuracy"] > 0.8 for r in sweep["results"])
    # real training digits are far closer to the held-out ones than a 2-step model's images
    assert 0 < sweep["floor_fid_real_train_vs_heldout"] < min(r["fid"] for r in sweep["results"]) / 2
    assert Path(sweep["plot"]).stat().st_size > 0
