"""Does a style model follow a continuous style, on hues seen in training and on a band it never saw?

    python tools/bench/style_colour.py --data DATA --text-run RUN1 --style-run RUN2 [RUN2b ...] [--json out.json]

DATA is tools/make_style_colour_shards.py's output: every image has its own (ink, background) colour pair,
and DATA/heldout_unseen holds references whose ink hue lies in a band kept out of training. For each set
(seen, unseen), `--refs` held-out references are drawn (seeded); each one's prompt asks for ANOTHER digit, so
copying the reference's content would be wrong. The text-only (step-1) model draws the same prompts and
seeds without a reference: what colours come out when the reference is ignored.

- Colour error: the mean of the ink and the background colour distances (RGB Euclidean, 0..441) between a
  generated image and its reference's true colours; the generated colours are measured as in style_follow.py
  (median border colour = background, the farthest 10% of pixels = ink).
- Digit accuracy: style_follow.py's classifier on ink intensity, trained on the held-out real digits.
- Ceilings, measured the same way: real (the prompted held-out digit rendered in the reference's colours at
  the model's resolution) and vae (the reference through the run's autoencoder: what the latents can hold).
- Diagnostics per style run: kl = the run's logged KL in nats per sample (mean of the last 5 logged steps up to
  the checkpoint) and probe = the colour error of a ridge regression from the posterior-mean tokens to the
  true colours (fit on half the seen held-out images, scored on the other half and on all unseen ones):
  whether the encoder keeps the colours at all, apart from whether the U-Net follows them.

Several --style-run values (ablation runs, or the step_* checkpoints of one run for an error-vs-steps curve)
are scored in one process against one text-model draw: the rows are side by side.
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
from sklearn.datasets import load_digits
from sklearn.svm import SVC

from ldmscale.data.shard_writer import iter_tar_samples
from ldmscale.demo.styled_digits import render_styled
from ldmscale.eval.style_follow import add_sampling_args, bench_main, colour_error, content_features, draw, probe_error

SETS = ("seen", "unseen")
FOLDERS = {"seen": "heldout", "unseen": "heldout_unseen"}


def load_set(folder: Path) -> list[dict[str, Any]]:
    out = []
    for tar in sorted(folder.glob("*.tar")):
        for s in iter_tar_samples(tar):
            meta = json.loads(s["json"])
            out.append({"label": int(meta["label"]), "ink": np.array(meta["ink"], float),
                        "bg": np.array(meta["bg"], float),
                        "index": int(meta["url"].split("/")[-1].split("#")[0]),  # into load_digits()
                        "rgb": np.asarray(Image.open(io.BytesIO(s["jpg"])).convert("RGB"))})
    if not out:
        raise SystemExit(f"no colour digit shards in {folder}; write them with tools/make_style_colour_shards.py")
    return out


def pick_refs(pool: list[dict[str, Any]], n: int, seed: int,
              ref_digit: int | None = None) -> tuple[list[dict[str, Any]], list[int]]:
    """n references and the digit each prompt asks for (cycling 0..9, never the reference's own digit); with
    `ref_digit` every reference shows that digit and the prompts cycle over the other nine."""
    rng = random.Random(seed)
    prompt_digits = [d for d in range(10) if d != ref_digit]
    refs, digits = [], []
    for i in range(n):
        d = prompt_digits[i % len(prompt_digits)]
        refs.append(rng.choice([h for h in pool if h["label"] != d and ref_digit in (None, h["label"])]))
        digits.append(d)
    return refs, digits


def resize(rgb: np.ndarray, res: int) -> np.ndarray:
    return np.asarray(Image.fromarray(rgb).resize((res, res), Image.Resampling.BICUBIC))


def logged_kl(run: Path) -> float | None:
    """Mean KL of the last 5 logged steps up to the checkpoint (a run dir: up to its end)."""
    step = int(run.name.split("_")[1]) if run.name.startswith("step_") else None
    for d in (run, *run.parents):
        if (d / "log.jsonl").exists():
            rows = [json.loads(x) for x in (d / "log.jsonl").read_text().splitlines() if '"kl"' in x]
            rows = [r for r in rows if "step" in r and (step is None or r["step"] <= step)]
            return float(np.mean([r["kl"] for r in rows[-5:]])) if rows else None
    return None


def score(images: list[np.ndarray], refs: list[dict[str, Any]], digits: list[int], clf: SVC) -> dict[str, float]:
    pred = clf.predict(np.stack([content_features(im) for im in images]))
    err = [colour_error(im, r["ink"], r["bg"]) for im, r in zip(images, refs)]
    return {"colour_error": float(np.mean(err)), "digits": float(np.mean(pred == np.array(digits)))}


def run_benchmark(args: argparse.Namespace) -> dict[str, Any]:
    from ldmscale.checkpoint import load_trained
    from ldmscale.data import to_tensor

    pools = {k: load_set(args.data / FOLDERS[k]) for k in SETS}
    clf = SVC(gamma=0.001).fit(np.stack([content_features(h["rgb"]) for h in pools["seen"]]),
                               [h["label"] for h in pools["seen"]])
    picked = {k: pick_refs(pools[k], args.refs, args.seed + i, args.ref_digit) for i, k in enumerate(SETS)}
    refs = {k: picked[k][0] for k in SETS}
    digits = picked["seen"][1]  # both sets cycle the same digits: one text-model draw serves both
    prompts = [f"a handwritten digit {d}" for d in digits]
    text = load_trained(args.text_run, "ema", args.device)
    res = text.cfg.data.resolution
    by_digit = {d: [h for h in pools["seen"] if h["label"] == d] for d in range(10)}
    rng, digit_images = random.Random(args.seed), load_digits().images
    rows: dict[str, Any] = {"real": {}, "vae": {}}
    for k in SETS:  # ceilings: the prompted digit rendered in the reference's colours; the reference via the VAE
        real = [resize(np.asarray(render_styled(digit_images[rng.choice(by_digit[d])["index"]], r["ink"], r["bg"])),
                       res) for r, d in zip(refs[k], digits)]
        rows["real"][k] = score(real, refs[k], digits, clf)
        pix = to_tensor([resize(r["rgb"], res) for r in refs[k]])
        rec = text.encoders.decode_latents(text.encoders.encode_images(pix, None))
        rec_rgb = list(((rec + 1) * 127.5).round().clamp(0, 255).byte().permute(0, 2, 3, 1).cpu().numpy())
        rows["vae"][k] = {"colour_error": score(rec_rgb, refs[k], [r["label"] for r in refs[k]], clf)["colour_error"]}
    del text
    grid = {}
    if not args.probe_only:
        grid["text"] = draw(args.text_run, prompts, None, args)
        rows["text"] = {k: score(grid["text"], refs[k], digits, clf) for k in SETS}
    for run in args.style_run:
        m = load_trained(run, args.weights, args.device)
        assert m.style is not None, f"{run} is not a style-conditioned run"
        tokens = {k: m.style.tokens(to_tensor([resize(r["rgb"], res) for r in pools[k]])).flatten(1).numpy()
                  for k in SETS}  # every held-out image: the probe needs more examples than the 128+ token dims
        del m
        row: dict[str, Any] = {"kl": logged_kl(Path(run)), "probe": probe_error(tokens, pools)}
        if args.probe_only:
            rows[str(run)] = row
            continue
        for k in SETS:
            images = draw(run, prompts, [r["rgb"] for r in refs[k]], args)
            row[k] = score(images, refs[k], digits, clf)
            grid[f"{run}:{k}"] = images
        rows[str(run)] = row
    rows["draw_images"] = grid
    rows["ref_images"] = {k: [resize(r["rgb"], res) for r in refs[k]] for k in SETS}
    return rows


def print_report(r: dict[str, Any], args: argparse.Namespace) -> None:
    print(f"{args.refs} references per set, {args.steps} dpmsolver++ steps, text guidance {args.guidance_scale}, "
          f"style guidance {args.style_scale}; colour error = mean RGB distance of ink and background (0..441)")
    head = (f"{'model':44}{'KL nats':>8}{'err seen':>9}{'err unseen':>11}{'digits seen':>12}{'digits unseen':>14}"
            f"{'probe s/u':>12}")
    print(head)
    for name, row in r.items():
        if name.endswith("_images"):
            continue
        kl = f"{row['kl']:.1f}" if row.get("kl") is not None else "-"
        probe = f"{row['probe']['seen']:.0f}/{row['probe']['unseen']:.0f}" if "probe" in row else "-"
        seen, unseen = row.get("seen", {}), row.get("unseen", {})
        dig = [f"{x['digits']:.1%}" if "digits" in x else "-" for x in (seen, unseen)]
        err = [f"{x['colour_error']:.1f}" if x else "-" for x in (seen, unseen)]
        label = name if len(name) <= 43 else "..." + name[-40:]
        print(f"{label:44}{kl:>8}{err[0]:>9}{err[1]:>11}{dig[0]:>12}{dig[1]:>14}{probe:>12}")


def save_grid(r: dict[str, Any], path: Path, per_row: int = 20) -> None:
    """Rows: seen references, then for each run its seen and unseen draws, unseen references, text model."""
    rows = [np.concatenate(r["ref_images"]["seen"][:per_row], axis=1)]
    for name, ims in r["draw_images"].items():
        if name.endswith(":unseen"):
            rows.append(np.concatenate(r["ref_images"]["unseen"][:per_row], axis=1))
        rows.append(np.concatenate(ims[:per_row], axis=1))
    img = np.concatenate(rows, axis=0)
    Image.fromarray(img).resize((img.shape[1] * 2, img.shape[0] * 2), Image.Resampling.NEAREST).save(path)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", type=Path, required=True, help="make_style_colour_shards.py output folder")
    p.add_argument("--text-run", type=Path, required=True, help="step-1 (text-only) run dir or checkpoint")
    p.add_argument("--style-run", type=Path, nargs="+", default=[], help="step-2 run dirs or step_* checkpoints")
    p.add_argument("--refs", type=int, default=100, help="references per set (seen, unseen)")
    p.add_argument("--ref-digit", type=int, choices=range(10), default=None,
                   help="every reference shows this digit (prompts: the other nine), e.g. 0: a lot of ink")
    p.add_argument("--probe-only", action="store_true", help="KL and token probe only: no drawing")
    add_sampling_args(p)
    p.add_argument("--grid", type=Path, help="PNG: references and draws, one row each")
    return bench_main(p, argv, run_benchmark, print_report, save_grid)


if __name__ == "__main__":
    sys.exit(main())
