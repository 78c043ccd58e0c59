"""The DeepSpeed engine the trainer steps, built from the stage's module and our DeepSpeed config."""

from __future__ import annotations

from typing import Any

import deepspeed
import torch


def build_engine(module: torch.nn.Module, params: list[torch.nn.Parameter], ds_config: dict[str, Any]) -> Any:
    """`deepspeed.initialize`, minus the work that a single data-parallel rank does for nothing.

    ZeRO-0 on one rank: DeepSpeed still flattens every gradient into buckets, all-reduces them with itself and
    copies them back after each accumulation boundary (a full extra read and write of the gradients per step).
    The all-reduce of one rank is the identity and the average divides by 1, so skipping it leaves every value
    bitwise the same (tests/test_engine.py). ZeRO-1/2/3 reduce inside their optimizer and keep their path:
    their partitioned state is what a later resume on more ranks converts."""
    engine, _, _, _ = deepspeed.initialize(model=module, model_parameters=params, config=ds_config)
    if engine.dp_world_size == 1 and engine.zero_optimization_stage() == 0:
        engine.enable_backward_allreduce = False
    return engine
