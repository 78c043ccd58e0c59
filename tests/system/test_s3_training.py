"""The trainer streaming LAION-layout shards from a real S3 server (Ceph radosgw, tools/s3_local/).

- A 2-process run reading s3:// shards, with radosgw killed and restarted mid-run, reproduces the same run
  read from local disk: the same per-step losses and the same sample keys on every rank.
- A prefix ending in "/" lists a bucket's shards (and only the .tar objects).
- Wrong credentials and an unreachable endpoint stop `ldmscale-train` at once with exit code 2 and a
  "data error: ..." line that names the fix and not the secret.
- A shard missing from the list and a corrupt object among the shards are skipped and counted; training completes.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from ldmscale.data import shardlist, storage
from tests.conftest import REPO, free_port, tiny_overrides, train_env
from tests.s3_fixtures import S3Server, upload_laion_shards

pytestmark = pytest.mark.s3

# 20 steps are 2.5 epochs of the 64 digit samples: the loaders keep opening shards through the restart
MAX_STEPS = 20
RESTART_AT_STEP = 3
# Small GETs (32 KiB, a few samples each) and no botocore retries: the restart cannot hide inside one
# big buffered read or botocore's own retry, so ldmscale's reopen-and-seek path has to carry the run.
STREAMING = {
    "data.storage_options.read_block_size": 32768,
    "data.storage_options.config_kwargs.retries.total_max_attempts": 1,
}
# The same data position and schedule in every run; samples_per_epoch=0 counts the epoch from the shards'
# _stats.json files, read from S3 in the streamed run.
COMMON = {
    "train.max_steps": MAX_STEPS, "train.log_every": 2, "train.log_sample_keys": "true", "train.ckpt_every": 1000,
    "data.num_workers": 1, "data.shuffle_buffer": 20, "data.samples_per_epoch": 0,
}


# ---------------------------------------------------------------- helpers


def _s3_env(server: S3Server, **override: str) -> dict[str, str]:
    """The trainer's environment: credentials in the standard AWS variables only, never in the config."""
    env = train_env()
    for k in ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_PROFILE", storage.OPTIONS_ENV):
        env.pop(k, None)
    env.update({"AWS_ACCESS_KEY_ID": server.key, "AWS_SECRET_ACCESS_KEY": server.secret, **override})
    return env


def _torchrun(args: list[str]) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={free_port()}",
            "-m", "ldmscale.train", *args]


def _train_args(assets: Path, out: Path, **extra: object) -> list[str]:
    return ["--config", str(REPO / "configs/tiny.yaml"), "--resume", "never", *tiny_overrides(assets, out, **extra)]


def _run(cmd: list[str], env: dict[str, str], log: Path, timeout: float = 300) -> int:
    with open(log, "w") as f:
        proc = subprocess.Popen(cmd, env=env, stdout=f, stderr=subprocess.STDOUT, cwd=REPO, start_new_session=True)
        return _wait(proc, timeout)


def _wait(proc: subprocess.Popen, timeout: float) -> int:
    try:
        return proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # the launcher and every rank: a hung run must not outlive the test
        proc.wait()
        raise


def _records(out: Path) -> list[dict]:
    f = out / "log.jsonl"
    return [r for r in map(json.loads, f.read_text().splitlines()) if "step" in r] if f.exists() else []


def _losses(out: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in _records(out)}


def _keys(out: Path, rank: int) -> dict[int, list[str]]:
    lines = (out / "sample_keys" / f"rank{rank:05d}.jsonl").read_text().splitlines()
    return {r["step"]: r["keys"] for r in map(json.loads, lines)}


