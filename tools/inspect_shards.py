"""Look inside LAION-layout shards: samples per shard, json field statistics, optional contact sheet.

    python tools/inspect_shards.py DIR_OR_TAR [...] [--contact-sheet out.png --n 16 --cols 8]

Counts come from the tar members themselves (not the parquet), so a shard whose tar and index disagree
shows up as a mismatch in the parquet_rows column.
"""

from __future__ import annotations

import argparse
import io
import json
import math
import statistics
import sys
import textwrap
from collections import Counter
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
from PIL import Image, ImageDraw, ImageFont
from tqdm import tqdm

from ldmscale.data.shard_writer import iter_tar_samples

NUMERIC_FIELDS = ("width", "height", "original_width", "original_height", "similarity")
# Fields every img2dataset row has; anything else (label, style, ...) is reported as a category if small.
STANDARD_FIELDS = {
    "url", "caption", "key", "status", "error_message", "width", "height", "original_width",
    "original_height", "exif", "sha256", "NSFW", "similarity", "LICENSE",
}
MAX_CATEGORIES = 20


def find_tars(paths: list[str | Path]) -> list[Path]:
    tars: list[Path] = []
    for p in map(Path, paths):
        tars.extend(sorted(p.glob("*.tar")) if p.is_dir() else [p])
    return tars


def _summary(values: list[float]) -> dict[str, float]:
    if not values:
        return {}
    return {"min": min(values), "mean": statistics.fmean(values), "max": max(values)}


def inspect_shards(tars: list[Path], progress: bool = True) -> dict[str, Any]:
    """Per-shard sample counts and statistics of the json fields over all shards."""
    shards, numeric, caption_len = [], {f: [] for f in NUMERIC_FIELDS}, []
    nsfw, status, extras = Counter(), Counter(), {}
    for tar in tqdm(tars, desc="inspect", unit="shard", disable=not progress):
        count = missing_json = 0
        for sample in iter_tar_samples(tar):
            count += 1
            if "json" not in sample:  # a half sample from a truncated tar
                missing_json += 1
                continue
            meta = json.loads(sample["json"])
            for f in NUMERIC_FIELDS:
                if isinstance(meta.get(f), (int, float)):
                    numeric[f].append(float(meta[f]))
            caption_len.append(len(meta.get("caption") or ""))
            nsfw[str(meta.get("NSFW"))] += 1
            status[str(meta.get("status"))] += 1
            for k, v in meta.items():
                if k not in STANDARD_FIELDS and isinstance(v, (str, int, float, bool)):
                    extras.setdefault(k, Counter())[v] += 1
        index = tar.with_suffix(".parquet")
        rows = pq.read_metadata(index).num_rows if index.exists() else None
        shards.append(
            {"shard": str(tar), "samples": count, "parquet_rows": rows, "missing_json": missing_json}
        )
    return {
        "shards": shards,
        "total_samples": sum(s["samples"] for s in shards),
        "fields": {f: _summary(v) for f, v in numeric.items()},
        "caption_length": _summary(caption_len),
        "NSFW": dict(nsfw),
        "status": dict(status),
        "categories": {k: dict(sorted(c.items())) for k, c in extras.items() if len(c) <= MAX_CATEGORIES},
    }


def print_report(report: dict[str, Any]) -> None:
    print(f"{'shard':<50} {'samples':>8} {'parquet_rows':>12}")
    for s in report["shards"]:
        rows = "-" if s["parquet_rows"] is None else s["parquet_rows"]
        flag = "  MISMATCH" if s["parquet_rows"] not in (None, s["samples"]) else ""
        print(f"{s['shard']:<50} {s['samples']:>8} {rows:>12}{flag}")
    print(f"total samples: {report['total_samples']} in {len(report['shards'])} shards")
    for name, summ in [*report["fields"].items(), ("caption_length", report["caption_length"])]:
        if summ:
            print(f"{name:<16} min {summ['min']:.4g}  mean {summ['mean']:.4g}  max {summ['max']:.4g}")
    print(f"NSFW: {report['NSFW']}")
    print(f"status: {report['status']}")
    for k, counts in report["categories"].items():
        print(f"{k}: {counts}")


def contact_sheet(
    tar: Path, out: Path, n: int = 16, cols: int = 8, thumb: int = 128, caption_height: int = 40
) -> Image.Image:
    """Grid of the first n images of a shard, each with its caption drawn in a band below it.

    The sheet is cols*thumb wide and rows*(thumb+caption_height) high; captions that do not fit are cut.
    """
    samples = []
    for sample in iter_tar_samples(tar):
        if "jpg" in sample:
            samples.append(sample)
        if len(samples) == n:
            break
    cols = max(1, min(cols, len(samples)))
    rows = max(1, math.ceil(len(samples) / cols))
    sheet = Image.new("RGB", (cols * thumb, rows * (thumb + caption_height)), "white")
    draw = ImageDraw.Draw(sheet)
    font = ImageFont.load_default()
    line_h = font.getbbox("Ag")[3] + 2
    chars = max(4, thumb // 6)  # the default font is ~6 px per character
    for i, sample in enumerate(samples):
        x, y = (i % cols) * thumb, (i // cols) * (thumb + caption_height)
        image = Image.open(io.BytesIO(sample["jpg"])).convert("RGB")
        scale = thumb / max(image.size)
        size = (round(image.width * scale), round(image.height * scale))
        image = image.resize(size, Image.Resampling.BICUBIC)
        sheet.paste(image, (x + (thumb - image.width) // 2, y + (thumb - image.height) // 2))
        caption = sample.get("txt", b"").decode("utf-8", "replace")
        for j, line in enumerate(textwrap.wrap(caption, chars)[: max(1, caption_height // line_h)]):
            draw.text((x + 2, y + thumb + 1 + j * line_h), line, fill="black", font=font)
    out.parent.mkdir(parents=True, exist_ok=True)
    sheet.save(out)
    return sheet


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("paths", nargs="+", help="shard folders and/or .tar files")
    parser.add_argument("--contact-sheet", type=Path, help="write a PNG grid of the first shard's images")
    parser.add_argument("--n", type=int, default=16, help="images on the contact sheet")
    parser.add_argument("--cols", type=int, default=8)
    parser.add_argument("--thumb", type=int, default=128, help="cell size in pixels")
    parser.add_argument("--caption-height", type=int, default=40, help="caption band under each image, px")
    parser.add_argument("--json", type=Path, help="also write the statistics as JSON")
    args = parser.parse_args(argv)
    tars = find_tars(args.paths)
    if not tars:
        print(f"no .tar shards found in {args.paths}", file=sys.stderr)
        return 1
    report = inspect_shards(tars)
    print_report(report)
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))
    if args.contact_sheet:
        sheet = contact_sheet(tars[0], args.contact_sheet, args.n, args.cols, args.thumb, args.caption_height)
        print(f"contact sheet {sheet.size[0]}x{sheet.size[1]} of {tars[0]} -> {args.contact_sheet}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
