"""One picture from several `ldmscale-sample` folders drawn on different canvases (aspect buckets): a row per prompt,
each folder's images of that prompt side by side, at their true relative sizes (ldmscale.inference.images).

    python tools/aspect_grid.py samples-64x32 samples-48x48 samples-32x64 --per-folder 3 --out grid.png
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from PIL import Image

from ldmscale.inference.images import labelled_grid


def images_by_prompt(folder: Path) -> dict[str, list[Image.Image]]:
    """The images of one sample folder, grouped by prompt in the order samples.json lists them."""
    index = folder / "samples.json"
    if not index.is_file():
        raise SystemExit(f"aspect_grid: {folder} has no samples.json: give folders ldmscale-sample --out wrote")
    out: dict[str, list[Image.Image]] = {}
    for record in json.loads(index.read_text()):
        out.setdefault(record["prompt"], []).append(Image.open(folder / record["file"]).convert("RGB"))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("folders", nargs="+", type=Path, help="ldmscale-sample output folders, one per canvas")
    ap.add_argument("--per-folder", type=int, default=2, help="images of each prompt taken from each folder")
    ap.add_argument("--out", type=Path, required=True, help="the PNG to write")
    args = ap.parse_args()
    groups = [images_by_prompt(f) for f in args.folders]
    prompts = [p for p in groups[0] if all(p in g for g in groups)]
    if not prompts:
        raise SystemExit("aspect_grid: the folders share no prompt: sample them with the same --prompt list")
    images, labels = [], []
    for prompt in prompts:
        for folder, group in zip(args.folders, groups):
            if len(group[prompt]) < args.per_folder:
                raise SystemExit(f"aspect_grid: {folder} has {len(group[prompt])} images of {prompt!r}, fewer than "
                                 f"--per-folder {args.per_folder}: sample more (--num-images) or lower --per-folder")
            images += group[prompt][: args.per_folder]
        labels += [prompt] * (args.per_folder * len(groups))
    labelled_grid(images, labels, cols=args.per_folder * len(groups)).save(args.out)
    print(f"{args.out}: {len(prompts)} prompts x {len(groups)} canvases x {args.per_folder}")


if __name__ == "__main__":
    main()
