"""Bad configuration fails before any process group starts, naming the key and what is allowed."""

from __future__ import annotations

from pathlib import Path

import pytest

from ldmscale.config import ConfigError, load_config, parse_override, validate
from ldmscale.trainer.ds_config import build_ds_config
from tests.conftest import REPO, tiny_overrides

TINY = REPO / "configs/tiny.yaml"


def test_overrides_parse_types_and_nesting(assets: Path, tmp_path: Path) -> None:
    cfg = load_config(TINY, tiny_overrides(assets, tmp_path) + ["optim.lr=3e-4", "data.filters.allowed_nsfw=[UNLIKELY]",
                                                                "train.log_sample_keys=true"])
    assert cfg.optim.lr == pytest.approx(3e-4)
    assert cfg.data.filters.allowed_nsfw == ["UNLIKELY"]
    assert cfg.train.log_sample_keys is True
    assert cfg.train.max_steps == 20  # from tiny.yaml, untouched by overrides
    assert cfg.optim.betas == (0.9, 0.999)  # a default the YAML did not set
    assert parse_override("a.b.c=1") == {"a": {"b": {"c": 1}}}


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("train.bogus=1", "unknown config key train.bogus"),
        ("deepspeed.zero_stage=4", "deepspeed.zero_stage=4 is not allowed; choose one of [0, 1, 2, 3]"),
        ("train.max_steps=ten", "train.max_steps: expected an integer"),
        ("train.global_batch_size=10", "not divisible by ranks (1) x train.micro_batch_size (4)"),
        ("deepspeed.precision=fp16", "fp16 is not supported on CPU"),
        ("model.prediction_type=x0", "model.prediction_type='x0' is not allowed"),
        ("deepspeed.offload_param=true", "offload_param=true needs deepspeed.zero_stage=3"),
        ("model.vae=/nonexistent/vae", "model.vae='/nonexistent/vae': no such folder"),
        ("data.resolution=30", "must be a multiple of 8"),
        ("train.ema_decay=1.5", "train.ema_decay=1.5 must be in [0, 1)"),
    ],
)
def test_bad_config_is_rejected_with_its_key(assets: Path, tmp_path: Path, override: str, message: str) -> None:
    with pytest.raises(ConfigError) as err:
        load_config(TINY, tiny_overrides(assets, tmp_path) + [override])
    assert message in str(err.value)


def test_batch_divisibility_uses_the_world_size(assets: Path, tmp_path: Path) -> None:
    cfg = load_config(TINY, tiny_overrides(assets, tmp_path))  # global 8, micro 4
    validate(cfg, world_size=2)
    with pytest.raises(ConfigError, match="ranks \\(3\\)"):
        validate(cfg, world_size=3)
    assert build_ds_config(cfg.deepspeed, cfg.optim, cfg.train, 2)["gradient_accumulation_steps"] == 1
    assert build_ds_config(cfg.deepspeed, cfg.optim, cfg.train, 1)["gradient_accumulation_steps"] == 2


def test_missing_shards_and_models(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="data.shards is empty"):
        load_config(TINY, [f"train.out_dir={tmp_path}"])
    with pytest.raises(ConfigError, match="needs model.pretrained"):
        load_config(TINY, [f"train.out_dir={tmp_path}", "data.shards=[x.tar]"])




def test_unquoted_braces_in_a_list_get_a_clear_error(assets: Path, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not valid YAML.*quote strings"):
        load_config(TINY, tiny_overrides(assets, tmp_path) + ["data.shards=[s3://b/{00000..00009}.tar]"])


def test_saved_config_masks_storage_credentials(assets: Path, tmp_path: Path) -> None:
    from ldmscale.config import dump_config

    cfg = load_config(TINY, tiny_overrides(assets, tmp_path) + [
        "data.storage_options.key=AKIAEXAMPLE", "data.storage_options.secret=hunter2",
        "data.storage_options.endpoint_url=http://127.0.0.1:7480"])
    text = dump_config(cfg)
    assert "hunter2" not in text and "AKIAEXAMPLE" not in text
    assert "http://127.0.0.1:7480" in text
    assert cfg.data.storage_options["secret"] == "hunter2"  # the live config keeps what the loader needs


def test_saved_config_without_a_newer_field_keeps_the_value_its_run_used() -> None:
    """A style run saved before style.colour_stats existed trained without it: loading its config must not turn it
    on (the encoder's weights would no longer fit), while a config that names the field keeps its value."""
    from ldmscale.config import config_from_yaml_text, dump_config

    old = "style:\n  enabled: true\n  num_tokens: 4\n"
    assert config_from_yaml_text(old).style.uses_colour_stats is False
    fresh = load_config(None, ["data.shards=[x.tar]", "train.stage=autoencoder", "style.enabled=true"])
    assert fresh.style.uses_colour_stats is True  # the conv backbone's default
    assert config_from_yaml_text(dump_config(fresh)).style.uses_colour_stats is True
