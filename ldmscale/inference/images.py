"""Writing drawn images: one PNG each, a samples.json index, and a grid labelled with the prompts."""

from __future__ import annotations

import json
import re
from pathlib import Path

from PIL import Image, ImageDraw


def labelled_grid(images: list[Image.Image], labels: list[str], cols: int, min_cell: int = 96) -> Image.Image:
    """Rows of `cols` images; each row's label (the prompt) on its left. Images of mixed sizes (aspect buckets)
    share one cell size, the largest width by the largest height, each centred in its cell at one common integer
    scale, so their relative sizes stay true. Small images are upscaled."""
    w, h = max(img.width for img in images), max(img.height for img in images)
    scale = max(1, -(-min_cell // max(w, h)))
    cw, ch = w * scale, h * scale
    rows = -(-len(images) // cols)
    label_w = max(120, 7 * max(len(lb) for lb in labels) + 10)
    grid = Image.new("RGB", (label_w + cols * (cw + 2), rows * (ch + 2)), "white")
    draw = ImageDraw.Draw(grid)
    for i, img in enumerate(images):
        r, c = divmod(i, cols)
        iw, ih = img.width * scale, img.height * scale
        grid.paste(img.resize((iw, ih), Image.Resampling.NEAREST),
                   (label_w + c * (cw + 2) + (cw - iw) // 2, r * (ch + 2) + (ch - ih) // 2))
        if c == 0:
            draw.text((4, r * (ch + 2) + ch // 2 - 6), labels[i], fill="black")
    return grid


def slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")[:48]


def write_samples(images: list[Image.Image], prompts: list[str], out: Path, cols: int, meta: dict) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    records = []
    for i, (img, p) in enumerate(zip(images, prompts)):
        name = f"{i:04d}_{slug(p)}.png"
        img.save(out / name)
        records.append({"file": name, "prompt": p, "index": i, **meta})
    (out / "samples.json").write_text(json.dumps(records, indent=1))
    grid = labelled_grid(images, prompts, cols)
    grid.save(out / "grid.png")
    return out / "grid.png"


