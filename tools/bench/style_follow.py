"""Does a style model follow both the text (the digit) and the style reference (the palette)?

    python tools/bench/style_follow.py --style-run RUN2 --text-run RUN1 --heldout DATA/heldout [--json out.json]

For every palette x digit, images are drawn with the prompt "a handwritten digit N"; the style model also
gets a reference: a held-out image of that palette showing ANOTHER digit (so copying the reference's content
would be wrong). The text-only (step-1) model draws from the same prompts and seeds with no reference.

- Content: tools/bench/digit_accuracy.py's classifier, trained only on held-out real digits. A coloured
  image is first mapped to ink intensity by each pixel's distance from its background colour (the median
  border colour) relative to its ink colour (the pixels farthest from the background).
- Style: the (ink, background) colour pair of each image, nearest palette of tools/make_style_digit_shards.py;
  accuracy = nearest palette == the reference's palette. Chance is 1 / palettes.
Real held-out images give both ceilings. Both models are printed side by side with style/text ratios.
"""

from __future__ import annotations

import argparse
import io
import json
import random
import sys
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from sklearn.svm import SVC

from ldmscale.data.shard_writer import iter_tar_samples
from ldmscale.demo.styled_digits import PALETTES
from ldmscale.eval.style_follow import add_sampling_args, bench_main, content_features, draw, nearest_palette


def load_heldout(folder: Path) -> list[dict[str, Any]]:
    out = []
    for tar in sorted(folder.glob("*.tar")):
        for s in iter_tar_samples(tar):
            if "jpg" in s and "json" in s:
                meta = json.loads(s["json"])
                out.append({"jpg": s["jpg"], "label": int(meta["label"]), "style": meta["style"],
                            "rgb": np.asarray(Image.open(io.BytesIO(s["jpg"])).convert("RGB"))})
    if not out:
        raise SystemExit(f"no palette digit shards in {folder}; write them with tools/make_style_digit_shards.py")
    return out


def run_benchmark(args: argparse.Namespace) -> dict[str, Any]:
    held = load_heldout(args.heldout)
    names = [p[0] for p in PALETTES]
    clf = SVC(gamma=0.001).fit(np.stack([content_features(h["rgb"]) for h in held]), [h["label"] for h in held])
    rng = random.Random(args.seed)
    prompts, targets, refs, ref_styles = [], [], [], []
    for p in names:
        pool = [h for h in held if h["style"] == p]
        for d in range(10):
            for _ in range(args.per_cell):
                ref = rng.choice([h for h in pool if h["label"] != d])  # another digit: content must come from text
                prompts.append(f"a handwritten digit {d}")
                targets.append(d)
                refs.append(ref["rgb"])
                ref_styles.append(names.index(p))
    results: dict[str, Any] = {"n": len(prompts), "palettes": names, "chance_style": 1 / len(names)}
    real_pal = [nearest_palette(h["rgb"]) == names.index(h["style"]) for h in held]
    results["real"] = {"content": None, "style": float(np.mean(real_pal))}  # the content ceiling is the SVC's cv
    for label, run, use_refs in (("style", args.style_run, True), ("text", args.text_run, False)):
        images = draw(run, prompts, refs if use_refs else None, args)
        pred = clf.predict(np.stack([content_features(im) for im in images]))
        pal = np.array([nearest_palette(im) for im in images])
        results[label] = {
            "content": float(np.mean(pred == np.array(targets))),
            "style": float(np.mean(pal == np.array(ref_styles))),
            "palette_histogram": {names[i]: int(np.sum(pal == i)) for i in range(len(names))},
        }
        results[f"{label}_images"] = images
    from sklearn.model_selection import cross_val_score

    feats = np.stack([content_features(h["rgb"]) for h in held])
    results["real"]["content"] = float(np.mean(cross_val_score(SVC(gamma=0.001), feats, [h["label"] for h in held],
                                                               cv=5)))
    return results


def print_report(r: dict[str, Any], args: argparse.Namespace) -> None:
    s, t, real = r["style"], r["text"], r["real"]
    print(f"{r['n']} images per model ({len(r['palettes'])} palettes x 10 digits x {args.per_cell}), "
          f"{args.steps} dpmsolver++ steps, text guidance {args.guidance_scale}, style guidance {args.style_scale}")
    print(f"{'':26}{'style model':>12}{'text model':>12}{'style/text':>11}{'real':>8}")
    for key, name in (("content", "content (digit) accuracy"), ("style", "style (palette) accuracy")):
        ratio = s[key] / t[key] if t[key] else float("inf")
        print(f"{name:26}{s[key]:>12.1%}{t[key]:>12.1%}{ratio:>11.2f}{real[key]:>8.1%}")
    print(f"style chance level: {r['chance_style']:.1%}")


def save_grid(r: dict[str, Any], path: Path, per_row: int = 20) -> None:
    rows = []
    for label in ("style", "text"):
        ims = r[f"{label}_images"][: per_row * 3]
        for i in range(0, len(ims), per_row):
            rows.append(np.concatenate(ims[i : i + per_row], axis=1))
    Image.fromarray(np.concatenate(rows, axis=0)).resize((rows[0].shape[1] * 2, len(rows) * rows[0].shape[0] * 2),
                                                         Image.Resampling.NEAREST).save(path)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--style-run", type=Path, required=True, help="step-2 run dir or checkpoint")
    p.add_argument("--text-run", type=Path, required=True, help="step-1 (text-only) run dir or checkpoint")
    p.add_argument("--heldout", type=Path, required=True, help="held-out shards of make_style_digit_shards")
    p.add_argument("--per-cell", type=int, default=2, help="images per palette x digit")
    add_sampling_args(p)
    p.add_argument("--grid", type=Path, help="PNG: first rows style model, then text model")
    return bench_main(p, argv, run_benchmark, print_report, save_grid)


if __name__ == "__main__":
    sys.exit(main())
