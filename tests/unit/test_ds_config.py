"""The DeepSpeed config ldmscale derives: bf16 runs reduce and accumulate gradients in fp32 unless told not to."""

from __future__ import annotations

import pytest
import torch

from ldmscale.config import load_config
from ldmscale.trainer.ds_config import build_ds_config


def _ds(*overrides: str) -> dict:
    cfg = load_config(None, ["data.shards=[x]", "model.pretrained=", "train.stage=autoencoder", *overrides])
    return build_ds_config(cfg.deepspeed, cfg.optim, cfg.train, world=1)


@pytest.mark.parametrize("zero", [1, 2, 3])
def test_bf16_defaults_to_fp32_reduction_and_accumulation(zero: int) -> None:
    ds = _ds("deepspeed.precision=bf16", f"deepspeed.zero_stage={zero}")
    assert ds["communication_data_type"] == "fp32" and ds["data_types"] == {"grad_accum_dtype": "fp32"}


def test_bf16_zero0_reduces_in_fp32_only() -> None:  # DeepSpeed 0.19.8 cannot accumulate in fp32 at stage 0
    ds = _ds("deepspeed.precision=bf16", "deepspeed.zero_stage=0")
    assert ds["communication_data_type"] == "fp32" and "data_types" not in ds


def test_fp32_runs_are_left_alone_and_bf16_reduction_can_be_turned_back() -> None:
    assert "communication_data_type" not in _ds("deepspeed.precision=fp32")
    ds = _ds("deepspeed.precision=bf16", "deepspeed.extra={communication_data_type: bf16, data_types: "
             "{grad_accum_dtype: bf16}}")
    assert ds["communication_data_type"] == "bf16" and ds["data_types"] == {"grad_accum_dtype": "bf16"}


def test_warmup_zero_means_no_warm_up() -> None:
    from deepspeed.runtime.lr_schedules import WarmupCosineLR

    params = _ds("optim.warmup_steps=0", "optim.lr=0.01")["scheduler"]["params"]
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.01)
    sched = WarmupCosineLR(opt, **params)  # DeepSpeed refused warmup_num_steps=0 after the process group was up
    lrs = [opt.param_groups[0]["lr"]]  # what the first optimizer step uses
    for _ in range(3):
        sched.step()
        lrs.append(opt.param_groups[0]["lr"])
    assert lrs[0] == lrs[1] == pytest.approx(0.01) and 0.009 < lrs[3] < lrs[2] < 0.01  # full LR, then cosine
