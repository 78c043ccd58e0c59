"""LAION-layout shards from your own captioned images.

    python tools/make_shards.py IMAGE_DIR --out DIR      # sidecar captions: cat.jpg + cat.txt
    python tools/make_shards.py table.parquet --out DIR  # or .csv; columns path, caption (+ any extra)

Table paths may be relative to the table's folder. A `url` column becomes the json url; every other column is
carried into each sample's json (e.g. `style`, `label`).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Iterator
from pathlib import Path

import pyarrow.csv as pacsv
import pyarrow.parquet as pq
from PIL import Image

from ldmscale.data.shard_writer import ShardSample, write_laion_shards

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff"}


def _load(path: Path) -> Image.Image:
    with Image.open(path) as im:
        im.load()  # read now so the file handle closes; shards may hold thousands of images
        return im


def folder_samples(folder: Path) -> Iterator[ShardSample]:
    """Images with a same-named .txt caption beside them; images without one are skipped with a note."""
    for path in sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES):
        caption_path = path.with_suffix(".txt")
        if not caption_path.exists():
            print(f"skip {path}: no {caption_path.name}", file=sys.stderr)
            continue
        caption = caption_path.read_text(encoding="utf-8").strip()
        yield ShardSample(image=_load(path), caption=caption, url=path.resolve().as_uri())


def table_samples(table_path: Path) -> Iterator[ShardSample]:
    """Rows of a parquet/csv with columns path and caption; other columns go into the json."""
    if table_path.suffix == ".csv":
        table = pacsv.read_csv(table_path)
    else:
        table = pq.read_table(table_path)
    missing = {"path", "caption"} - set(table.column_names)
    if missing:
        raise SystemExit(f"{table_path} lacks column(s) {sorted(missing)}; has {table.column_names}")
    for row in table.to_pylist():
        path = Path(row.pop("path"))
        path = path if path.is_absolute() else table_path.parent / path
        caption = str(row.pop("caption"))
        url = str(row.pop("url", None) or path.resolve().as_uri())
        yield ShardSample(image=_load(path), caption=caption, url=url, extra=row)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("source", type=Path, help="image folder with .txt sidecars, or a .parquet/.csv table")
    parser.add_argument("--out", required=True, type=Path)
    parser.add_argument("--samples-per-shard", type=int, default=1000)
    parser.add_argument("--image-size", type=int, default=None, help="border-resize to this square size")
    parser.add_argument("--jpeg-quality", type=int, default=95)
    parser.add_argument("--start-shard", type=int, default=0, help="first shard number (append to a folder)")
    args = parser.parse_args(argv)
    samples = folder_samples(args.source) if args.source.is_dir() else table_samples(args.source)
    tars = write_laion_shards(
        samples,
        args.out,
        samples_per_shard=args.samples_per_shard,
        image_size=args.image_size,
        jpeg_quality=args.jpeg_quality,
        start_key=args.start_shard,
    )
    print(f"wrote {len(tars)} shards to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
