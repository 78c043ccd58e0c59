"""FLOPs are counted device-independently: the stage's encoders sit on another device than the U-Net (as on
CUDA, where the U-Net stays on the CPU until DeepSpeed moves it); the meta device plays that device here."""

from __future__ import annotations

from pathlib import Path

import torch

from ldmscale.config import load_config
from ldmscale.trainer.stages import build_stage
from tests.conftest import REPO, tiny_overrides


def test_flops_with_encoders_on_another_device_than_the_unet(assets: Path, tmp_path: Path) -> None:
    cfg = load_config(REPO / "configs/tiny.yaml", tiny_overrides(assets, tmp_path))
    stage = build_stage(cfg, torch.device("meta"), torch.float32)
    assert next(stage.trained.parameters()).device.type == "cpu" and stage.encoders.vae.device.type == "meta"
    unet, vae = stage.flops_per_sample(), stage.encode_flops_per_sample()
    on_cpu = build_stage(cfg, torch.device("cpu"), torch.float32)
    assert unet == on_cpu.flops_per_sample() > 1e6  # the same count wherever the inputs would live
    assert vae == on_cpu.encode_flops_per_sample() > 1e6
