"""Do generated images show the prompted digit?

    python tools/bench/digit_accuracy.py SAMPLES_DIR --heldout DATA/heldout [--json out.json]
    python tools/bench/digit_accuracy.py --eval-dir EVAL_OUT --heldout DATA/heldout --train DATA/train

The second form reads an `ldmscale-eval` output folder: digit accuracy per guidance scale next to its FID,
the digits' stand-in for CLIP score (prompt adherence), plotted as FID against accuracy; plus the FID floor,
real training digits against the held-out ones with the same feature extractor and number of images.

SAMPLES_DIR is what ldmscale-sample writes: PNGs plus samples.json, a list of {"file", "prompt", ...}; the
digit is parsed from the prompt ("a handwritten digit 7"). A classifier (SVC on 8x8 load_digits-style
features) is trained only on the held-out real digits from make_digit_shards, which the diffusion model
never saw. Its cross-validated accuracy on those real digits is the ceiling; the generated accuracy is read
against it (ratio = generated / real).
"""

from __future__ import annotations

import argparse
import io
import json
import sys
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from sklearn.model_selection import StratifiedKFold, cross_val_predict
from sklearn.svm import SVC

from ldmscale.data.shard_writer import iter_tar_samples
from ldmscale.demo.digit_features import digit_features, parse_digit


