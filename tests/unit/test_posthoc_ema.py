"""Post-hoc EMA (train.posthoc_ema, ldmscale-ema): the tracked profiles are EDM2's power-function averages, they
resume exactly, and a reconstruction from the snapshots matches an EMA tracked directly."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from ldmscale.checkpoint.posthoc_cli import cli
from ldmscale.checkpoint.posthoc_ema import (
    beta,
    exp_to_sigma_rel,
    list_snapshots,
    profile_fit_residual,
    reconstruct,
    sigma_rel_to_exp,
)
from ldmscale.checkpoint.store import CheckpointError
from ldmscale.config import ConfigError, load_config
from ldmscale.trainer.posthoc_ema import STATE_FILE, PostHocEMA, check_resumable

STEPS, EVERY, DIM = 400, 20, 2000


def _trajectory(step: int) -> torch.Tensor:
    """Weights that drift and wander, as a training run's do: a deterministic function of the step."""
    g = torch.Generator().manual_seed(step)
    return 0.01 * step * torch.linspace(-1, 1, DIM) + 0.3 * torch.randn(DIM, generator=g).cumsum(0) / DIM**0.5


def _train(run: Path, sigma_rels: list[float], steps: int = STEPS, snapshots: bool = True,
           resume: tuple[PostHocEMA, torch.nn.Parameter] | None = None,
           first: int = 1) -> tuple[PostHocEMA, torch.nn.Parameter]:
    """Steps first..steps of the trajectory, the profiles updated (and snapshotted) after each, as the loop does."""
    if resume is None:
        p = torch.nn.Parameter(_trajectory(0))
        tracker = PostHocEMA([("unet.w", p)], sigma_rels, EVERY, run)  # ZeRO-0 on one rank: the masters are p
    else:
        tracker, p = resume
    for step in range(first, steps + 1):
        with torch.no_grad():
            p.copy_(_trajectory(step))
        tracker.update(step)
        if snapshots:
            tracker.maybe_snapshot(step, last=step == steps)
    return tracker, p


def test_sigma_rel_and_the_power_exponent_are_inverse_and_the_first_update_copies() -> None:
    for s in (0.02, 0.05, 0.10, 0.20, 0.28):
        assert exp_to_sigma_rel(sigma_rel_to_exp(s)) == pytest.approx(s, rel=1e-12)
    assert sigma_rel_to_exp(0.05) == pytest.approx(16.97, abs=0.01)  # EDM2's table: gamma 16.97 / 6.94
    assert sigma_rel_to_exp(0.10) == pytest.approx(6.94, abs=0.01)
    assert beta(6.94, 1) == 0.0


def test_a_tracked_profile_is_the_power_function_average(tmp_path: Path) -> None:
    """Weights t at step t: a power-function EMA with exponent g averages them to (g + 1) / (g + 2) * T."""
    p = torch.nn.Parameter(torch.zeros(1, dtype=torch.float64))
    tracker = PostHocEMA([("w", p)], [0.10], EVERY, tmp_path)
    for step in range(1, 1001):
        with torch.no_grad():
            p.fill_(float(step))
        tracker.update(step)
    g = sigma_rel_to_exp(0.10)
    assert tracker.state_dict()["0.1/w"].item() == pytest.approx((g + 1) / (g + 2) * 1000, rel=2e-3)


def test_a_stored_profile_reconstructs_to_itself(tmp_path: Path) -> None:
    tracker, _ = _train(tmp_path, [0.05, 0.10])
    weights, used = reconstruct(list_snapshots(tmp_path), 0.10)
    stored = tracker.state_dict()["0.1/unet.w"]
    assert len(used) == 2 * STEPS // EVERY
    # the asked profile is one of the inputs: the fit is exact, up to the float64 solve and the float32 result
    assert torch.allclose(weights["unet.w"], stored, rtol=0, atol=1e-6 * stored.abs().max().item())


def test_a_length_that_was_not_snapshotted_matches_its_direct_tracking(tmp_path: Path) -> None:
    """sigma_rel 0.075 tracked directly, and reconstructed from the 0.05 and 0.10 snapshots every 20 steps.

    Tolerance, 0.3% of the distance between the two stored EMAs (the scale on which the choice of length matters):
    the reconstruction is the least-squares fit of the 0.075 profile by the 40 stored ones, so its error is that
    fit's residual (profile_fit_residual, under 0.5% of the profile's norm here) applied to the weights' history,
    plus the gap between the discrete updates and EDM2's continuous profiles (largest in the first steps, whose
    weights count least). Measured: 0.03%. The plain midpoint of the two stored EMAs, a guess that ignores the
    history, is off by 1.6%, so the tolerance tells a reconstruction from a guess."""
    tracker, _ = _train(tmp_path / "run", [0.05, 0.10])
    direct, _ = _train(tmp_path / "direct", [0.075], snapshots=False)
    short, long = tracker.state_dict()["0.05/unet.w"], tracker.state_dict()["0.1/unet.w"]
    spread, truth = (short - long).norm(), direct.state_dict()["0.075/unet.w"]
    snaps = list_snapshots(tmp_path / "run")
    assert profile_fit_residual([s.step for s in snaps], [s.sigma_rel for s in snaps], STEPS, 0.075) < 0.005
    weights, _ = reconstruct(snaps, 0.075)
    assert (weights["unet.w"] - truth).norm() < 0.003 * spread, ((weights["unet.w"] - truth).norm() / spread).item()
    assert ((short + long) / 2 - truth).norm() > 0.01 * spread  # the tolerance is tight enough to fail a guess


