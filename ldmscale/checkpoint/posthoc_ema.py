"""Post-hoc EMA (EDM2: Karras et al., "Analyzing and Improving the Training Dynamics of Diffusion Models", 2024):
the EMA length chosen after training, from snapshots of two power-function EMAs.

A power-function EMA with exponent gamma averages the weights theta(tau) seen up to step t with the profile
p(tau) proportional to tau^gamma on (0, t]; its width relative to t is sigma_rel (EDM2 eq. 123). It is tracked with
beta_t = (1 - 1/t)^(gamma + 1) (eq. 127). Snapshots of such EMAs at steps t_i, profiles p_i, are linear in theta, so
an EMA of any other profile p* at a snapshot step T is approximated by sum_i c_i snapshot_i, with the c_i the least
squares fit of p* by the p_i: the normal equations A c = b with A_ij = <p_i, p_j>, b_i = <p_i, p*>, inner products in
closed form (eq. 151, EDM2's Algorithm 3), and c normalised to sum 1 as EDM2's training/phema.py does.

Files: `OUT/posthoc_ema/step_00001000.sigma_0.0500.safetensors`, one per profile and snapshot step, the full fp32
weights (the names of the trained module, as ema.safetensors), with `step` and `sigma_rel` in the metadata.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open

from ldmscale.checkpoint.integrity import COMPLETE, new_save_id, write_manifest
from ldmscale.checkpoint.store import CheckpointError
from ldmscale.runtime.atomic import atomic_save_tensors, atomic_write_text
from ldmscale.runtime.cli import output_dir_problem

SNAPSHOT_DIR = "posthoc_ema"
MAX_SIGMA_REL = 0.28  # sigma_rel -> 0.2887 as gamma -> 0 (a uniform average of the whole run)


def exp_to_sigma_rel(gamma: float) -> float:
    """EDM2 eq. 123."""
    return math.sqrt((gamma + 1) / ((gamma + 2) ** 2 * (gamma + 3)))


def sigma_rel_to_exp(sigma_rel: float) -> float:
    """The exponent gamma whose profile has this sigma_rel: the largest real root of
    gamma^3 + 7 gamma^2 + (16 - s^-2) gamma + (12 - s^-2) (EDM2 eq. 126, Algorithm 2)."""
    t = sigma_rel**-2
    return float(np.roots([1, 7, 16 - t, 12 - t]).real.max())


def beta(gamma: float, step: int) -> float:
    """The decay of update number `step` (1, 2, ...): (1 - 1/step)^(gamma + 1); 0 at step 1 (EDM2 eq. 127)."""
    return (1.0 - 1.0 / step) ** (gamma + 1.0)


def profile_inner(t_a: np.ndarray | float, g_a: np.ndarray | float, t_b: np.ndarray | float,
                  g_b: np.ndarray | float) -> np.ndarray:
    """<p_a, p_b> of normalised power-function profiles ending at t_a and t_b (EDM2 eq. 151), broadcast."""
    ratio = t_a / t_b
    exp = np.where(t_a < t_b, g_b, -g_a)
    return (g_a + 1) * (g_b + 1) * ratio**exp / ((g_a + g_b + 1) * np.maximum(t_a, t_b))


def solve_coefficients(steps: list[int], sigma_rels: list[float], step: int, sigma_rel: float) -> np.ndarray:
    """The weights c of the snapshots (steps[i], sigma_rels[i]) whose sum best fits the profile (step, sigma_rel)."""
    t = np.asarray(steps, dtype=np.float64)
    g = np.asarray([sigma_rel_to_exp(s) for s in sigma_rels])
    a = profile_inner(t[:, None], g[:, None], t[None, :], g[None, :])
    b = profile_inner(t, g, np.float64(step), np.float64(sigma_rel_to_exp(sigma_rel)))
    c = np.linalg.lstsq(a, b, rcond=None)[0]
    return c / c.sum()


def profile_fit_residual(steps: list[int], sigma_rels: list[float], step: int, sigma_rel: float) -> float:
    """||p* - sum c_i p_i|| / ||p*||: how well the snapshots can express the asked profile (0 = exactly)."""
    c = solve_coefficients(steps, sigma_rels, step, sigma_rel)
    t = np.asarray(steps, dtype=np.float64)
    g = np.asarray([sigma_rel_to_exp(s) for s in sigma_rels])
    g_out, t_out = sigma_rel_to_exp(sigma_rel), np.float64(step)
    a = profile_inner(t[:, None], g[:, None], t[None, :], g[None, :])
    b = profile_inner(t, g, t_out, g_out)
    self_inner = profile_inner(t_out, g_out, t_out, g_out)
    return float(math.sqrt(max(0.0, self_inner - 2 * c @ b + c @ a @ c) / self_inner))


def snapshot_path(folder: Path, step: int, sigma_rel: float) -> Path:
    return folder / f"step_{step:08d}.sigma_{sigma_rel:.4f}.safetensors"


def write_snapshot(folder: Path, step: int, sigma_rel: float, weights: dict[str, torch.Tensor]) -> Path:
    path = snapshot_path(folder, step, sigma_rel)
    folder.mkdir(parents=True, exist_ok=True)
    atomic_save_tensors(path, weights, metadata={"step": str(step), "sigma_rel": repr(float(sigma_rel))})
    return path


@dataclass
class Snapshot:
    path: Path
    step: int
    sigma_rel: float


def list_snapshots(run_dir: Path) -> list[Snapshot]:
    """Every snapshot of a run (train.posthoc_ema), by step then sigma_rel."""
    folder = run_dir / SNAPSHOT_DIR
    if not folder.is_dir():
        raise CheckpointError(f"{run_dir} has no {SNAPSHOT_DIR}/ folder: give the run's train.out_dir (the folder "
                              f"that holds checkpoints/ and {SNAPSHOT_DIR}/); a run keeps snapshots only when trained "
                              f"with train.posthoc_ema.sigma_rels=[0.05,0.10]")
    out = []
    for path in sorted(folder.glob("step_*.sigma_*.safetensors")):
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
        if "step" in meta and "sigma_rel" in meta:
            out.append(Snapshot(path, int(meta["step"]), float(meta["sigma_rel"])))
    if not out:
        raise CheckpointError(f"{folder} holds no snapshots yet (they are written every train.posthoc_ema.every steps)")
    return sorted(out, key=lambda s: (s.step, s.sigma_rel))


def select(snapshots: list[Snapshot], sigma_rel: float, step: int | None = None) -> tuple[list[Snapshot], int]:
    """The snapshots a reconstruction at `step` (default: the last snapshot step) uses, and that step; refuses a
    length out of range and a step with no snapshot."""
    if not 0 < sigma_rel <= MAX_SIGMA_REL:
        raise CheckpointError(f"--sigma-rel {sigma_rel}: give a value in (0, {MAX_SIGMA_REL}] (EDM2 uses 0.05-0.20)")
    steps = sorted({s.step for s in snapshots})
    step = steps[-1] if step is None else step
    if step not in steps:
        raise CheckpointError(f"--step {step}: no snapshot at that step; snapshots exist at steps "
                              f"{', '.join(map(str, steps))} (a reconstruction needs every profile up to its step)")
    return [s for s in snapshots if s.step <= step], step


def reconstruct(snapshots: list[Snapshot], sigma_rel: float, step: int | None = None
                ) -> tuple[dict[str, torch.Tensor], list[tuple[Snapshot, float]]]:
    """The EMA of profile sigma_rel at `step` (default: the last snapshot step) from the snapshots up to it:
    (fp32 weights, [(snapshot, coefficient)]). Summed one tensor at a time in float64: memory is one tensor per
    snapshot, whatever the model's size."""
    used, step = select(snapshots, sigma_rel, step)
    coefs = solve_coefficients([s.step for s in used], [s.sigma_rel for s in used], step, sigma_rel)
    handles = [safe_open(str(s.path), framework="pt") for s in used]
    out: dict[str, torch.Tensor] = {}
    for name in handles[-1].keys():
        total = torch.zeros_like(handles[-1].get_tensor(name), dtype=torch.float64)
        for h, c in zip(handles, coefs):
            total += h.get_tensor(name).double() * float(c)
        out[name] = total.float()
    return out, list(zip(used, coefs.tolist()))


