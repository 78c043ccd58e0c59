"""Evaluation prompts from a file, and which image index each rank draws.

Image i uses prompt i % len(prompts) and the starting noise of index i (noise.Stream.SAMPLING), so an image
is the same whatever the world size; rank r draws the indices i with i % world == r.
"""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow.parquet as pq

from ldmscale.runtime.errors import InputError


class PromptError(InputError, ValueError):
    """A prompts file that cannot be read; the message names the file and the fix."""


def read_prompts(path: str | Path, column: str = "caption") -> list[str]:
    """Prompts from a .txt (one per line), .json (a list of strings or of records), .jsonl or .parquet file."""
    path = Path(path)
    try:
        prompts = _read(path, column)
    except PromptError:
        raise
    except Exception as e:  # malformed JSON, a binary file, a broken parquet: the file's fault, said in one line
        raise PromptError(f"{path} cannot be read as prompts ({type(e).__name__}: {str(e)[:160]}); give a .txt "
                          f"(one prompt per line), .json/.jsonl or .parquet file") from None
    if not prompts:
        raise PromptError(f"{path} holds no prompts: write one prompt per line (or give --prompt TEXT)")
    return prompts


def _read(path: Path, column: str) -> list[str]:
    if path.is_dir():
        if not sorted(path.glob("*.parquet")):
            raise PromptError(f"{path} is a folder without img2dataset .parquet files; give a prompts file")
        return [p for f in sorted(path.glob("*.parquet")) for p in _parquet_captions(f, column)]
    if not path.is_file():
        raise PromptError(f"{path}: no such prompts file (give a .txt, .json, .jsonl or .parquet file, or a folder "
                          f"of img2dataset .parquet files)")
    if path.suffix.lower() == ".parquet":
        return _parquet_captions(path, column)
    if path.suffix.lower() in (".json", ".jsonl"):
        text = path.read_text()
        jsonl = path.suffix.lower() == ".jsonl"
        rows = [json.loads(ln) for ln in text.splitlines() if ln.strip()] if jsonl else json.loads(text or "[]")
        if isinstance(rows, dict):  # {"annotations": [...]} as in COCO captions files
            rows = rows.get("annotations", rows.get("prompts", []))
        if not isinstance(rows, list):
            raise PromptError(f"{path}: expected a list of prompts (strings or records with {column!r}), got "
                              f"{type(rows).__name__}")
        return [_caption(r, column, path) for r in rows]
    return [ln.strip() for ln in path.read_text().splitlines() if ln.strip()]


def _parquet_captions(path: Path, column: str) -> list[str]:
    """The caption column; in img2dataset parquets only the rows whose download succeeded (status)."""
    table = pq.read_table(path)
    if column not in table.column_names:
        raise PromptError(f"{path} has no column {column!r} (columns: {table.column_names}); pass --caption-column")
    ok = table.column("status").to_pylist() if "status" in table.column_names else [None] * table.num_rows
    return [str(v) for v, st in zip(table.column(column).to_pylist(), ok) if v is not None and st in (None, "success")]


def _caption(row: object, column: str, path: Path) -> str:
    if isinstance(row, str):
        return row
    if isinstance(row, dict) and column in row:
        return str(row[column])
    raise PromptError(f"{path}: an entry has no {column!r} field ({str(row)[:80]}); pass --caption-column")


def rank_indices(num_images: int, rank: int, world: int) -> list[int]:
    """The image indices one rank draws and scores: a strided share, balanced to within one image."""
    return list(range(rank, num_images, world))


def prompt_for(prompts: list[str], index: int) -> str:
    return prompts[index % len(prompts)]
