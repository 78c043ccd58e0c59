"""The DeepSpeed config, derived from ours: one source of truth for batch sizes, precision and ZeRO."""

from __future__ import annotations

from typing import Any

import torch

from ldmscale.config import Config, _deep_merge

_OPTIMIZERS = {"adamw": "AdamW", "adam": "Adam", "sgd": "SGD"}


def accumulation_steps(cfg: Config, world: int) -> int:
    return cfg.train.global_batch_size // (world * cfg.train.micro_batch_size)


def build_ds_config(cfg: Config, world: int) -> dict[str, Any]:
    t, o, d = cfg.train, cfg.optim, cfg.deepspeed
    params: dict[str, Any] = {"lr": o.lr, "weight_decay": o.weight_decay}
    if o.name in ("adam", "adamw"):
        params.update(betas=list(o.betas), eps=o.eps)
        if not d.offload_optimizer and not torch.cuda.is_available():
            # torch's Adam: FusedAdam would JIT-compile for ~2 minutes on every fresh CPU machine
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
        "gradient_accumulation_steps": accumulation_steps(cfg, world),
        "gradient_clipping": o.grad_clip,
        "optimizer": {"type": _OPTIMIZERS[o.name], "params": params},
        "scheduler": {
            "type": "WarmupCosineLR",
            "params": {
                "total_num_steps": t.max_steps,
                "warmup_num_steps": o.warmup_steps,
                "warmup_min_ratio": 0.0,
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
    return _deep_merge(ds, d.extra)


def precision_dtype(cfg: Config) -> torch.dtype:
    return {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[cfg.deepspeed.precision]
