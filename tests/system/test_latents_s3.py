"""ldmscale-encode and training from latents against a real S3 server (Ceph radosgw): 2 encoder ranks read image
shards from s3:// and write the latent set to s3://; 2 trainer ranks stream it and see exactly the samples, in the
order, that the loader yields from a local copy of the same set."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from ldmscale.config import load_config
from ldmscale.data import ResumableLoader
from ldmscale.data.shard_writer import iter_tar_samples
from tests.conftest import REPO, free_port, tiny_overrides
from tests.integration.test_latents_multiproc import encode_command
from tests.runs import launch_command, sample_keys
from tests.s3_fixtures import S3Server
from tests.system.test_s3_training import _s3_env

pytestmark = pytest.mark.s3
STEPS = 4


def test_encode_s3_to_s3_then_train_from_s3_latents(assets: Path, s3_server: S3Server, s3_fs, s3_bucket: str,
                                                    tmp_path: Path) -> None:
    sources = sorted((assets / "digits/train").glob("*.tar"))
    for p in sources:
        s3_fs.put_file(str(p), f"{s3_bucket}/images/{p.name}")
    endpoint = f"data.storage_options.endpoint_url={s3_server.endpoint}"
    env = _s3_env(s3_server)  # credentials only in the AWS variables
    r = subprocess.run(encode_command(assets, f"s3://{s3_bucket}/latents", f"[s3://{s3_bucket}/images/]", endpoint),
                       env=env, capture_output=True, text=True, timeout=400, cwd=REPO)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "latent set complete: 8 shards" in r.stdout
    assert s3_server.secret not in r.stdout + r.stderr
    local = tmp_path / "latents"
    s3_fs.get(f"{s3_bucket}/latents/", str(local), recursive=True)
    manifest = json.loads((local / "manifest.json").read_text())
    assert manifest["source_shards"] == [f"s3://{s3_bucket}/images/{p.name}" for p in sources]
    for src in sources:
        got = [s["__key__"] for s in iter_tar_samples(local / src.name)]
        assert got == [s["__key__"] for s in iter_tar_samples(src)]

    out = tmp_path / "run"
    args = ["--config", str(REPO / "configs/tiny.yaml"), "--resume", "never", *tiny_overrides(assets, out, **{
        "data.shards": f"[s3://{s3_bucket}/latents/]", "data.format": "latents", "train.max_steps": STEPS,
        "train.log_sample_keys": "true"}), endpoint]
    r = subprocess.run(launch_command("torchrun", free_port(), args), env=env, capture_output=True, text=True,
                       timeout=400, cwd=REPO)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    cfg = load_config(REPO / "configs/tiny.yaml", tiny_overrides(assets, out, **{
        "data.shards": f"[{local}]", "data.format": "latents"}))
    for rank in range(2):
        loader = ResumableLoader(cfg.data, None, seed=cfg.train.seed, rank=rank, world=2,
                                 micro_batch=cfg.train.micro_batch_size, samples_per_epoch=cfg.data.samples_per_epoch,
                                 global_batch=cfg.train.global_batch_size)
        want = {step: next(loader)["keys"] for step in range(1, STEPS + 1)}
        assert sample_keys(out, rank) == want
