"""A few rows of tests/unit/test_cli_inputs.py through the installed console scripts, each in a child process: the
real entry points keep the same contract (exit code 2, one line on stderr, no traceback, the fix named), including
an error found after the process group started (an object-store prefix that cannot be listed, found by rank 0 and
sent to every rank)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO, tiny_overrides, train_env
from tests.unit.test_cli_inputs import fake_run

TINY = str(REPO / "configs/tiny.yaml")
BIN = Path(sys.executable).parent


@pytest.fixture(scope="module")
def run_dir(assets: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return fake_run(tmp_path_factory.mktemp("cli") / "run", assets)


def rows(assets: Path, run: Path, tmp: Path) -> list[tuple[list[str], str]]:
    (tmp / "notimg.png").write_text("not an image")
    (tmp / "notatar.tar").write_text("not a tar")
    (tmp / "p.txt").write_text("a digit\n")
    ov = tiny_overrides(assets, tmp / "trainrun")
    # one row per console script: its input errors before the process group (a config file's YAML, ...) are
    # tests/unit/test_cli_inputs.py's rows; here ldmscale-train meets one after the group started
    return [
        (["ldmscale-train", "--config", TINY, *ov, "data.shards=[s3://bucket/prefix/]", "--resume", "never",
          "data.storage_options={endpoint_url: 'http://127.0.0.1:1', key: k, secret: s}"],
         "data error: s3://bucket/prefix/: cannot list the shards: cannot reach http://127.0.0.1:1"),
        (["ldmscale-sample", str(run), "--prompt", "a", "--style-image", str(tmp / "notimg.png")],
         "not an image PIL can read"),
        (["ldmscale-export", str(run), str(run)], "checkpoint error: OUT"),
        (["ldmscale-eval", str(run), "--prompts", str(tmp / "p.txt"), "--features", "pixels:4", "--num-images", "4",
          "--reference", str(assets / "digits/heldout"), "--resolution", "30"], "try --resolution 32"),
        (["ldmscale-encode", "--config", TINY, "--out", str(tmp / "lat"), *ov, f"data.shards=[{tmp / 'notatar.tar'}]"],
         "is not a tar file"),
        (["ldmscale-launch", "--config", TINY, *ov, "--nodes", "3"], "nothing submitted: config error: train.global_b"),
        (["ldmscale-ema", str(run), "--sigma-rel", "0.1", "--out", str(tmp / "ema")], "no posthoc_ema/ folder"),
    ]


def test_console_scripts_answer_bad_input_with_one_line(assets: Path, run_dir: Path, tmp_path: Path) -> None:
    # DS_ACCELERATOR: on a machine without a GPU, DeepSpeed's import logs a line unless told its accelerator
    env = {**train_env(), "DS_ACCELERATOR": "cpu"}
    failures = []
    for argv, keyword in rows(assets, run_dir, tmp_path):
        r = subprocess.run([str(BIN / argv[0]), *argv[1:]], capture_output=True, text=True, env=env, timeout=300,
                           cwd=tmp_path)
        lines = r.stderr.strip().splitlines()
        ok = (r.returncode == 2 and len(lines) == 1 and lines[0].startswith(argv[0] + ": ") and keyword in lines[0]
              and "Traceback" not in r.stderr)
        if not ok:
            failures.append(json.dumps({"argv": argv[:2], "rc": r.returncode, "stderr": r.stderr[-1500:]}))
    assert not failures, "\n".join(failures)
