"""ldmscale-eval's pieces in one process: FID, reference statistics, CLIP score, prompts, input errors.

No Inception or CLIP weights exist here: the CLIP tests use a random-init CLIP folder written with
save_pretrained (the loading path of real weights), FID uses the weight-free pixel features or that CLIP.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from scipy import linalg

from ldmscale.eval import cli
from ldmscale.eval.clip_score import build_clip_score
from ldmscale.eval.fid import GaussianStats, PixelFeatures, build_fid, load_stats, stats_of
from ldmscale.eval.reference import rank_batches
from ldmscale.inference.prompts import PromptError, rank_indices, read_prompts
from tests.eval_assets import write_tiny_clip

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def digits(assets: Path) -> torch.Tensor:
    """The held-out real digits, decoded at 32 px as the eval decodes reference images (uint8)."""
    return torch.cat(list(rank_batches(str(assets / "digits/heldout"), 32, 0, 1, 64)))


@pytest.fixture(scope="module")
def clip_dir(assets: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_clip(tmp_path_factory.mktemp("clip") / "clip", assets / "models/tokenizer")


@pytest.mark.parametrize("kind", ["pixels", "clip"])
def test_fid_of_a_set_against_itself_is_zero(kind: str, digits: torch.Tensor, clip_dir: Path) -> None:
    fid = build_fid("pixels:8" if kind == "pixels" else f"clip:{clip_dir}", CPU)
    fid.update(digits, real=True)
    fid.update(digits, real=False)
    same = float(fid.compute())
    fid.reset()  # keeps the reference: the next set is scored against the same statistics
    fid.update(digits[: len(digits) // 3], real=False)
    other = float(fid.compute())
    assert abs(same) < 1e-3 * other, (same, other)


def _spd(rng: np.random.Generator, d: int) -> np.ndarray:
    a = rng.normal(size=(d, d))
    return a @ a.T + 0.5 * np.eye(d)


def test_fid_of_two_gaussians_matches_the_closed_form(tmp_path: Path) -> None:
    """Statistics written to .npz, read back into the metric's sums, give ||mu1-mu2||^2 + Tr(S1+S2-2(S1 S2)^1/2)."""
    rng = np.random.default_rng(0)
    d = 9  # pixels:3 has 9 features
    a = GaussianStats(rng.normal(size=d), _spd(rng, d), 1000, "pixels:3")
    b = GaussianStats(rng.normal(size=d) + 1.0, _spd(rng, d), 700, "pixels:3")
    a.save(tmp_path / "a.npz")
    b.save(tmp_path / "b.npz")
    fid = build_fid("pixels:3", CPU)
    load_stats(fid, GaussianStats.load(tmp_path / "a.npz"), real=True, owner=True)
    load_stats(fid, GaussianStats.load(tmp_path / "b.npz"), real=False, owner=True)
    fid.orig_dtype = torch.float64  # torchmetrics sets the result dtype in update(), which this test bypasses
    closed = float(np.sum((a.mu - b.mu) ** 2) + np.trace(a.sigma + b.sigma - 2 * linalg.sqrtm(a.sigma @ b.sigma).real))
    assert float(fid.compute()) == pytest.approx(closed, rel=1e-9)


def test_reference_statistics_are_the_mean_and_covariance_of_the_features(digits: torch.Tensor) -> None:
    fid = build_fid("pixels:4", CPU)
    for start in range(0, len(digits), 50):
        fid.update(digits[start : start + 50], real=True)
    got = stats_of(fid, real=True)
    feats = PixelFeatures(4)(digits).double().numpy()
    assert got.n == len(digits)
    np.testing.assert_allclose(got.mu, feats.mean(0), rtol=1e-10)
    np.testing.assert_allclose(got.sigma, np.cov(feats, rowvar=False), rtol=1e-8, atol=1e-9)


def test_reference_statistics_load_on_one_rank_only(tmp_path: Path) -> None:
    """States are summed across ranks: the non-owner ranks must add zeros, or the reference counts twice."""
    rng = np.random.default_rng(1)
    stats = GaussianStats(rng.normal(size=4), _spd(rng, 4), 50, "pixels:2")
    fid = build_fid("pixels:2", CPU)
    load_stats(fid, stats, real=True, owner=False)
    assert int(fid.real_features_num_samples) == 0
    assert float(fid.real_features_sum.abs().sum()) == 0 and float(fid.real_features_cov_sum.abs().sum()) == 0


