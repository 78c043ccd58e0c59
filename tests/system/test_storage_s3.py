"""ldmscale.data.storage against a real S3 server (Ceph radosgw): shard listing, webdataset streaming in and
out of DataLoader workers, resume across a radosgw restart, and the startup check's error messages."""

from __future__ import annotations

import functools
import json
import logging
import os
import socket
import subprocess
import sys
import threading
import time

import numpy as np
import pytest
import torch
import webdataset as wds

from ldmscale.data import shardlist, storage

# s3_fixtures is both a plugin (below) and a helper module: register its assert rewriting before importing it.
pytest.register_assert_rewrite("tests.s3_fixtures")
from tests.s3_fixtures import REPO, make_laion_tar, shard_keys, upload_laion_shards  # noqa: E402

# The s3_server / s3_fs / s3_bucket fixtures (conftest.py may import them too).
pytest_plugins = ["tests.s3_fixtures"]

pytestmark = pytest.mark.s3

N_SHARDS, PER_SHARD = 4, 24


@pytest.fixture(scope="module")
def shards(s3_fs, s3_bucket) -> dict:
    """{url: keys} for N_SHARDS small LAION shards under s3://bucket/laion/."""
    return upload_laion_shards(s3_fs, f"{s3_bucket}/laion", N_SHARDS, PER_SHARD)


@pytest.fixture()
def opts(s3_server) -> dict:
    storage.register_gopen_schemes(s3_server.storage_options)
    return dict(s3_server.storage_options)


def _all_keys(shards: dict) -> list[str]:
    return [k for keys in shards.values() for k in keys]


def _check_sample(sample: dict) -> None:
    # Byte-level damage from a bad resume would break the tar headers or these contents.
    assert sample["txt"] == f"a photo number {sample['__key__']}".encode()
    assert sample["jpg"][:2] == b"\xff\xd8"


def test_expand_braces_and_prefix(shards, opts, s3_bucket):
    urls = list(shards)
    by_brace = shardlist.expand_shard_urls(f"s3://{s3_bucket}/laion/{{00000..{N_SHARDS - 1:05d}}}.tar", opts)
    assert by_brace == urls
    by_prefix = shardlist.expand_shard_urls(f"s3://{s3_bucket}/laion/", opts)
    assert by_prefix == urls  # sorted, .tar only (no .parquet / _stats.json)
    assert shardlist.expand_shard_urls([urls[1], urls[0]], opts) == [urls[1], urls[0]]
    assert shardlist.expand_shard_urls(f"s3://{s3_bucket}/laion/0000[01].tar", opts) == urls[:2]
    with pytest.raises(ValueError, match=r"nothing-here/.*\.tar objects under prefix"):
        shardlist.expand_shard_urls(f"s3://{s3_bucket}/nothing-here/", opts)


def test_expand_local(tmp_path):
    for s in (1, 0):
        (tmp_path / f"{s:05d}.tar").write_bytes(make_laion_tar(shard_keys(s, 1)))
    (tmp_path / "00000.parquet").write_bytes(b"PAR1")
    expected = [str(tmp_path / "00000.tar"), str(tmp_path / "00001.tar")]
    assert shardlist.expand_shard_urls(str(tmp_path)) == expected
    assert shardlist.expand_shard_urls(str(tmp_path / "*.tar")) == expected
    assert shardlist.expand_shard_urls(str(tmp_path / "{00000..00001}.tar")) == expected
    with pytest.raises(ValueError, match="no shards found"):
        shardlist.expand_shard_urls(str(tmp_path / "missing-*.tar"))


def test_webdataset_reads_every_sample(shards, opts):
    ds = wds.WebDataset(list(shards), shardshuffle=False, empty_check=False)
    samples = list(ds)
    assert [s["__key__"] for s in samples] == _all_keys(shards)
    for s in samples:
        _check_sample(s)


def _register_in_worker(storage_options: dict, worker_id: int) -> None:
    storage.register_gopen_schemes(storage_options)