def plan(run_dir: Path, sigma_rel: float, step: int | None = None) -> tuple[list[Snapshot], int]:
    """The checks on a run that need no weights (its folder, config, the snapshots' headers, the length and step):
    (the snapshots used, the step)."""
    if not run_dir.is_dir():
        raise CheckpointError(f"{run_dir}: no such run folder; give the run's train.out_dir")
    snapshots = list_snapshots(run_dir)
    if not (run_dir / "config.yaml").exists():
        raise CheckpointError(f"{run_dir} has no config.yaml: give the run's out_dir (train.out_dir)")
    return select(snapshots, sigma_rel, step)


def check_output(run_dir: Path, out: Path) -> None:
    """OUT can be written and is nobody else's: not a file, not the run's own folder or one of the folders the
    run writes (checkpoints/, posthoc_ema/), not a folder holding other files (an earlier output is replaced)."""
    problem = output_dir_problem(out)
    if problem:
        raise CheckpointError(f"--out {out}: {problem}; give a folder path for the checkpoint")
    target, run = out.resolve(), run_dir.resolve()
    if target == run or any(target.is_relative_to(run / d) for d in ("checkpoints", SNAPSHOT_DIR)):
        raise CheckpointError(f"--out {out} is the run's own folder or inside its checkpoints/ or {SNAPSHOT_DIR}/: "
                              f"give a folder of its own, e.g. {run.parent / (run.name + '_ema')}")
    if out.is_dir() and any(out.iterdir()) and not _is_reconstruction(out):
        raise CheckpointError(f"--out {out} is a folder with other files in it: give a new or empty folder (or an "
                              f"earlier ldmscale-ema output to replace)")


