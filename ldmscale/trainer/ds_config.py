"""The DeepSpeed config, derived from ours: one source of truth for batch sizes, precision and ZeRO."""

from __future__ import annotations

from typing import Any

import torch

from ldmscale.config import DeepSpeedConfig, OptimConfig, TrainConfig, deep_merge
from ldmscale.runtime.precision import torch_dtype

_OPTIMIZERS = {"adamw": "AdamW", "adam": "Adam", "sgd": "SGD"}


def accumulation_steps(train: TrainConfig, world: int) -> int:
    """Micro-batches per optimizer step on each rank: the global batch over (ranks x micro-batch)."""
    return train.global_batch_size // (world * train.micro_batch_size)


def bf16_reduction(zero_stage: int) -> dict[str, Any]:
    """fp32 gradient reduction and accumulation for bf16 runs (DeepSpeed 0.19.8's defaults are bf16 for both).

    With only `bf16.enabled`, DeepSpeed's `communication_data_type` is bf16 at every ZeRO stage (all-reduce and
    reduce-scatter of bf16 gradients: 8 mantissa bits summed over hundreds of ranks), and `grad_accum_dtype`
    defaults to the model dtype, so micro-batch gradients are summed in bf16 too: ZeRO-0 in the bf16 `.grad`
    (FP16_UnfusedOptimizer), ZeRO-1/2 in bf16 partition buffers, ZeRO-3 in bf16 partitioned gradients.
    Here: reduce in fp32 at every stage; accumulate in fp32 at stages 1-3 (ZeRO-1 then runs DeepSpeed's
    BF16_Optimizer, ZeRO-2/3 their fp32 accumulation buffers). DeepSpeed 0.19.8 has no fp32 accumulation at
    ZeRO-0 ("unsupported mix of model_dtype and grad_accum_dtype"): ZeRO-0 bf16 still accumulates in bf16.
    Back to DeepSpeed's defaults: deepspeed.extra={communication_data_type: bf16, data_types:
    {grad_accum_dtype: bf16}}."""
    out: dict[str, Any] = {"communication_data_type": "fp32"}
    if zero_stage > 0:
        out["data_types"] = {"grad_accum_dtype": "fp32"}
    return out


def build_ds_config(d: DeepSpeedConfig, o: OptimConfig, t: TrainConfig, world: int) -> dict[str, Any]:
    """The DeepSpeed config dict of our deepspeed, optim and train sections for `world` ranks
    (`deepspeed.extra` merged last, so any DeepSpeed key can still be set)."""
    params: dict[str, Any] = {"lr": o.lr, "weight_decay": o.weight_decay}
    if o.name in ("adam", "adamw"):
        params.update(betas=list(o.betas), eps=o.eps)
        if not d.offload_optimizer and (not torch.cuda.is_available() or not o.fused_adam):
            # torch's Adam: on CPU FusedAdam would JIT-compile for ~2 minutes on every fresh machine and gain nothing
            params["torch_adam"] = True
    zero: dict[str, Any] = {"stage": d.zero_stage}
    if d.zero_stage > 0:
        zero.update(overlap_comm=torch.cuda.is_available(), contiguous_gradients=True)
    if d.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": torch.cuda.is_available()}
    if d.offload_param:
        zero["offload_param"] = {"device": "cpu", "pin_memory": torch.cuda.is_available()}
    ds: dict[str, Any] = {
        "train_batch_size": t.global_batch_size,
        "train_micro_batch_size_per_gpu": t.micro_batch_size,
        "gradient_accumulation_steps": accumulation_steps(t, world),
        "gradient_clipping": o.grad_clip,
        "optimizer": {"type": _OPTIMIZERS[o.name], "params": params},
        "scheduler": {
            "type": "WarmupCosineLR",
            "params": {
                "total_num_steps": t.max_steps,
                # 0 = no warm-up. WarmupCosineLR refuses 0 steps and sets LR 0 for the first one; started past
                # iteration -1 it leaves the optimizer's LR for step 1, and a min ratio of 1 keeps it there
                "warmup_num_steps": max(1, o.warmup_steps),
                "warmup_min_ratio": 0.0 if o.warmup_steps else 1.0,
                "last_batch_iteration": -1 if o.warmup_steps else 0,
                "cos_min_ratio": o.min_lr_ratio,
                "warmup_type": "linear",
            },
        },
        "zero_optimization": zero,
        "bf16": {"enabled": d.precision == "bf16"},
        "fp16": {"enabled": d.precision == "fp16"},
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }
    if d.precision == "bf16":
        ds.update(bf16_reduction(d.zero_stage))
    return deep_merge(ds, d.extra)


def precision_dtype(d: DeepSpeedConfig) -> torch.dtype:
    return torch_dtype(d.precision)
