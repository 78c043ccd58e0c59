"""The shipped LAION configs run as their headers say: at 8, 128 and 1,024 ranks, from the served SD 1.5 hub id, and
the 512 px continuation samples and exports at 512 px."""

from __future__ import annotations

from pathlib import Path

import pytest

from ldmscale.config import load_config, validate
from ldmscale.config.schema import ConfigError
from ldmscale.models.networks import build_unet
from tests.conftest import REPO


@pytest.mark.parametrize(("name", "micro"), [("laion-256", {8: 64, 128: 16, 1024: 2}),
                                             ("laion-512", {8: 16, 128: 8, 1024: 1}),
                                             ("laion-cc12m", {8: 64, 128: 16, 1024: 2})])
def test_the_laion_configs_run_at_8_128_and_1024_ranks(name: str, micro: dict[int, int],
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("HF_HUB_OFFLINE")  # a hub id is only named here, never fetched
    for world, expected in micro.items():
        cfg = load_config(REPO / f"configs/{name}.yaml", ["model.unet=sd15"])  # laion-512's folder is the 256 run's
        assert cfg.model.pretrained == "stable-diffusion-v1-5/stable-diffusion-v1-5"
        validate(cfg, world_size=world, device_type="cuda")
        assert cfg.train.micro_batch_size == expected, world
        assert cfg.train.global_batch_size % (world * expected) == 0
        validate(cfg, world_size=world // 2, device_type="cuda")  # an elastic resume derives it again
        assert cfg.train.micro_batch_size == min(cfg.train.max_micro_batch_size, 2 * expected)
    with pytest.raises(ConfigError, match="not divisible by the 96 ranks"):
        validate(load_config(REPO / f"configs/{name}.yaml", ["model.unet=sd15"]), world_size=96, device_type="cuda")


def test_a_unet_fine_tuned_at_another_resolution_samples_at_this_one(tmp_path: Path) -> None:
    """laion-512 starts from the 256 px run's U-Net (sample_size 32 latents): grids and exports must be 512 px."""
    build_unet("tiny", 4, 32, 4).save_pretrained(tmp_path / "unet")
    assert build_unet(str(tmp_path), 4, 32, 8).config.sample_size == 8
