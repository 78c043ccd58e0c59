"""Mistakes a new user makes, each a one-line error before any process group, exit 2 (no traceback): the console
scripts' entry functions called in this process, with the process-group setup replaced by a failure (the child
processes that run these entry points for real: every integration test)."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.conftest import REPO, tiny_overrides

TINY = REPO / "configs/tiny.yaml"


@pytest.fixture(autouse=True)
def no_process_group(monkeypatch: pytest.MonkeyPatch) -> None:
    """Reaching the process-group setup fails the test: every check here must come before it."""
    from ldmscale.runtime import dist

    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("a process group was started before the input was checked")

    monkeypatch.setattr(dist, "init_distributed", refuse)
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(var, raising=False)


def _exit_2_with_one_line(cli: object, argv: list[str], expected: str, capsys: pytest.CaptureFixture) -> None:
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        cli(argv)  # type: ignore[operator]
    err = capsys.readouterr().err
    assert exit_info.value.code == 2, err[-3000:]
    lines = [ln for ln in err.splitlines() if expected in ln]
    assert len(lines) == 1 and "Traceback" not in err, err[-3000:]


@pytest.mark.parametrize("case", ["workers", "resume", "unet", "sample"])
def test_start_up_mistakes_exit_2_with_one_line(assets: Path, tmp_path: Path, case: str,
                                                monkeypatch: pytest.MonkeyPatch,
                                                capsys: pytest.CaptureFixture) -> None:
    from ldmscale.inference.sample import cli as sample_cli
    from ldmscale.trainer.cli import cli as train_cli

    train = ["--config", str(TINY), *tiny_overrides(assets, tmp_path / "run")]
    cli = train_cli
    if case == "workers":  # 8 shards for 2 ranks x 5 workers
        argv = [*train, "data.num_workers=5"]
        for var, value in {"RANK": "0", "WORLD_SIZE": "2", "LOCAL_RANK": "0"}.items():
            monkeypatch.setenv(var, value)
        expected = "ldmscale-train: data error: 8 shards cannot feed 2 ranks x 5 loader workers"
    elif case == "resume":
        argv, expected = [*train, "--resume", str(tmp_path / "no/such/dir")], "ldmscale-train: resume error: "
        expected += f"{tmp_path / 'no/such/dir'}: no such checkpoint"
    elif case == "unet":
        argv, expected = [*train, "model.unet=tinyy"], "config error: model.unet='tinyy' is no preset (tiny"
    else:
        (tmp_path / "photos").mkdir()
        (tmp_path / "photos" / "cat.txt").write_text("not a checkpoint")
        cli, argv = sample_cli, [str(tmp_path / "photos"), "--prompt", "a cat"]
        expected = f"ldmscale-sample: checkpoint error: {tmp_path / 'photos'} is not a checkpoint"
    _exit_2_with_one_line(cli, argv, expected, capsys)
    assert not (tmp_path / "run" / "log.jsonl").exists()


def test_cli_reports_config_error_before_starting(assets: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """The CLI exits 2 with the message and never reaches process-group setup (no port, no DeepSpeed)."""
    from ldmscale.trainer.cli import cli

    argv = ["--config", str(TINY), *tiny_overrides(assets, tmp_path), "deepspeed.zero_stage=5"]
    _exit_2_with_one_line(cli, argv, "config error: deepspeed.zero_stage=5 is not allowed", capsys)
    assert not (tmp_path / "config.yaml").exists()