def _is_reconstruction(folder: Path) -> bool:
    try:
        return "posthoc_ema" in json.loads((folder / "trainer_state.json").read_text())
    except (OSError, ValueError, TypeError):
        return False


def write_checkpoint(run_dir: Path, out: Path, sigma_rel: float, step: int | None = None) -> Path:
    """Reconstruct and write a checkpoint folder that ldmscale-sample, -eval and -export take (its EMA weights:
    ema.safetensors, config.yaml, trainer_state.json, COMPLETE). Every input is checked before a weight is read."""
    snapshots, step = plan(run_dir, sigma_rel, step)
    check_output(run_dir, out)
    weights, used = reconstruct(snapshots, sigma_rel, step)
    config = run_dir / "config.yaml"
    out.mkdir(parents=True, exist_ok=True)
    (out / COMPLETE).unlink(missing_ok=True)
    atomic_save_tensors(out / "ema.safetensors", weights)
    atomic_write_text(out / "config.yaml", config.read_text())
    residual = profile_fit_residual([s.step for s, _ in used], [s.sigma_rel for s, _ in used], step, sigma_rel)
    state = {"step": step, "posthoc_ema": {"sigma_rel": sigma_rel, "run": str(run_dir.resolve()),
                                           "profile_fit_residual": residual,
                                           "snapshots": [{"file": s.path.name, "coefficient": c} for s, c in used]}}
    atomic_write_text(out / "trainer_state.json", json.dumps(state, indent=1))
    write_manifest(out, new_save_id(), step=step)  # COMPLETE, last, as a training save writes it
    return out