def test_clip_score_pairs_each_image_with_its_prompt(digits: torch.Tensor, clip_dir: Path) -> None:
    """torchmetrics' definition: mean over pairs of 100 x cosine(image, its caption), clipped at 0."""
    from transformers import CLIPModel, CLIPProcessor

    images = digits[:4]
    prompts = [f"a handwritten digit {d}" for d in (3, 1, 4, 1)]
    metric = build_clip_score(str(clip_dir), CPU)
    metric.update(images, prompts)
    got = float(metric.compute())
    model, proc = CLIPModel.from_pretrained(clip_dir).eval(), CLIPProcessor.from_pretrained(clip_dir)
    with torch.no_grad():
        img = model.get_image_features(**proc(images=list(images), return_tensors="pt"))
        txt = model.get_text_features(**proc(text=prompts, return_tensors="pt", padding=True))
    img, txt = (getattr(x, "pooler_output", x) for x in (img, txt))
    cos = torch.nn.functional.cosine_similarity(img, txt, dim=-1)
    assert got == pytest.approx(max(float(100 * cos.mean()), 0.0), rel=1e-5)


def test_prompts_from_txt_json_jsonl_and_parquet(tmp_path: Path) -> None:
    captions = ["a cat", "a dog on a sofa", "two birds"]
    (tmp_path / "p.txt").write_text("\n".join(captions) + "\n\n")
    (tmp_path / "p.json").write_text(json.dumps({"annotations": [{"caption": c, "id": i} for i, c in
                                                                 enumerate(captions)]}))
    (tmp_path / "p.jsonl").write_text("\n".join(json.dumps({"text": c}) for c in captions))
    pq.write_table(pa.table({"caption": captions, "key": ["0", "1", "2"]}), tmp_path / "p.parquet")
    assert read_prompts(tmp_path / "p.txt") == captions
    assert read_prompts(tmp_path / "p.json") == captions
    assert read_prompts(tmp_path / "p.jsonl", column="text") == captions
    assert read_prompts(tmp_path / "p.parquet") == captions
    shards = tmp_path / "shards"  # img2dataset: one parquet per shard, failed downloads included
    shards.mkdir()
    pq.write_table(pa.table({"caption": captions[:2], "status": ["success", "failed_to_download"]}),
                   shards / "00000.parquet")
    pq.write_table(pa.table({"caption": captions[2:], "status": ["success"]}), shards / "00001.parquet")
    assert read_prompts(shards) == [captions[0], captions[2]]
    with pytest.raises(PromptError, match="no column 'prompt'"):
        read_prompts(tmp_path / "p.parquet", column="prompt")
    with pytest.raises(PromptError, match="no 'caption' field"):
        read_prompts(tmp_path / "p.jsonl")


def test_ranks_share_the_image_indices_exactly() -> None:
    for n, world in ((10, 1), (10, 3), (7, 2)):
        shares = [rank_indices(n, r, world) for r in range(world)]
        assert sorted(i for s in shares for i in s) == list(range(n))
        assert max(map(len, shares)) - min(map(len, shares)) <= 1


def _exit(argv: list[str], capsys: pytest.CaptureFixture[str]) -> str:
    with pytest.raises(SystemExit) as e:
        cli.cli(argv)
    assert e.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("ldmscale-eval: ") and "\n" not in err
    return err


def test_bad_input_is_one_line_and_exit_code_2(assets: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    heldout = str(assets / "digits/heldout")
    assert "pixels:N" in _exit(["--reference", heldout, "--features", "pixels:x"], capsys)
    assert "inception" in _exit(["--reference", heldout, "--features", "inception:/nope.pth"], capsys)
    assert "no .tar shards" in _exit(["--reference", str(tmp_path), "--features", "pixels:4"], capsys)
    assert "--resolution" in _exit(["--reference", heldout, "--features", "pixels:4", "--save-reference-stats",
                                    str(tmp_path / "r.npz")], capsys)
    GaussianStats(np.zeros(16), np.eye(16), 10, "pixels:4").save(tmp_path / "r.npz")
    assert "computed with --features pixels:4" in _exit(["ckpt", "--reference", str(tmp_path / "r.npz"),
                                                         "--features", "pixels:8"], capsys)
    (tmp_path / "p.txt").write_text("a digit\n")
    assert "--guidance" in _exit([str(tmp_path), "--reference", str(tmp_path / "r.npz"), "--features", "pixels:4",
                                  "--prompts", str(tmp_path / "p.txt"), "--guidance", "2,x"], capsys)
    assert "--num-images 1" in _exit([str(tmp_path), "--reference", str(tmp_path / "r.npz"), "--features",
                                      "pixels:4", "--prompts", str(tmp_path / "p.txt")], capsys)
    assert "no such checkpoint" in _exit([str(tmp_path / "nothing"), "--reference", str(tmp_path / "r.npz"),
                                         "--features", "pixels:4", "--prompts", str(tmp_path / "p.txt"),
                                         "--num-images", "4"], capsys)


