"""Pytest fixtures for tests against a real S3 server (Ceph radosgw from tools/s3_local/start.sh).

conftest.py imports these. Set LDMSCALE_S3_ENDPOINT (plus AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY) to use a
server that already runs; set LDMSCALE_S3_KEEP=1 to leave the local server running after the session.
"""

from __future__ import annotations

import io
import json
import os
import subprocess
import tarfile
import time
import urllib.request
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
S3_LOCAL = REPO / "tools" / "s3_local"


@dataclass
class S3Server:
    endpoint: str
    key: str
    secret: str
    state_dir: str | None  # None for an external server (no restart possible)
    started_here: bool = False
    env: dict = field(default_factory=dict)

    @property
    def storage_options(self) -> dict:
        return {"endpoint_url": self.endpoint, "key": self.key, "secret": self.secret}

    def restart_rgw(self, down_s: float = 0.0) -> None:
        """Kill radosgw and start it again (the objects live in the OSD and survive)."""
        if self.state_dir is None:
            pytest.skip("radosgw restart needs the local server (LDMSCALE_S3_ENDPOINT is set)")
        subprocess.run(
            [str(S3_LOCAL / "restart-rgw.sh"), "--down", str(down_s)],
            env={**os.environ, **self.env}, check=True, capture_output=True, timeout=180,
        )


def _answers(endpoint: str) -> bool:
    try:
        urllib.request.urlopen(endpoint, timeout=2).close()
        return True
    except urllib.error.HTTPError:
        return True  # any HTTP answer means something listens
    except OSError:
        return False


def _parse_env(text: str) -> dict:
    return dict(line.split("=", 1) for line in text.splitlines() if "=" in line)


@pytest.fixture(scope="session")
def s3_server() -> S3Server:
    external = os.environ.get("LDMSCALE_S3_ENDPOINT")
    if external:
        yield S3Server(external, os.environ["AWS_ACCESS_KEY_ID"], os.environ["AWS_SECRET_ACCESS_KEY"], None)
        return
    port = os.environ.get("LDMSCALE_S3_PORT", "7480")
    state = os.environ.get("LDMSCALE_S3_DIR", "/tmp/ldmscale-s3")
    env = {"LDMSCALE_S3_PORT": port, "LDMSCALE_S3_DIR": state}
    was_running = _answers(f"http://127.0.0.1:{port}/")
    t0 = time.monotonic()
    proc = subprocess.run([str(S3_LOCAL / "start.sh")], env={**os.environ, **env}, capture_output=True,
                          text=True, timeout=900)
    if proc.returncode != 0:
        pytest.fail(f"tools/s3_local/start.sh failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    creds = _parse_env(proc.stdout)
    print(f"s3 server ready in {time.monotonic() - t0:.1f}s at {creds['AWS_ENDPOINT_URL']}")
    server = S3Server(creds["AWS_ENDPOINT_URL"], creds["AWS_ACCESS_KEY_ID"], creds["AWS_SECRET_ACCESS_KEY"],
                      state, started_here=not was_running, env=env)
    yield server
    if server.started_here and os.environ.get("LDMSCALE_S3_KEEP") != "1":
        subprocess.run([str(S3_LOCAL / "stop.sh")], env={**os.environ, **env}, check=False, timeout=120)


@pytest.fixture(scope="session")
def s3_fs(s3_server: S3Server):
    import s3fs

    return s3fs.S3FileSystem(**s3_server.storage_options, skip_instance_cache=True)


@pytest.fixture(scope="session")
def s3_bucket(s3_fs) -> str:
    """A fresh bucket for this session (removed at the end)."""
    name = f"ldmscale-test-{uuid.uuid4().hex[:10]}"
    s3_fs.mkdir(name)
    yield name
    try:
        s3_fs.rm(name, recursive=True)
    except Exception:  # the server may already be gone; stop.sh removes everything anyway
        pass


# ---------------------------------------------------------------- LAION-style shards


def _jpeg(seed: int, size: int = 32, quality: int = 95) -> bytes:
    # Noise compresses badly, which is what makes shards big enough to stream in several requests.
    rng = np.random.default_rng(seed)
    img = Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8))
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def laion_sample(key: str, img_size: int = 32) -> dict[str, bytes]:
    """One img2dataset-layout sample: {key}.jpg, {key}.txt (caption), {key}.json (metadata)."""
    caption = f"a photo number {key}"
    meta = {
        "url": f"http://example.invalid/{key}.jpg", "caption": caption, "key": key, "status": "success",
        "error_message": None, "width": img_size, "height": img_size, "original_width": img_size,
        "original_height": img_size, "exif": "{}", "sha256": None, "NSFW": "UNLIKELY",
        "similarity": 0.31, "LICENSE": "?",
    }
    return {"jpg": _jpeg(int(key), img_size), "txt": caption.encode(), "json": json.dumps(meta).encode()}


def make_laion_tar(keys: list[str], img_size: int = 32) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for key in keys:
            for ext, data in laion_sample(key, img_size).items():
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(data)
                info.mtime = 0
                tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def shard_keys(shard: int, per_shard: int) -> list[str]:
    return [f"{shard:05d}{i:04d}" for i in range(per_shard)]


def upload_laion_shards(fs, prefix: str, n_shards: int, per_shard: int, img_size: int = 32) -> dict:
    """Write NNNNN.tar shards (plus the .parquet/_stats.json siblings img2dataset leaves) under
    prefix ('bucket/dir'); returns {s3 url: [keys]} in shard order."""
    out = {}
    for s in range(n_shards):
        keys = shard_keys(s, per_shard)
        fs.pipe(f"{prefix}/{s:05d}.tar", make_laion_tar(keys, img_size))
        fs.pipe(f"{prefix}/{s:05d}_stats.json", b"{}")
        fs.pipe(f"{prefix}/{s:05d}.parquet", b"PAR1")
        out[f"s3://{prefix}/{s:05d}.tar"] = keys
    return out
