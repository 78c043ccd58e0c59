"""A training micro-batch makes no host sync and no blocking host-to-device copy (the GPU path's critical path).

The meta device stands in for a GPU: a value read back to the host (`.item()`, `.tolist()`, a Python `if` on a
tensor), a draw made on the CPU and mixed in, or a CPU tensor meeting a device tensor all fail there. Copies
from the batch are recorded: each must be non-blocking, since on CUDA a blocking copy waits for the whole queue.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from ldmscale.config import load_config
from ldmscale.trainer.stages import build_stage
from tests.conftest import REPO, tiny_overrides

META = torch.device("meta")


SIZE = {"model.size_conditioning": True, "model.size_embed_dim": 16}


@pytest.mark.parametrize(("extra", "canvas", "size_cond"), [
    ({}, None, False),
    ({"model.noise_offset": 0.1}, None, False),
    (SIZE, None, False),  # square batches: SDXL's default conditioning, made on the device
    (SIZE, (24, 40), True),  # a bucket's batch with its loader-made size conditioning
], ids=["plain", "noise_offset", "size_default", "size_bucket"])
def test_a_micro_batch_runs_on_the_device_without_host_sync(
    assets: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, extra: dict[str, Any],
    canvas: tuple[int, int] | None, size_cond: bool,
) -> None:
    cfg = load_config(REPO / "configs/tiny.yaml", tiny_overrides(assets, tmp_path, **{"data.caption_dropout": 0.5,
                                                                                      **extra}))
    stage = build_stage(cfg, META, torch.float32)
    module = stage.module.to(META)  # what DeepSpeed's engine does to the trained module
    b, res = 4, cfg.data.resolution
    h, w = canvas or (res, res)
    batch = {"pixels": torch.zeros(b, 3, h, w, dtype=torch.uint8),
             "input_ids": torch.zeros(b, stage.tokenizer.model_max_length, dtype=torch.long),
             "keys": [str(i) for i in range(b)]}
    if size_cond:
        batch["size_cond"] = torch.tensor([[40, 50, 3, 0, h, w]] * b)
    stage.loss(module, batch, range(b), step=2)  # diffusers moves the schedule to the device once, on first use
    blocking: list[str] = []
    real_to = torch.Tensor.to

    def spy_to(self: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        out = real_to(self, *args, **kwargs)
        if self.device.type == "cpu" and out.device.type != "cpu" and not kwargs.get("non_blocking", False):
            blocking.append(f"{tuple(self.shape)} {self.dtype}")
        return out

    monkeypatch.setattr(torch.Tensor, "to", spy_to)
    loss, parts = stage.loss(module, batch, range(8, 8 + b), step=3)
    assert loss.device == META and all(v.device == META for v in parts.values())
    assert not blocking, f"blocking host-to-device copies in a micro-batch: {blocking}"
