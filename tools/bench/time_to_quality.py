"""Time to quality: training recipes side by side on the demo's data and U-Net, each judged by how many steps it
needs to reach the baseline's final quality.

    nice -n 5 python tools/bench/time_to_quality.py --out ttq_out              # every recipe, 800 steps each
    nice -n 5 python tools/bench/time_to_quality.py --out ttq_out --budget 400 # recipes trained for 400 steps
    python tools/bench/time_to_quality.py --out ttq_out --budget 400 --report-only   # table + plot of what exists
    python tools/bench/time_to_quality.py --out ttq_out --budget 400 --posthoc baseline-400:400

One set of digit shards, offline text encoder and autoencoder (configs/demo-autoencoder.yaml) is built once and
shared by every recipe. Each recipe is configs/demo.yaml plus its overrides, with the same seed, data order and
budget (--budget steps, the length of the LR schedule); recipes run one after another (the machine may be
shared: run the script under `nice`). The target is the baseline trained for --target-steps (the demo's 800).
Every --eval-every steps a run records
  - val/mse: the trainer's fixed validation loss on the held-out digits (raw weights, train.eval_every); it is the
    MSE of the model's own target, so it compares only recipes with the baseline's target and noise schedule;
  - FID (pixels:8) and digit accuracy of one image per held-out caption (ldmscale-eval at one guidance scale, EMA
    weights; tools/bench/digit_accuracy.py's classifier).
The report gives, per run, the first evaluated step at which it is at least as good as the target on each metric,
and on all of them together, and the ratio target steps / those steps; and draws the curves. --posthoc RUN:STEP
reconstructs post-hoc EMAs (ldmscale-ema) of that run at that step and evaluates them the same way. Every result
is cached under --out: a rerun continues where it stopped.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]

# each recipe: configs/demo.yaml plus these overrides (docs/training-recipes.md says what each means)
RECIPES: dict[str, list[str]] = {
    "baseline": [],
    "logit_normal": ["model.timestep_sampling=logit_normal"],
    "immiscible": ["model.immiscible=true"],
    "v_zero_snr": ["model.prediction_type=v_prediction", "model.zero_terminal_snr=true"],
    "combined": ["model.timestep_sampling=logit_normal", "model.immiscible=true",
                 "model.prediction_type=v_prediction", "model.zero_terminal_snr=true"],
}
# recipes whose val/mse is in the baseline's terms (same prediction target, same noise schedule)
SAME_TARGET = {"baseline", "logit_normal", "immiscible"}
METRICS = (("val_mse", "val/mse", min), ("fid", "FID (pixels:8)", min), ("digit_accuracy", "digit accuracy", max))


def env() -> dict[str, str]:
    threads = os.environ.get("OMP_NUM_THREADS") or str(os.cpu_count() or 1)
    return {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1", "WANDB_MODE": "disabled",
            "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": threads,
            "TORCH_EXTENSIONS_DIR": os.environ.get("TORCH_EXTENSIONS_DIR", str(REPO / ".cache/torch_extensions"))}


def run(cmd: list[str], log: Path) -> float:
    """Run a command (at the script's own niceness), its output to `log`; stop the benchmark if it fails."""
    t0 = time.perf_counter()
    log.parent.mkdir(parents=True, exist_ok=True)
    print(f"$ {' '.join(cmd)}", flush=True)
    with open(log, "a") as f:
        rc = subprocess.run(cmd, env=env(), stdout=f, stderr=subprocess.STDOUT, cwd=REPO).returncode
    if rc != 0:
        raise SystemExit(f"failed ({rc}): {' '.join(cmd)}\n{log.read_text()[-3000:]}")
    return time.perf_counter() - t0


def bin_of(name: str) -> str:
    return str(Path(sys.executable).parent / name)


def prepare(out: Path) -> dict[str, Path]:
    """Shards, offline text encoder/tokenizer and the autoencoder, once (as tools/run_demo.sh builds them)."""
    py, p = sys.executable, {"shards": out / "shards", "models": out / "models", "ae": out / "autoencoder"}
    if not (p["shards"] / "train/00000.tar").exists():
        run([py, "tools/make_digit_shards.py", "--out", str(p["shards"])], out / "logs/shards.log")
    if not (p["models"] / "tokenizer").exists():
        run([py, "tools/make_offline_models.py", "--shards", str(p["shards"] / "train/*.tar"), "--out",
             str(p["models"])], out / "logs/models.log")
    if not (p["ae"] / "vae/config.json").exists():
        secs = run([bin_of("ldmscale-train"), "--config", "configs/demo-autoencoder.yaml", f"train.out_dir={p['ae']}",
                    f"data.shards=[{p['shards'] / 'train'}]"], out / "logs/autoencoder.log")
        print(f"autoencoder trained in {secs / 60:.1f} min", flush=True)
    return p


def run_name(name: str, steps: int) -> str:
    return f"{name}-{steps}"


def recipe_overrides(name: str, steps: int, p: dict[str, Path], out: Path, a: argparse.Namespace) -> list[str]:
    every = a.ckpt_every or a.quality_every
    return [
        f"train.out_dir={out / 'runs' / run_name(name, steps)}", f"train.max_steps={steps}", f"train.seed={a.seed}",
        f"data.shards=[{p['shards'] / 'train'}]", f"data.val_shards=[{p['shards'] / 'heldout'}]",
        f"model.vae={p['ae'] / 'vae'}", f"model.text_encoder={p['models'] / 'text_encoder'}",
        f"model.tokenizer={p['models'] / 'tokenizer'}",
        f"train.eval_every={a.eval_every}", "train.eval_samples=270",
        f"train.ckpt_every={every}", f"train.keep_last={steps // every + 1}",  # every checkpoint kept: evaluable
        f"train.posthoc_ema.sigma_rels=[{a.track_sigma_rels}]", f"train.posthoc_ema.every={a.eval_every}",
        "sample.images_per_prompt=1",  # the end-of-run grid: one image per digit is enough here
        *RECIPES[name],
    ]


def finished(run_dir: Path, steps: int) -> bool:
    log = run_dir / "log.jsonl"
    return log.exists() and f'"FINISHED step={steps}"' in log.read_text()


def train(name: str, steps: int, p: dict[str, Path], out: Path, a: argparse.Namespace) -> None:
    run_dir = out / "runs" / run_name(name, steps)
    if finished(run_dir, steps):
        return
    secs = run([bin_of("ldmscale-train"), "--config", "configs/demo.yaml", *recipe_overrides(name, steps, p, out, a)],
               out / "logs" / f"train_{run_name(name, steps)}.log")
    print(f"{run_name(name, steps)}: trained in {secs / 60:.1f} min", flush=True)


def evaluate(ckpt: Path, result: Path, p: dict[str, Path], a: argparse.Namespace) -> dict[str, Any]:
    """FID (pixels:8) and digit accuracy of one image per held-out caption, cached in `result`."""
    if result.exists():
        return json.loads(result.read_text())
    from digit_accuracy import run_sweep

    heldout = p["shards"] / "heldout"
    eval_dir = result.with_suffix("")
    shutil.rmtree(eval_dir, ignore_errors=True)
    run([bin_of("ldmscale-eval"), str(ckpt), "--prompts", str(heldout), "--reference", str(heldout),
         "--features", "pixels:8", "--guidance", str(a.guidance), "--steps", str(a.sample_steps),
         "--sampler", "dpmsolver++", "--batch-size", "90", "--out", str(eval_dir)], result.with_suffix(".log"))
    row = run_sweep(eval_dir, heldout, None, folds=5, seed=0)["results"][0]
    quality = {"fid": row["fid"], "digit_accuracy": row["digit_accuracy"], "guidance": row["guidance"]}
    result.write_text(json.dumps(quality))
    shutil.rmtree(eval_dir / f"guidance_{a.guidance:g}", ignore_errors=True)  # the images: ~1 MB per evaluation
    return quality


def val_mse(run_dir: Path) -> dict[int, float]:
    from ldmscale.eval.curves import read_log

    return read_log(run_dir)[1].get("val/mse", {})


def curve(name: str, steps: int, p: dict[str, Path], out: Path, a: argparse.Namespace) -> list[dict[str, Any]]:
    """[{step, val_mse, fid, digit_accuracy}] at every evaluated step of a recipe's run."""
    run_dir = out / "runs" / run_name(name, steps)
    mse = val_mse(run_dir)
    rows = []
    for step in range(a.eval_every, steps + 1, a.eval_every):
        ckpt = run_dir / "checkpoints" / f"step_{step:08d}"
        row: dict[str, Any] = {"step": step, "val_mse": mse.get(step) if name in SAME_TARGET else None}
        if step % a.quality_every == 0 and (ckpt / "COMPLETE").exists():
            row.update(evaluate(ckpt, run_dir / "quality" / f"step_{step:08d}.json", p, a))
        if step in mse:
            rows.append(row)
    return rows


def _as_good(row: dict[str, Any], target: dict[str, Any], key: str, best: Any) -> bool | None:
    """Is row[key] at least as good as target[key]? None when either has no value (not comparable)."""
    if row.get(key) is None or target.get(key) is None:
        return None
    return best(row[key], target[key]) == row[key]


def steps_to_reach(rows: list[dict[str, Any]], target: dict[str, Any]) -> dict[str, int | None]:
    """First evaluated step at which each metric is at least as good as `target`, and all of them at once (the
    ones the recipe has in the baseline's terms); None: not within the budget."""
    out: dict[str, int | None] = {}
    for key, _, best in METRICS:
        ok = [r["step"] for r in rows if _as_good(r, target, key, best)]
        out[key] = ok[0] if ok else None
    ok = [r["step"] for r in rows if "fid" in r and all(_as_good(r, target, k, b) is not False for k, _, b in METRICS)]
    out["all"] = ok[0] if ok else None
    return out


def report(target_rows: list[dict[str, Any]], curves: dict[str, list[dict[str, Any]]], a: argparse.Namespace,
           out: Path) -> dict[str, Any]:
    """The table: per run, its last evaluation and the steps at which it first matches the target (the baseline's
    last evaluation at --target-steps); ratio = target steps / those steps."""
    evaluated = [r for r in target_rows if "fid" in r]
    if not evaluated:
        raise SystemExit("no evaluation of the baseline's target run yet: train and evaluate it first")
    target = evaluated[-1]
    table = {}

    def fmt(x: Any, spec: str) -> str:
        return "-" if x is None else format(x, spec)

    print(f"\ntarget: baseline at step {target['step']}: val/mse {target['val_mse']:.4f}, FID {target['fid']:.2f}, "
          f"digit accuracy {target['digit_accuracy']:.1%} (guidance {a.guidance:g})")
    print(f"{'run':<18} {'val/mse':>8} {'FID':>7} {'acc':>6} | first step at the target: {'mse':>5} {'FID':>5} "
          f"{'acc':>5} {'all':>5} | ratio")
    for name, rows in curves.items():
        if not rows:
            continue
        reach = steps_to_reach(rows, target)
        last = [r for r in rows if "fid" in r][-1] if any("fid" in r for r in rows) else None
        if last is None:
            continue
        ratio = target["step"] / reach["all"] if reach["all"] else None
        table[name] = {"final": last, "steps_to_target": reach, "ratio": ratio}
        print(f"{name:<18} {fmt(last['val_mse'], '8.4f'):>8} {last['fid']:7.2f} {last['digit_accuracy']:6.1%} | "
              f"{'':>25}{fmt(reach['val_mse'], '5d'):>5} {fmt(reach['fid'], '5d'):>5} "
              f"{fmt(reach['digit_accuracy'], '5d'):>5} {fmt(reach['all'], '5d'):>5} | "
              f"{fmt(ratio, '.2f') if ratio else '< ' + format(target['step'] / last['step'], '.2f')}")
    plot = plot_curves(curves, target, a.plot)
    result = {"target": target, "runs": table, "curves": curves, "plot": str(plot),
              "settings": {k: str(v) for k, v in vars(a).items()}}
    (out / "time_to_quality.json").write_text(json.dumps(result, indent=1))
    print(f"wrote {out / 'time_to_quality.json'} and {plot}")
    return result


def plot_curves(curves: dict[str, list[dict[str, Any]]], target: dict[str, Any], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    # one colour per run in every panel (a run without val/mse in the baseline's terms is absent from the first)
    colour = {name: f"C{i}" for i, name in enumerate(curves)}
    for ax, (key, label, _) in zip(axes, METRICS):
        for name, rows in curves.items():
            pts = [(r["step"], r[key]) for r in rows if r.get(key) is not None]
            if pts:
                ax.plot(*zip(*pts), marker="o", ms=3, color=colour[name], label=name)
        if target.get(key) is not None:
            ax.axhline(target[key], color="grey", ls="--", lw=1, label=f"target (baseline at {target['step']})")
        ax.set_xlabel("training step (batch 64)")
        ax.set_title(label + (" (runs with the baseline's target)" if key == "val_mse" else ""))
        ax.grid(alpha=0.3)
    axes[1].legend(fontsize=8)  # the FID panel has every evaluated run
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def posthoc(spec: str, p: dict[str, Path], out: Path, a: argparse.Namespace) -> list[dict[str, Any]]:
    """RUN:STEP (RUN as in runs/, e.g. baseline-400) -> FID and digit accuracy of the post-hoc EMAs of --sigma-rels
    reconstructed at STEP, beside the run's tracked EMA (train.ema_decay) at that step."""
    name, step = spec.split(":")
    run_dir, rows = out / "runs" / name, []
    tracked = evaluate(run_dir / "checkpoints" / f"step_{int(step):08d}",
                       run_dir / "quality" / f"step_{int(step):08d}.json", p, a)
    rows.append({"ema": "tracked (train.ema_decay 0.995)", **tracked})
    for s in a.sigma_rels.split(","):
        dest = run_dir / "posthoc" / f"sigma_{float(s):.3f}_step{int(step):08d}"
        if not (dest / "COMPLETE").exists():
            run([bin_of("ldmscale-ema"), str(run_dir), "--sigma-rel", s, "--step", step, "--out", str(dest)],
                out / "logs" / f"ema_{name}.log")
        rows.append({"ema": f"post-hoc sigma_rel {float(s):.3f}",
                     **evaluate(dest, run_dir / "posthoc" / f"quality_{float(s):.3f}_{int(step):08d}.json", p, a)})
    print(f"\n{name} at step {step}:\n{'EMA':<34} {'FID':>7} {'acc':>6}")
    for r in rows:
        print(f"{r['ema']:<34} {r['fid']:7.2f} {r['digit_accuracy']:6.1%}")
    (out / f"posthoc_{name}_{step}.json").write_text(json.dumps(rows, indent=1))
    return rows


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=REPO / "ttq_out")
    ap.add_argument("--recipes", default=",".join(RECIPES), help=f"comma-separated, from {list(RECIPES)}")
    ap.add_argument("--target-steps", type=int, default=800,
                    help="the baseline run whose last evaluation is the target (the demo's 800 steps)")
    ap.add_argument("--budget", type=int, default=800,
                    help="train.max_steps of every recipe's run (the LR schedule's length); 400 asks 'the same "
                         "quality in half the samples' directly")
    ap.add_argument("--eval-every", type=int, default=100, help="val/mse every N steps")
    ap.add_argument("--quality-every", type=int, default=100,
                    help="FID and digit accuracy every N steps (a multiple of --eval-every)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--guidance", type=float, default=2.0, help="classifier-free guidance of the FID/accuracy images")
    ap.add_argument("--ckpt-every", type=int, default=0,
                    help="checkpoints (all kept, so later steps can be evaluated afterwards); 0 = --quality-every")
    ap.add_argument("--sample-steps", type=int, default=30, help="DPM-Solver++ steps per image")
    ap.add_argument("--track-sigma-rels", default="0.05,0.10", help="train.posthoc_ema.sigma_rels of every run")
    ap.add_argument("--posthoc", action="append", default=[], help="RUN:STEP (e.g. baseline-400:400) to reconstruct "
                                                                   "post-hoc EMAs at")
    ap.add_argument("--sigma-rels", default="0.02,0.05,0.10,0.15,0.20", help="post-hoc EMA lengths to evaluate")
    ap.add_argument("--report-only", action="store_true", help="no training: evaluate and report what exists")
    ap.add_argument("--plot", type=Path, default=REPO / "docs/results/time-to-quality.png")
    a = ap.parse_args(argv)
    names = [n for n in a.recipes.split(",") if n]
    unknown = [n for n in names if n not in RECIPES]
    if unknown:
        raise SystemExit(f"unknown recipe(s) {unknown}; choose from {list(RECIPES)}")
    a.out.mkdir(parents=True, exist_ok=True)
    p = prepare(a.out)
    # one after another: each run trains and is evaluated alone on the machine; the target first
    runs = [("baseline", a.target_steps)]
    runs += [(n, a.budget) for n in names if (n, a.budget) != ("baseline", a.target_steps)]
    curves = {}
    for name, steps in runs:
        if not a.report_only:
            train(name, steps, p, a.out, a)
        curves[run_name(name, steps)] = curve(name, steps, p, a.out, a)
    report(curves[run_name("baseline", a.target_steps)], curves, a, a.out)
    for spec in a.posthoc:
        posthoc(spec, p, a.out, a)


if __name__ == "__main__":
    main()
