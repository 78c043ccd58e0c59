"""The digit-accuracy benchmark, on real digits posing as generated samples."""

from __future__ import annotations

import importlib.util
import io
import json
from pathlib import Path
from types import ModuleType

import pytest
from PIL import Image

from ldmscale.data.shard_writer import iter_tar_samples
from ldmscale.demo.digit_features import parse_digit

ROOT = Path(__file__).resolve().parents[2]


def load_tool(relpath: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(Path(relpath).stem, ROOT / relpath)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def digit_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("digits")
    load_tool("tools/make_digit_shards.py").write_digit_shards(out, seed=0)
    return out


def fake_samples(digit_data: Path, out: Path, n: int, shift: int) -> Path:
    """Real TRAIN-split digits (the classifier never sees them) written the way ldmscale-sample does:
    32x32 PNGs and samples.json. shift != 0 prompts a different digit than the image shows."""
    out.mkdir()
    entries = []
    for i, sample in enumerate(iter_tar_samples(digit_data / "train" / "00000.tar")):
        if i == n:
            break
        label = json.loads(sample["json"])["label"]
        name = f"{i:04d}.png"
        Image.open(io.BytesIO(sample["jpg"])).resize((32, 32), Image.Resampling.BICUBIC).save(out / name)
        entries.append({"file": name, "prompt": f"a handwritten digit {(label + shift) % 10}", "seed": i})
    (out / "samples.json").write_text(json.dumps(entries))
    return out


def test_digit_shards_split(digit_data: Path) -> None:
    def labels(split: str) -> list[int]:
        return [json.loads(s["json"])["label"] for t in sorted((digit_data / split).glob("*.tar"))
                for s in iter_tar_samples(t)]

    train, heldout = labels("train"), labels("heldout")
    assert len(train) + len(heldout) == 1797
    assert len(sorted((digit_data / "train").glob("*.tar"))) == 4
    assert 250 <= len(heldout) <= 290 and set(heldout) == set(range(10))
    tars = sorted(digit_data.rglob("*.tar"))
    urls = [json.loads(s["json"])["url"] for t in tars for s in iter_tar_samples(t)]
    assert len(set(urls)) == 1797  # no digit is in both splits


def test_real_digits_score_high_and_mismatched_low(digit_data: Path, tmp_path: Path) -> None:
    bench = load_tool("tools/bench/digit_accuracy.py")
    matched = bench.run_benchmark(fake_samples(digit_data, tmp_path / "ok", 150, 0), digit_data / "heldout")
    assert matched["n_real"] == len(list(iter_tar_samples(digit_data / "heldout" / "00000.tar")))
    assert matched["real_accuracy"] > 0.9
    assert matched["n_generated"] == 150
    assert matched["generated_accuracy"] > 0.85
    assert matched["ratio"] > 0.9

    wrong = bench.run_benchmark(fake_samples(digit_data, tmp_path / "bad", 150, 3), digit_data / "heldout")
    assert wrong["generated_accuracy"] < 0.15
    assert wrong["real_accuracy"] == matched["real_accuracy"]  # the ceiling does not depend on the samples


def test_cli_prints_side_by_side_and_writes_json(
    digit_data: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    bench = load_tool("tools/bench/digit_accuracy.py")
    samples = fake_samples(digit_data, tmp_path / "s", 60, 0)
    argv = [str(samples), "--heldout", str(digit_data / "heldout"), "--json", str(tmp_path / "r.json")]
    assert bench.main(argv) == 0
    out = capsys.readouterr().out
    assert "real (cv)" in out and "generated" in out and "ratio" in out
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["n_generated"] == 60
    assert set(report["generated_per_digit"]) == {str(d) for d in range(10)}


def test_parse_digit() -> None:
    assert parse_digit("a handwritten digit 7") == 7
    assert parse_digit("digit: 3, neat") == 3
    assert parse_digit("a handwritten digit") is None
