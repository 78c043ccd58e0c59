"""style.lr_scale through the engine the trainer builds: the new parameters' group keeps lr x scale through DeepSpeed's
warm-up and cosine schedule, and the EMA still covers every parameter of both groups."""

from __future__ import annotations

import pytest
import torch

from ldmscale.config import Config
from ldmscale.trainer.ds_config import build_ds_config
from ldmscale.trainer.ema import EMA
from ldmscale.trainer.engine import build_engine, optimizer_groups


@pytest.fixture(scope="module", autouse=True)
def _group(single_rank_group: None) -> None:
    """The engine is built in this process."""


class _Module(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.unet = torch.nn.Linear(4, 4)
        self.style = torch.nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (self.unet(x) + self.style(x)).pow(2).mean()


@pytest.mark.parametrize("zero", [0, 2])
def test_the_style_group_trains_at_lr_times_scale_through_the_schedule(zero: int) -> None:
    cfg = Config()
    cfg.style.enabled, cfg.style.lr_scale = True, 10.0
    cfg.optim.lr, cfg.optim.warmup_steps, cfg.deepspeed.zero_stage, cfg.deepspeed.precision = 1e-3, 3, zero, "fp32"
    cfg.train.max_steps, cfg.train.global_batch_size, cfg.train.micro_batch_size = 8, 2, 2
    torch.manual_seed(0)
    module = _Module()
    named = list(module.named_parameters())
    engine = build_engine(module, optimizer_groups(named, cfg), build_ds_config(cfg.deepspeed, cfg.optim, cfg.train, 1))
    ema = EMA(named, 0.5, engine.optimizer)
    lrs = []
    for _ in range(6):
        engine.backward(engine(torch.randn(2, 4)))
        engine.step()
        ema.update()
        lrs.append([g["lr"] for g in engine.optimizer.param_groups])
    assert all(new == pytest.approx(10 * base) for base, new in lrs), lrs
    assert len({round(base, 9) for base, _ in lrs}) > 3  # warm-up and decay moved both groups together
    assert set(ema.state_dict()) == {n for n, _ in named}
