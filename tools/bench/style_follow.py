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
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from sklearn.svm import SVC

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tools"))
from bench.digit_accuracy import digit_features  # noqa: E402
from make_style_digit_shards import PALETTES  # noqa: E402

from ldmscale.data.shard_writer import iter_tar_samples  # noqa: E402
from ldmscale.style.attention import parse_block_scales  # noqa: E402


def colours(rgb: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """uint8 HWC -> (background colour, ink colour, ink intensity map in [0, 1])."""
    x = rgb.astype(np.float64)
    border = np.concatenate([x[:2].reshape(-1, 3), x[-2:].reshape(-1, 3), x[:, :2].reshape(-1, 3),
                             x[:, -2:].reshape(-1, 3)])
    bg = np.median(border, axis=0)
    dist = np.linalg.norm(x - bg, axis=-1)
    far = dist >= np.quantile(dist, 0.9)
    ink = x[far].mean(axis=0)
    scale = max(float(np.linalg.norm(ink - bg)), 1e-6)
    return bg, ink, np.clip(dist / scale, 0.0, 1.0)


def content_features(rgb: np.ndarray) -> np.ndarray:
    """Coloured digit -> load_digits-style 8x8 features via a black-on-white rendering of its ink."""
    _, _, t = colours(rgb)
    return digit_features(Image.fromarray((255.0 * (1.0 - t)).round().astype(np.uint8), mode="L"))


def nearest_palette(rgb: np.ndarray) -> int:
    bg, ink, _ = colours(rgb)
    d = [np.sum((ink - np.array(pi)) ** 2) + np.sum((bg - np.array(pb)) ** 2) for _, pi, pb in PALETTES]
    return int(np.argmin(d))


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


def draw(run: Path, prompts: list[str], refs: list[np.ndarray] | None, args: argparse.Namespace) -> list[np.ndarray]:
    from ldmscale.checkpoint import load_trained
    from ldmscale.data import to_tensor
    from ldmscale.inference.generate import generate
    from ldmscale.style.attention import set_style_scales

    m = load_trained(run, args.weights if refs is not None else "ema", args.device)  # the text run: its EMA
    res = m.cfg.data.resolution if m.cfg else None
    set_style_scales(m.unet, args.style_scale_blocks)
    tokens = None
    if refs is not None:
        assert m.style is not None, f"{run} is not a style-conditioned run"
        pix = to_tensor([np.asarray(Image.fromarray(r).resize((res, res), Image.Resampling.BICUBIC)) for r in refs])
        tokens = m.style.tokens(pix)
    images = generate(m.unet, m.encoders, m.scheduler_config, prompts, seed=args.seed, steps=args.steps,
                      guidance_scale=args.guidance_scale, sampler="dpmsolver++", resolution=res, batch_size=60,
                      style_tokens=tokens, style_scale=args.style_scale)
    return list((images.clamp(0, 1).permute(0, 2, 3, 1).numpy() * 255).round().astype(np.uint8))


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


def add_sampling_args(p: argparse.ArgumentParser) -> None:
    """The sampling settings both style benchmarks share (draw() reads them), and --json."""
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--guidance-scale", type=float, default=4.0)
    p.add_argument("--style-scale", type=float, default=3.0)
    p.add_argument("--style-scale-blocks", type=parse_block_scales, default=None, metavar="down=S,mid=S,up=S",
                   help="style attention weight per block group (ldmscale-sample's flag)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--weights", choices=["ema", "raw"], default="ema", help="the style runs' weights")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--json", type=Path)


def bench_main(p: argparse.ArgumentParser, argv: list[str] | None, run: Callable[[argparse.Namespace], dict[str, Any]],
               report: Callable[[dict[str, Any], argparse.Namespace], None],
               grid: Callable[[dict[str, Any], Path], None]) -> int:
    """Parse, run, print, save the grid (--grid) and the numbers (--json: every key but the *_images)."""
    args = p.parse_args(argv)
    r = run(args)
    report(r, args)
    if args.grid:
        grid(r, args.grid)
    if args.json:
        args.json.write_text(json.dumps({k: v for k, v in r.items() if not k.endswith("_images")}, indent=2))
    return 0


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