def load_heldout(shard_dir: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """Features and labels of the held-out digit shards (label from the json, else from the caption)."""
    features, labels = [], []
    for tar in sorted(Path(shard_dir).glob("*.tar")):
        for sample in iter_tar_samples(tar):
            if "jpg" not in sample:
                continue
            meta = json.loads(sample["json"]) if "json" in sample else {}
            label = meta.get("label")
            if label is None:
                label = parse_digit(sample.get("txt", b"").decode("utf-8"))
            if label is None:
                continue
            features.append(digit_features(Image.open(io.BytesIO(sample["jpg"]))))
            labels.append(int(label))
    if not labels:
        raise SystemExit(f"no labelled digit shards in {shard_dir}")
    return np.stack(features), np.array(labels)


def load_generated(samples_dir: str | Path) -> tuple[np.ndarray, np.ndarray, int]:
    """Features and prompted digits of a samples folder; also how many entries named no digit."""
    folder = Path(samples_dir)
    entries = json.loads((folder / "samples.json").read_text())
    features, labels, skipped = [], [], 0
    for entry in entries:
        digit = parse_digit(str(entry.get("prompt", "")))
        if digit is None:
            skipped += 1
            continue
        with Image.open(folder / entry["file"]) as image:
            features.append(digit_features(image))
        labels.append(digit)
    return (np.stack(features) if features else np.zeros((0, 64))), np.array(labels, dtype=int), skipped


def _per_digit(truth: np.ndarray, predicted: np.ndarray) -> dict[int, float | None]:
    """Accuracy per true digit; None for a digit with no samples (an empty mean would be NaN)."""
    return {d: float(np.mean(predicted[truth == d] == d)) if np.any(truth == d) else None for d in range(10)}


def run_benchmark(
    samples_dir: str | Path, heldout_dir: str | Path, folds: int = 5, seed: int = 0
) -> dict[str, Any]:
    """Real (cross-validated) and generated digit accuracy of one classifier trained on held-out digits."""
    real_x, real_y = load_heldout(heldout_dir)
    gen_x, gen_y, skipped = load_generated(samples_dir)

    def classifier() -> SVC:
        return SVC(gamma=0.001)  # scikit-learn's classic setting for 0..16 digit features

    real_pred = cross_val_predict(
        classifier(), real_x, real_y, cv=StratifiedKFold(folds, shuffle=True, random_state=seed)
    )
    gen_pred = classifier().fit(real_x, real_y).predict(gen_x) if len(gen_y) else np.zeros(0, dtype=int)
    real_acc = float(np.mean(real_pred == real_y))
    gen_acc = float(np.mean(gen_pred == gen_y)) if len(gen_y) else 0.0
    return {
        "real_accuracy": real_acc,
        "generated_accuracy": gen_acc,
        "ratio": gen_acc / real_acc if real_acc else 0.0,
        "n_real": len(real_y),
        "n_generated": len(gen_y),
        "n_skipped_no_digit": skipped,
        "real_per_digit": _per_digit(real_y, real_pred),
        "generated_per_digit": _per_digit(gen_y, gen_pred),
        "generated_count_per_digit": {d: int(np.sum(gen_y == d)) for d in range(10)},
        "classifier": "SVC(gamma=0.001) on 8x8 load_digits-style features",
        "folds": folds,
    }


def print_report(r: dict[str, Any]) -> None:
    def fmt(x: float | None) -> str:
        return "   -" if x is None else f"{x:6.1%}"

    print(f"classifier: {r['classifier']}, trained on {r['n_real']} held-out real digits")
    print(f"{'digit':>5} {'real (cv)':>10} {'generated':>10} {'n_gen':>6}")
    for d in range(10):
        n = r["generated_count_per_digit"][d]
        print(f"{d:>5} {fmt(r['real_per_digit'][d]):>10} {fmt(r['generated_per_digit'][d]):>10} {n:>6}")
    real, gen = fmt(r["real_accuracy"]), fmt(r["generated_accuracy"])
    print(f"{'all':>5} {real:>10} {gen:>10} {r['n_generated']:>6}")
    chance = 0.1 / r["real_accuracy"] if r["real_accuracy"] else 0.0
    print(f"generated / real accuracy ratio: {r['ratio']:.3f}  (random images would give ~{chance:.3f})")
    if r["n_skipped_no_digit"]:
        print(f"skipped {r['n_skipped_no_digit']} samples whose prompt names no digit")


def real_floor_fid(train_dir: Path, heldout_dir: Path, features: str, resolution: int | tuple[int, int],
                   n: int) -> float:
    """FID of n real training digits against the held-out digits: what a perfect model would score with the
    same features and sample size (FID is biased upward at small n)."""
    import torch

    from ldmscale.eval.fid import build_fid
    from ldmscale.eval.reference import rank_batches

    fid = build_fid(features, torch.device("cpu"))
    for batch in rank_batches(str(heldout_dir), resolution, 0, 1, 256):
        fid.update(batch, real=True)
    for batch in rank_batches(str(train_dir), resolution, 0, 1, 256, limit=n):
        fid.update(batch, real=False)
    return float(fid.compute())


def run_sweep(eval_dir: Path, heldout_dir: Path, train_dir: Path | None, folds: int, seed: int) -> dict[str, Any]:
    """Digit accuracy of every guidance scale's images in an ldmscale-eval folder, beside its FID."""
    from ldmscale.eval.generate import image_path
    from ldmscale.eval.report import plot_sweep

    report = json.loads((eval_dir / "eval.json").read_text())
    rows = []
    for r in report["results"]:
        bench = run_benchmark(image_path(eval_dir, r["guidance"], 0).parent, heldout_dir, folds, seed)
        rows.append({**r, "digit_accuracy": bench["generated_accuracy"], "real_accuracy": bench["real_accuracy"]})
    settings = report["settings"]
    floor = None
    if train_dir is not None:
        g = report["generation"]  # the canvas (height, width); a square side in eval folders of older versions
        canvas = (g["height"], g["width"]) if "height" in g else g["resolution"]
        floor = real_floor_fid(train_dir, heldout_dir, settings["features"], canvas, settings["num_images"])
    plot = plot_sweep(rows, eval_dir / "fid_vs_digit_accuracy.png",
                      f"{settings['num_images']} images, FID on {settings['features']}", x_key="digit_accuracy",
                      x_label="digit accuracy (SVC trained on held-out digits)")
    return {"results": rows, "floor_fid_real_train_vs_heldout": floor, "features": settings["features"],
            "num_images": settings["num_images"], "plot": str(plot)}


def print_sweep(s: dict[str, Any]) -> None:
    print(f"{'guidance':>8} {'FID':>9} {'digit acc':>10}   (FID on {s['features']}, {s['num_images']} images)")
    for r in s["results"]:
        print(f"{r['guidance']:>8g} {r['fid']:>9.3f} {r['digit_accuracy']:>10.1%}")
    if s["floor_fid_real_train_vs_heldout"] is not None:
        print(f"floor: real training digits vs held-out, same features and count: "
              f"FID {s['floor_fid_real_train_vs_heldout']:.3f}; real held-out digit accuracy (cv) "
              f"{s['results'][0]['real_accuracy']:.1%}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("samples", type=Path, nargs="?", help="folder with PNGs and samples.json")
    parser.add_argument("--eval-dir", type=Path, help="an ldmscale-eval output folder (eval.json): the sweep")
    parser.add_argument("--train", type=Path, help="training shards, for the sweep's real-vs-real FID floor")
    parser.add_argument("--heldout", required=True, type=Path, help="held-out shards from make_digit_shards")
    parser.add_argument("--folds", type=int, default=5)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, help="write the numbers here too")
    args = parser.parse_args(argv)
    if args.eval_dir is not None:
        sweep = run_sweep(args.eval_dir, args.heldout, args.train, args.folds, args.seed)
        print_sweep(sweep)
        if args.json:
            args.json.write_text(json.dumps(sweep, indent=2))
        return 0
    if args.samples is None:
        parser.error("give SAMPLES_DIR or --eval-dir")
    report = run_benchmark(args.samples, args.heldout, args.folds, args.seed)
    print_report(report)
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