@pytest.mark.parametrize("context", ["fork", "spawn"])
def test_dataloader_two_workers(shards, opts, context):
    # Fork workers inherit the registration; spawned ones start from a fresh interpreter and register again.
    ds = wds.WebDataset(list(shards), shardshuffle=False, empty_check=False)
    init = None if context == "fork" else functools.partial(_register_in_worker, opts)
    loader = torch.utils.data.DataLoader(ds, batch_size=None, num_workers=2, multiprocessing_context=context,
                                         worker_init_fn=init)
    samples = list(loader)
    keys = [s["__key__"] for s in samples]
    assert sorted(keys) == sorted(_all_keys(shards)) and len(keys) == len(set(keys))
    for s in samples:
        _check_sample(s)


def _wait_until_down(endpoint: str, timeout: float = 30.0) -> None:
    """Block until nothing accepts connections at endpoint (radosgw was killed)."""
    host, port = endpoint.split("//")[1].split(":")
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            socket.create_connection((host, int(port)), timeout=1).close()
        except OSError:
            return
        time.sleep(0.02)
    raise AssertionError(f"{endpoint} never went down")


def _restart_in_background(s3_server, down_s: float) -> threading.Thread:
    t = threading.Thread(target=s3_server.restart_rgw, kwargs={"down_s": down_s})
    t.start()
    _wait_until_down(s3_server.endpoint)
    return t


# botocore's own retries sometimes ride out a short restart; without them every error reaches
# ldmscale's reader, so these tests exercise its reopen-and-seek path every time.
NO_BOTOCORE_RETRY = {"config_kwargs": {"retries": {"total_max_attempts": 1}}}


def test_reader_resumes_at_byte_offset_across_restart(s3_server, s3_fs, s3_bucket, opts):
    data = np.random.default_rng(0).integers(0, 256, 1 << 20, dtype=np.uint8).tobytes()
    s3_fs.pipe(f"{s3_bucket}/blob.bin", data)
    reader = storage.ResumingReader(f"s3://{s3_bucket}/blob.bin",
                                    {**opts, **NO_BOTOCORE_RETRY, "read_block_size": 64 * 1024})
    head = reader.read(300_000)
    restarter = _restart_in_background(s3_server, down_s=1.0)
    rest = reader.read()  # the next block's GET fails until radosgw is back
    restarter.join()
    assert head + rest == data
    assert reader.retries >= 1


def test_radosgw_restart_mid_read_loses_and_repeats_nothing(s3_server, s3_fs, s3_bucket, opts, caplog):
    # Bigger images and 64 KiB reads make every shard take many GETs, so the restart lands mid-shard.
    shards = upload_laion_shards(s3_fs, f"{s3_bucket}/restart", 3, 40, img_size=64)
    storage.register_gopen_schemes({**opts, **NO_BOTOCORE_RETRY, "read_block_size": 64 * 1024})
    caplog.set_level(logging.DEBUG, logger="ldmscale.data.storage")
    keys, restarter = [], None
    for sample in wds.WebDataset(list(shards), shardshuffle=False, empty_check=False):
        keys.append(sample["__key__"])
        _check_sample(sample)
        if len(keys) == 20:
            restarter = _restart_in_background(s3_server, down_s=1.0)
        elif restarter is not None and restarter.is_alive():
            time.sleep(0.05)  # slow consumer: keeps fetching blocks while radosgw is down and coming back
    restarter.join()
    assert keys == _all_keys(shards)  # nothing lost, nothing repeated, same order
    assert "transient" in caplog.text, "the restart should have hit the reader"
    assert s3_server.secret not in caplog.text and s3_server.key not in caplog.text


def test_missing_object_is_not_retried(s3_bucket, opts, caplog):
    caplog.set_level(logging.DEBUG, logger="ldmscale.data.storage")
    t0 = time.monotonic()
    with pytest.raises(FileNotFoundError):
        storage.open_url(f"s3://{s3_bucket}/laion/99999.tar", opts)
    with pytest.raises(FileNotFoundError):
        list(wds.WebDataset([f"s3://{s3_bucket}/laion/99999.tar"], shardshuffle=False, empty_check=False))
    assert time.monotonic() - t0 < 3
    assert "retry" not in caplog.text


