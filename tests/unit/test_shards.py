"""LAION-layout shard writer, make_shards and inspect_shards, against real files in tmp_path."""

from __future__ import annotations

import hashlib
import importlib.util
import io
import json
import tarfile
from pathlib import Path
from types import ModuleType

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from ldmscale.data.shard_writer import (
    ShardSample,
    border_resize,
    iter_tar_samples,
    read_shard_index,
    write_laion_shards,
)

ROOT = Path(__file__).resolve().parents[2]
JSON_FIELDS = {
    "url", "caption", "key", "status", "error_message", "width", "height", "original_width",
    "original_height", "exif", "sha256", "NSFW", "similarity", "LICENSE",
}


def load_tool(name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(name, ROOT / "tools" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def make_samples(n: int) -> list[ShardSample]:
    # Alternate wide and tall images so resizing has an aspect to keep.
    sizes = [(40, 20), (20, 40), (33, 33)]
    return [
        ShardSample(
            image=Image.new("RGB", sizes[i % 3], (200, 10 * i, 30)),
            caption=f"caption number {i}",
            url=f"https://example.com/{i}.jpg",
            extra={"style": f"s{i % 2}"},
        )
        for i in range(n)
    ]


def test_writer_layout(tmp_path: Path) -> None:
    tars = write_laion_shards(make_samples(7), tmp_path, samples_per_shard=3, image_size=16, progress=False)
    assert [t.name for t in tars] == ["00000.tar", "00001.tar", "00002.tar"]
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        f"{s:05d}{ext}" for s in range(3) for ext in (".tar", ".parquet", "_stats.json")
    )
    with tarfile.open(tars[1]) as tar:
        names = tar.getnames()
    assert names == [f"00001000{i}.{ext}" for i in range(3) for ext in ("jpg", "txt", "json")]

    for shard, tar in enumerate(tars):
        samples = list(iter_tar_samples(tar))
        rows = pq.read_table(tar.with_suffix(".parquet")).to_pylist()
        stats = json.loads((tmp_path / f"{shard:05d}_stats.json").read_text())
        assert len(rows) == len(samples) == stats["count"] == stats["successes"] == (1 if shard == 2 else 3)
        assert stats["status_dict"] == {"success": len(samples)}
        assert {"failed_to_download", "failed_to_resize", "duration", "start_time", "end_time"} <= set(stats)
        for sample, row in zip(samples, rows, strict=True):
            meta = json.loads(sample["json"])
            assert meta == row  # parquet row holds the same fields as the json
            assert JSON_FIELDS | {"style"} == set(meta)
            assert meta["key"] == sample["__key__"] and len(meta["key"]) == 9
            assert meta["caption"] == sample["txt"].decode()
            assert meta["sha256"] == hashlib.sha256(sample["jpg"]).hexdigest()
            assert (meta["status"], meta["error_message"], meta["NSFW"], meta["LICENSE"]) == (
                "success", None, "UNLIKELY", "?"
            )
            assert (meta["width"], meta["height"]) == Image.open(io.BytesIO(sample["jpg"])).size
            assert (meta["width"], meta["height"]) == (16, 16)
            assert isinstance(meta["similarity"], float)
    first = json.loads(next(iter_tar_samples(tars[0]))["json"])
    assert (first["original_width"], first["original_height"], first["style"]) == (40, 20, "s0")
    assert len(read_shard_index(tmp_path)) == 7


def test_no_resize_keeps_original_size_and_start_key(tmp_path: Path) -> None:
    tars = write_laion_shards(make_samples(2), tmp_path, start_key=5, progress=False)
    assert [t.name for t in tars] == ["00005.tar"]
    metas = [json.loads(s["json"]) for s in iter_tar_samples(tars[0])]
    assert [m["key"] for m in metas] == ["000050000", "000050001"]
    assert [(m["width"], m["height"]) for m in metas] == [(40, 20), (20, 40)]


def test_failure_mid_stream_leaves_only_whole_shards(tmp_path: Path) -> None:
    def broken():
        yield from make_samples(4)
        raise RuntimeError("source died")

    with pytest.raises(RuntimeError):
        write_laion_shards(broken(), tmp_path, samples_per_shard=3, progress=False)
    # The first shard is complete; the interrupted one and any temp file are absent.
    assert sorted(p.name for p in tmp_path.iterdir()) == ["00000.parquet", "00000.tar", "00000_stats.json"]


def test_border_resize_keeps_aspect() -> None:
    wide = Image.new("RGB", (40, 20), (255, 0, 0))
    out = border_resize(wide, 16)
    assert out.size == (16, 16)
    # 40x20 -> 16x8 content, centred: 4 white rows above and below.
    column = [out.getpixel((8, y)) for y in range(16)]
    assert column[:4] == [(255, 255, 255)] * 4 and column[12:] == [(255, 255, 255)] * 4
    assert column[4:12] == [(255, 0, 0)] * 8
    tall = border_resize(Image.new("RGB", (10, 30), (0, 0, 255)), 30)
    row = [tall.getpixel((x, 15)) for x in range(30)]
    assert row[:10] == [(255, 255, 255)] * 10 and row[10:20] == [(0, 0, 255)] * 10


def test_inspect_counts_and_contact_sheet(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    shard_dir = tmp_path / "shards"
    write_laion_shards(make_samples(7), shard_dir, samples_per_shard=3, image_size=16, progress=False)
    inspect = load_tool("inspect_shards")
    sheet = tmp_path / "sheet.png"
    argv = [str(shard_dir), "--contact-sheet", str(sheet), "--n", "3", "--cols", "2", "--thumb", "32",
            "--caption-height", "20"]
    assert inspect.main(argv) == 0
    out = capsys.readouterr().out
    counts = {line.split()[0]: (int(line.split()[1]), int(line.split()[2])) for line in out.splitlines()
              if line.startswith(str(shard_dir))}
    assert counts == {
        str(shard_dir / "00000.tar"): (3, 3), str(shard_dir / "00001.tar"): (3, 3),
        str(shard_dir / "00002.tar"): (1, 1),
    }
    assert "total samples: 7 in 3 shards" in out
    assert "NSFW: {'UNLIKELY': 7}" in out
    assert "style: {'s0': 4, 's1': 3}" in out
    # 3 images in 2 columns -> 2 rows of (32 px image + 20 px caption band).
    assert Image.open(sheet).size == (2 * 32, 2 * (32 + 20))
    # Asking for more images than the shard holds shows what is there (the last shard has 1).
    small = inspect.contact_sheet(shard_dir / "00002.tar", tmp_path / "small.png", n=5, cols=3, thumb=32,
                                  caption_height=20)
    assert small.size == Image.open(tmp_path / "small.png").size == (32, 52)

    report = inspect.inspect_shards(inspect.find_tars([shard_dir]), progress=False)
    assert report["fields"]["width"] == {"min": 16.0, "mean": 16.0, "max": 16.0}
    assert report["caption_length"]["min"] == len("caption number 0")


def test_make_shards_from_table_and_folder(tmp_path: Path) -> None:
    images = tmp_path / "images"
    images.mkdir()
    rows = []
    for i in range(3):
        Image.new("RGB", (24, 12), (i * 80, 0, 0)).save(images / f"im{i}.png")
        (images / f"im{i}.txt").write_text(f"red {i}\n")
        rows.append({"path": f"images/im{i}.png", "caption": f"table red {i}", "style": "flat", "label": i})
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "table.parquet")
    make_shards = load_tool("make_shards")

    table_argv = [str(tmp_path / "table.parquet"), "--out", str(tmp_path / "t"), "--image-size", "8"]
    assert make_shards.main(table_argv) == 0
    metas = [json.loads(s["json"]) for s in iter_tar_samples(tmp_path / "t" / "00000.tar")]
    assert [(m["caption"], m["style"], m["label"], m["width"]) for m in metas] == [
        (f"table red {i}", "flat", i, 8) for i in range(3)
    ]

    assert make_shards.main([str(images), "--out", str(tmp_path / "f"), "--samples-per-shard", "2"]) == 0
    index = read_shard_index(tmp_path / "f")
    assert [r["caption"] for r in index] == ["red 0", "red 1", "red 2"]
    assert [r["key"] for r in index] == ["000000000", "000000001", "000010000"]
