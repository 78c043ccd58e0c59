"""Data that is wrong in ways no tar error shows: a shard cut at a member boundary, malformed json metadata, a
latent set begun with other encoder weights, shards none of whose samples pass. Training and ldmscale-encode
count and skip the same samples; what cannot be used is refused with one line."""

from __future__ import annotations

import io
import itertools
import json
import logging
import shutil
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from ldmscale.config import ConfigError, DataConfig, load_config
from ldmscale.data.shard_writer import ShardSample, write_laion_shards
from ldmscale.data.stream import SourceStream
from tests.conftest import REPO, tiny_overrides

PER_SHARD = 12
KEPT = 5  # samples left in the shard that is cut


def _samples(n: int) -> list[ShardSample]:
    rng = np.random.default_rng(0)
    return [ShardSample(Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)), f"a digit {i}")
            for i in range(n)]


def cut_at_member_boundary(tar_path: Path, samples: int) -> None:
    """Keep the first `samples` whole samples and nothing after them: no end-of-archive blocks, so tarfile reads
    the rest as a clean end (a copy that stopped between two members)."""
    with tarfile.open(tar_path) as tar:
        members = tar.getmembers()
    per_sample = len(members) // PER_SHARD
    data = tar_path.read_bytes()
    tar_path.write_bytes(data[: members[samples * per_sample].offset])


@pytest.fixture
def shards(tmp_path: Path) -> list[Path]:
    """Two img2dataset-layout shards of 12 samples; the second cut after 5 samples, its _stats.json still says 12."""
    written = write_laion_shards(_samples(2 * PER_SHARD), tmp_path / "s", samples_per_shard=PER_SHARD,
                                 progress=False)
    cut_at_member_boundary(written[1], KEPT)
    return written


def test_a_shard_shorter_than_its_stats_is_a_counted_and_logged_shard_error(
        shards: list[Path], caplog: pytest.LogCaptureFixture) -> None:
    urls = [str(p) for p in shards]
    dc = DataConfig(shards=urls, resolution=16, num_workers=1, shuffle_buffer=4, max_failed_shards=0.5)
    stream = SourceStream(dc, urls, seed=0, epoch=0, src=(0, 1, 0, 1))
    with caplog.at_level(logging.WARNING, logger="ldmscale.data.stream"):
        first_pass = [s["__key__"] for s in itertools.islice(iter(stream), PER_SHARD + KEPT + PER_SHARD)]
    assert stream.counts["shard_error"] == 1 and stream.counts["shard_retry"] == 1
    assert any("ended after 5 of the 12 samples its _stats.json lists" in r.getMessage() for r in caplog.records)
    cut_keys = {k for k in first_pass if k.startswith("00001")}
    assert len(cut_keys) == KEPT  # what the cut shard holds is read once: no repeat after the retry


def run_encode(cfg, out: Path):  # noqa: ANN001, ANN201
    from ldmscale.latents import encode

    with pytest.MonkeyPatch.context() as mp:  # world_info_from_env writes these; restored for later subprocesses
        for k, v in {"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "MASTER_ADDR": "", "MASTER_PORT": ""}.items():
            mp.setenv(k, v)
        return encode.main(cfg, str(out), progress=False, dtype="fp32", batch_size=16)


def rewrite_json(tar_path: Path, metas: dict[int, bytes]) -> None:
    """Replace the .json member of sample i by metas[i] (as a scraper might have written it)."""
    buf = io.BytesIO()
    with tarfile.open(tar_path) as tin, tarfile.open(fileobj=buf, mode="w") as tout:
        for i, m in enumerate(tin.getmembers()):
            data = tin.extractfile(m).read()  # type: ignore[union-attr]
            if m.name.endswith(".json") and i // 3 in metas:
                data = metas[i // 3]
                m.size = len(data)
            tout.addfile(m, io.BytesIO(data))
    tar_path.write_bytes(buf.getvalue())


def test_encode_counts_malformed_json_and_short_shards_as_training_does(shards: list[Path], assets: Path,
                                                                       tmp_path: Path) -> None:
    rewrite_json(shards[0], {1: b"[1, 2]", 2: json.dumps({"width": "wide", "height": 32}).encode()})
    cfg = load_config(REPO / "configs/tiny.yaml", tiny_overrides(assets, tmp_path, **{
        "data.shards": f"[{shards[0].parent}]", "data.filters.min_width": 8, "data.num_workers": 0}))
    res = run_encode(cfg, tmp_path / "latents")
    assert res.dropped["bad_json"] == 2 and res.samples == PER_SHARD - 2 + KEPT
    stats = json.loads((tmp_path / "latents/00001_stats.json").read_text())
    assert "ended after 5 of the 12 samples" in stats["shard_error"]
    dc = DataConfig(shards=[str(p) for p in shards], resolution=32, filters=cfg.data.filters, shuffle_buffer=1)
    stream = SourceStream(dc, [str(p) for p in shards], seed=0, epoch=0, src=(0, 1, 0, 1))
    list(itertools.islice(iter(stream), PER_SHARD - 2 + KEPT))
    assert stream.counts["bad_json"] == 2  # the training stream drops the very same samples


def test_encode_refuses_a_set_begun_with_other_vae_weights(shards: list[Path], assets: Path, tmp_path: Path) -> None:
    """Same VAE config, other weights: found once the weights are loaded, before the first shard is written."""
    over = {"data.shards": f"[{shards[0]}]", "data.num_workers": 0}
    run_encode(load_config(REPO / "configs/tiny.yaml", tiny_overrides(assets, tmp_path, **over)), tmp_path / "lat")
    other = tmp_path / "vae"
    shutil.copytree(assets / "models/vae", other)
    from diffusers import AutoencoderKL

    vae = AutoencoderKL.from_pretrained(other)
    with torch.no_grad():
        next(vae.encoder.parameters()).add_(1.0)
    vae.save_pretrained(other)
    cfg = load_config(REPO / "configs/tiny.yaml", tiny_overrides(assets, tmp_path, **{**over, "model.vae": other}))
    before = sorted(p.name for p in (tmp_path / "lat").iterdir())
    with pytest.raises(ConfigError, match="holds latents made another way .*vae.encoder_hash"):
        run_encode(cfg, tmp_path / "lat")
    assert sorted(p.name for p in (tmp_path / "lat").iterdir()) == before


def test_encode_with_no_sample_passing_exits_2(shards: list[Path], assets: Path, tmp_path: Path,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    from ldmscale.latents import encode

    argv = ["--config", str(REPO / "configs/tiny.yaml"), "--out", str(tmp_path / "lat"), "--no-progress",
            *tiny_overrides(assets, tmp_path, **{"data.shards": f"[{shards[0]}]", "data.num_workers": 0,
                                                 "data.filters.min_caption_chars": 1000})]
    with pytest.MonkeyPatch.context() as mp, pytest.raises(SystemExit) as exited:
        for k, v in {"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "MASTER_ADDR": "", "MASTER_PORT": ""}.items():
            mp.setenv(k, v)
        encode.cli(argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert exited.value.code == 2 and len(err) == 1, err
    assert "no sample of the 1 shards passed (dropped: {'caption_short': 12})" in err[0]