def test_check_ok_and_missing_first_shard(shards, opts, s3_bucket):
    shardlist.check_shards_reachable(list(shards), opts)
    with pytest.raises(storage.StorageError, match=r"99999\.tar: not found — check data\.shards"):
        shardlist.check_shards_reachable([f"s3://{s3_bucket}/laion/99999.tar"], opts)


@pytest.mark.parametrize("field", ["key", "secret"])
def test_wrong_credentials_fail_fast_and_quietly(shards, opts, field, caplog):
    caplog.set_level(logging.DEBUG, logger="ldmscale.data.storage")
    bad = {**opts, field: f"wrong-{field}-Zq9xK2"}
    t0 = time.monotonic()
    with pytest.raises(storage.StorageError) as err:
        shardlist.check_shards_reachable(list(shards), bad)
    assert time.monotonic() - t0 < 5
    msg = str(err.value)
    assert "access denied" in msg and "AWS_SECRET_ACCESS_KEY" in msg
    for secret in (bad[field], opts["secret"], opts["key"]):
        assert secret not in msg and secret not in caplog.text
    assert "***" in repr(storage.redact(bad)) and bad[field] not in repr(storage.redact(bad))


def test_unreachable_endpoint_fails_fast(shards, opts):
    bad = {**opts, "endpoint_url": "http://127.0.0.1:9"}  # discard port: nothing listens
    t0 = time.monotonic()
    expected = r"cannot reach http://127\.0\.0\.1:9 — check AWS_ENDPOINT_URL"
    with pytest.raises(storage.StorageError, match=expected):
        shardlist.check_shards_reachable(list(shards), bad)
    assert time.monotonic() - t0 < 5


def test_redact_nested():
    opts = {"endpoint_url": "http://h", "key": "AKEY1", "secret": "SKEY1", "anon": False,
            "client_kwargs": {"aws_secret_access_key": "SKEY2", "region_name": "x"}}
    assert storage.redact(opts) == {"endpoint_url": "http://h", "key": "***", "secret": "***", "anon": False,
                                    "client_kwargs": {"aws_secret_access_key": "***", "region_name": "x"}}
    assert storage.scrub("denied for AKEY1/SKEY2 at http://u:pw@h/x", opts) == "denied for ***/*** at http://***@h/x"


def test_storage_options_for_env_endpoint(monkeypatch):
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://env-endpoint:1")
    monkeypatch.delenv("AWS_ENDPOINT_URL_S3", raising=False)
    o = storage.storage_options_for("s3://b/x.tar", {"key": "k", "read_retries": 3, "gs": {"token": "t"}})
    assert o["endpoint_url"] == "http://env-endpoint:1" and o["key"] == "k"
    assert "read_retries" not in o and "gs" not in o and "connect_timeout" in o["config_kwargs"]
    assert storage.storage_options_for("gs://b/x.tar", {"gs": {"token": "t"}}) == {"token": "t"}
    explicit = storage.storage_options_for("s3://b/x.tar", {"endpoint_url": "http://cfg:2"})
    assert explicit["endpoint_url"] == "http://cfg:2"
    assert storage.storage_options_for("/data/x.tar", {"key": "k"}) == {}
    assert storage.storage_options_for("https://h/x.tar", {"key": "k", "https": {"headers": {}}}) == {"headers": {}}


def test_fresh_interpreter_registers_from_env():
    # What a spawned DataLoader worker does: import ldmscale.data.storage with only the environment to go on.
    code = ("from webdataset.gopen import gopen_schemes as h; import ldmscale.data.storage; "
            "print(type(h['s3']).__name__, h['s3'].storage_options['endpoint_url'], type(h['gs']).__name__)")
    env = {**os.environ, storage.OPTIONS_ENV: json.dumps({"endpoint_url": "http://from-env:1"}),
           "PYTHONPATH": str(REPO)}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["FsspecGopen", "http://from-env:1", "FsspecGopen"]