def test_profiles_resume_bitwise_from_their_state(tmp_path: Path) -> None:
    whole, _ = _train(tmp_path / "a", [0.05, 0.10], steps=60, snapshots=False)
    first, p = _train(tmp_path / "b", [0.05, 0.10], steps=30, snapshots=False)
    saved = first.state_dict()
    resumed = PostHocEMA([("unet.w", p)], [0.05, 0.10], EVERY, tmp_path / "b")
    resumed.load_state_dict(saved)
    resumed, _ = _train(tmp_path / "b", [0.05, 0.10], steps=60, snapshots=False, resume=(resumed, p), first=31)
    for k, v in whole.state_dict().items():
        assert torch.equal(v, resumed.state_dict()[k]), k


def test_profiles_resume_bitwise_from_slices_of_the_saved_file(tmp_path: Path) -> None:
    """A resume reads each rank's share of every profile from posthoc_ema.safetensors as slices (TensorSlices), not
    the whole file on every rank: the profiles then continue as from the full state."""
    from ldmscale.checkpoint.slices import TensorSlices
    from ldmscale.runtime.atomic import atomic_save_tensors

    whole, _ = _train(tmp_path / "a", [0.05, 0.10], steps=60, snapshots=False)
    first, p = _train(tmp_path / "b", [0.05, 0.10], steps=30, snapshots=False)
    atomic_save_tensors(tmp_path / STATE_FILE, first.state_dict())
    resumed = PostHocEMA([("unet.w", p)], [0.05, 0.10], EVERY, tmp_path / "b")
    with TensorSlices(tmp_path / STATE_FILE) as slices:
        resumed.load_state_dict(slices)
    resumed, _ = _train(tmp_path / "b", [0.05, 0.10], steps=60, snapshots=False, resume=(resumed, p), first=31)
    for k, v in whole.state_dict().items():
        assert torch.equal(v, resumed.state_dict()[k]), k


def test_a_resume_without_the_same_profiles_is_refused(tmp_path: Path) -> None:
    tag = tmp_path / "step_00000010"
    tag.mkdir()
    with pytest.raises(CheckpointError, match="saved without train.posthoc_ema"):
        check_resumable(tag, [0.05, 0.10])
    tracker, _ = _train(tmp_path, [0.05, 0.10], steps=2, snapshots=False)
    from ldmscale.runtime.atomic import atomic_save_tensors

    atomic_save_tensors(tag / STATE_FILE, tracker.state_dict())
    check_resumable(tag, [0.10, 0.05])
    with pytest.raises(CheckpointError, match=r"sigma_rels=\[0.05, 0.1\]"):
        check_resumable(tag, [0.05, 0.15])


def test_sigma_rels_out_of_range_are_refused() -> None:
    for bad in ("[0.05,0.3]", "[0.1,0.1]", "[0]"):
        with pytest.raises(ConfigError, match="train.posthoc_ema.sigma_rels"):
            load_config(None, [f"train.posthoc_ema.sigma_rels={bad}", "data.shards=[x]", "model.pretrained=",
                               "train.stage=autoencoder"])


def test_cli_writes_a_checkpoint_folder_and_refuses_bad_input_in_one_line(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    run = tmp_path / "run"
    _train(run, [0.05, 0.10], steps=100)
    (run / "config.yaml").write_text("train:\n  max_steps: 100\n")
    with pytest.raises(SystemExit) as e:
        cli([str(run), "--sigma-rel", "0.08", "--step", "60", "--out", str(tmp_path / "out")])
    assert e.value.code == 0
    out = tmp_path / "out"
    assert {f.name for f in out.iterdir()} >= {"ema.safetensors", "config.yaml", "trainer_state.json", "COMPLETE"}
    state = json.loads((out / "trainer_state.json").read_text())
    assert state["step"] == 60 and len(state["posthoc_ema"]["snapshots"]) == 6  # steps 20, 40, 60 x 2 profiles
    expected, _ = reconstruct(list_snapshots(run), 0.08, 60)
    assert torch.equal(load_file(str(out / "ema.safetensors"))["unet.w"], expected["unet.w"])
    for args, message in ((["--step", "50"], "no snapshot at that step; snapshots exist at steps 20, 40, 60, 80, 100"),
                          (["--sigma-rel", "0.4"], "give a value in (0, 0.28]")):
        argv = [str(run), "--sigma-rel", "0.08", "--out", str(tmp_path / "bad"), *args]
        with pytest.raises(SystemExit) as e:
            cli(argv)
        err = capsys.readouterr().err
        assert e.value.code == 2 and message in err and len(err.strip().splitlines()) == 1, err
    with pytest.raises(SystemExit) as e:
        cli([str(tmp_path), "--sigma-rel", "0.08", "--out", str(tmp_path / "bad")])
    assert e.value.code == 2 and "no posthoc_ema/ folder" in capsys.readouterr().err