# ---------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def digits_s3(assets: Path, s3_fs, s3_bucket: str) -> dict:
    """The session's digit train shards (tar + parquet + _stats.json) uploaded to s3://bucket/digits/."""
    local = sorted((assets / "digits/train").iterdir())
    for path in local:
        s3_fs.put_file(str(path), f"{s3_bucket}/digits/{path.name}")
    tars = sorted(p for p in local if p.suffix == ".tar")
    assert len(tars) >= 4 and any(p.suffix == ".parquet" for p in local)
    last = int(tars[-1].stem)
    return {
        "pattern": f"s3://{s3_bucket}/digits/{{00000..{last:05d}}}.tar",
        "urls": [f"s3://{s3_bucket}/digits/{p.name}" for p in tars],
        "prefix": f"s3://{s3_bucket}/digits/",
    }


@pytest.fixture(scope="module")
def local_run(assets: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The reference: the same 2-process run reading the same shards from local disk."""
    out = tmp_path_factory.mktemp("s3train") / "local"
    rc = _run(_torchrun(_train_args(assets, out, **COMMON)), train_env(), out.with_suffix(".log"))
    assert rc == 0, out.with_suffix(".log").read_text()[-3000:]
    return out


# ---------------------------------------------------------------- tests


def test_streamed_run_survives_radosgw_restart_and_matches_local_run(
    assets: Path, digits_s3: dict, local_run: Path, s3_server: S3Server, tmp_path: Path
) -> None:
    out = tmp_path / "s3"
    args = _train_args(assets, out, **COMMON, **STREAMING, **{
        "data.shards": json.dumps([digits_s3["pattern"]]),  # quoted: YAML reads a bare "{" as a mapping
        "data.storage_options.endpoint_url": s3_server.endpoint,
    })
    log = tmp_path / "s3.log"
    with open(log, "w") as f:
        proc = subprocess.Popen(_torchrun(args), env=_s3_env(s3_server), stdout=f, stderr=subprocess.STDOUT,
                                cwd=REPO, start_new_session=True)
        deadline = time.monotonic() + 240
        while not any(r["step"] >= RESTART_AT_STEP for r in _records(out)):
            assert proc.poll() is None, f"the run ended before step {RESTART_AT_STEP}:\n{log.read_text()[-3000:]}"
            assert time.monotonic() < deadline, "no training step logged within 240 s"
            time.sleep(0.1)
        # radosgw down for 2 s plus its start-up: the loaders need new blocks every few steps meanwhile
        restarter = threading.Thread(target=s3_server.restart_rgw, kwargs={"down_s": 2.0})
        restarter.start()
        restarted_at = max(r["step"] for r in _records(out))
        rc = _wait(proc, timeout=300)
        restarter.join()
    text = log.read_text()
    assert rc == 0, text[-3000:]
    assert restarted_at < MAX_STEPS, "the run finished before the restart; it proves nothing"
    assert "transient" in text, "the restart never reached the shard reader"
    assert f"FINISHED step={MAX_STEPS}" in text
    local, streamed = _losses(local_run), _losses(out)
    assert sorted(streamed) == list(range(1, MAX_STEPS + 1))
    assert streamed == local  # bitwise: identical JSON floats, so identical pixels, captions and order
    for rank in range(2):
        assert _keys(out, rank) == _keys(local_run, rank)  # no sample lost, repeated or reordered
    assert s3_server.secret not in text and s3_server.key not in text
    assert s3_server.secret not in (out / "config.yaml").read_text()


def test_prefix_lists_only_the_tar_shards(digits_s3: dict, s3_server: S3Server) -> None:
    opts = s3_server.storage_options
    listed = shardlist.expand_shard_urls(digits_s3["prefix"], opts)
    assert listed == digits_s3["urls"]  # sorted; no .parquet or _stats.json
    assert shardlist.expand_shard_urls(digits_s3["pattern"], opts) == listed


@pytest.mark.parametrize("fault", ["wrong_secret", "unreachable_endpoint"])
def test_storage_misconfiguration_exits_2_with_a_data_error(
    assets: Path, digits_s3: dict, s3_server: S3Server, tmp_path: Path, fault: str
) -> None:
    endpoint, env = s3_server.endpoint, _s3_env(s3_server)
    wrong_secret = "wrong-secret-Xq7Lz04pW"
    if fault == "wrong_secret":
        env["AWS_SECRET_ACCESS_KEY"] = wrong_secret
        expected = "access denied — check AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY"
    else:
        endpoint = "http://127.0.0.1:9"  # the discard port: nothing listens
        expected = "cannot reach http://127.0.0.1:9 — check AWS_ENDPOINT_URL"
    exe = shutil.which("ldmscale-train", path=str(Path(sys.executable).parent)) or "ldmscale-train"
    cmd = [exe, *_train_args(assets, tmp_path / "out", **{
        "data.shards": json.dumps([digits_s3["pattern"]]), "data.storage_options.endpoint_url": endpoint})]
    t0 = time.monotonic()
    # the timeout only guards against a hang; the check itself makes one request and no retry loop
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120, cwd=REPO)
    print(f"{fault}: exit {r.returncode} after {time.monotonic() - t0:.1f}s (interpreter start included)")
    assert r.returncode == 2, r.stderr[-3000:]
    lines = [ln for ln in r.stderr.splitlines() if ln.startswith("ldmscale-train: data error: ")]
    assert len(lines) == 1 and expected in lines[0], r.stderr[-3000:]
    assert "Traceback" not in r.stderr and "retry" not in r.stderr
    for secret in (wrong_secret, s3_server.secret, s3_server.key):
        assert secret not in r.stderr and secret not in r.stdout
    assert not (tmp_path / "out" / "log.jsonl").exists()  # stopped before any process group or step


def test_missing_and_corrupt_shards_are_skipped_and_counted(
    assets: Path, s3_fs, s3_bucket: str, s3_server: S3Server, tmp_path: Path
) -> None:
    # 3 shards x 16 samples: one epoch (64 samples + the shuffle buffer) passes every shard at least once,
    # whatever the seeded order, so both bad ones are met.
    good = upload_laion_shards(s3_fs, f"{s3_bucket}/faulty", 3, 16)
    s3_fs.pipe(f"{s3_bucket}/faulty/00003.tar", b"this is not a tar archive\n" * 200)
    shards = [f"s3://{s3_bucket}/faulty/", f"s3://{s3_bucket}/faulty/00009.tar"]  # prefix (4 tars) + a missing one
    out, log = tmp_path / "faulty", tmp_path / "faulty.log"
    args = _train_args(assets, out, **{
        "data.shards": json.dumps(shards), "data.storage_options.endpoint_url": s3_server.endpoint,
        "data.num_workers": 1, "data.shuffle_buffer": 20, "data.samples_per_epoch": 64,
        "data.max_failed_shards": 0.5,  # 2 of these 5 shards are bad on purpose: the job may lose 2 (default 1 %)
        "train.max_steps": 8, "train.log_every": 4, "train.log_sample_keys": "true", "train.ckpt_every": 1000,
    })
    rc = _run([sys.executable, "-m", "ldmscale.train", *args], _s3_env(s3_server), log)
    text = log.read_text()
    assert rc == 0, text[-3000:]
    assert "FINISHED step=8" in text
    logged = [r for r in _records(out) if "images_per_s" in r]  # the log steps carry the data counters
    assert [r["step"] for r in logged] == [4, 8]
    # step 8 ends the epoch: the missing object was dropped at once, the corrupt one retried at the end of the
    # pass, failed again and was dropped for the epoch
    assert logged[-1].get("data/dropped_shard_missing", 0) == 1, logged[-1]
    assert logged[-1].get("data/dropped_shard_retry", 0) >= 1, logged[-1]
    assert logged[-1].get("data/dropped_shard_error", 0) >= 1, logged[-1]
    assert "skipping bad data (shard_error" in text and "00009.tar does not exist" in text
    valid = {k for keys in good.values() for k in keys}
    seen = [k for keys in _keys(out, 0).values() for k in keys]
    assert len(seen) == 8 * 8 and set(seen) <= valid
