"""The DeepSpeed engine the trainer steps, built from the stage's module and our DeepSpeed config, and `Engine`:
the part of DeepSpeed's engine the loop, the stages, the monitor, the EMA and the checkpointer rely on."""

from __future__ import annotations

import functools
import importlib
import sys
import types
from typing import Any, Protocol

import deepspeed
import torch

from ldmscale.checkpoint.store import CheckpointEngine
from ldmscale.config import Config
from ldmscale.style.install import is_new_in_step2


class Engine(CheckpointEngine, Protocol):
    """What ldmscale uses of `deepspeed.DeepSpeedEngine` (save_checkpoint / load_checkpoint / checkpoint_engine
    come from the checkpoint layer's CheckpointEngine). A seam to read and to type against, not a second
    implementation: build_engine returns DeepSpeed's own engine."""

    module: torch.nn.Module  # the wrapped module (the stage's LatentDiffusion or AutoencoderObjective)
    optimizer: Any  # DeepSpeed's optimizer wrapper: the EMA reads its fp32 master partition
    dp_world_size: int
    data_parallel_group: Any
    # what get_global_grad_norm returns: set by DeepSpeed's step, and by _clip_and_record_norm on the ZeRO-0 fp32 path
    _global_grad_norm: torch.Tensor | float | None

    def __call__(self, *args: Any, **kwargs: Any) -> Any: ...

    def backward(self, loss: torch.Tensor) -> Any: ...

    def step(self) -> None: ...

    def get_lr(self) -> list[float]: ...

    def get_global_grad_norm(self) -> float | None: ...

    def zero_optimization_stage(self) -> int: ...

    def gradient_clipping(self) -> float: ...

    def compile(self, backend: str = ..., compile_kwargs: dict[str, Any] = ...) -> None: ...


def optimizer_groups(named: list[tuple[str, torch.nn.Parameter]], cfg: Config) -> list[Any]:
    """The parameters DeepSpeed's optimizer steps: one group, or with `style.lr_scale` != 1 a second group of what
    step 2 adds (style encoder, style attention, global path) at lr x lr_scale. The new path starts at zero and
    must learn within a short step 2, while the U-Net it joins is already trained (docs/results/style.md).
    DeepSpeed's LR schedule scales each group's own LR, so the ratio holds through warm-up and decay."""
    scale = cfg.style.lr_scale if cfg.style.enabled else 1.0
    if scale == 1.0:
        return [p for _, p in named]
    new = [p for n, p in named if is_new_in_step2(n)]
    rest = [p for n, p in named if not is_new_in_step2(n)]
    return [{"params": rest}, {"params": new, "lr": cfg.optim.lr * scale}]


def build_engine(module: torch.nn.Module, params: list[Any], ds_config: dict[str, Any]) -> Engine:
    """`deepspeed.initialize` (params: tensors or optimizer groups), minus two costs of DeepSpeed's ZeRO-0 fp32
    path that buy nothing here.

    - On one data-parallel rank the ZeRO-0 engine still flattens every gradient into buckets, all-reduces them
      with itself and copies them back at each accumulation boundary. The all-reduce of one rank is the identity
      and the average divides by 1, so it is skipped: every value stays bitwise the same (tests/unit/test_engine.py).
    - ZeRO-0 fp32 clips with DeepSpeed's model-parallel-aware `clip_grad_norm_`: one norm kernel per parameter,
      then the norm thrown away, so no grad_norm is logged. Here torch's multi-tensor norm and clip do it (with
      the norm averaged over the data-parallel ranks as DeepSpeed does; ldmscale has no model or expert
      parallelism) and the engine reports the norm.
    ZeRO-1/2/3 reduce and clip inside their optimizer and keep their path: their partitioned state is what a later
    resume on more ranks converts.

    Also spared: the compile wrappers of DeepSpeed's Muon optimizer (_import_muon_compiling_on_first_call)."""
    _import_muon_compiling_on_first_call()
    engine, _, _, _ = deepspeed.initialize(model=module, model_parameters=params, config=ds_config)
    if engine.zero_optimization_stage() == 0:
        if engine.dp_world_size == 1:
            engine.enable_backward_allreduce = False
        if not (engine.fp16_enabled() or engine.bfloat16_enabled()):  # those clip in their own optimizer wrappers
            engine.clip_fp32_gradients = types.MethodType(_clip_and_record_norm, engine)
    return engine


# DeepSpeed's ZeRO engines import its Muon optimizer (to recognise it), whatever the optimizer is. That module
# applies torch.compile to three functions at import, and building a compile wrapper imports Inductor's compiler:
# ~2 CPU s of every rank's start-up for an optimizer ldmscale never builds (optim.name is adamw, adam or sgd).
_MUON = "deepspeed.runtime.zero.muon.muon_optimizer"


def _import_muon_compiling_on_first_call() -> None:
    """Import DeepSpeed's Muon module with torch.compile deferred to each function's first call (never, unless
    Muon steps), so the engine's later imports of it cost nothing."""
    if _MUON in sys.modules:
        return
    real_compile = torch.compile

    def deferred(model: Any = None, **kwargs: Any) -> Any:
        if model is None:  # used as @torch.compile(...)
            return functools.partial(deferred, **kwargs)
        compiled = None

        @functools.wraps(model)
        def call(*args: Any, **call_kwargs: Any) -> Any:
            nonlocal compiled
            if compiled is None:
                compiled = real_compile(model, **kwargs)
            return compiled(*args, **call_kwargs)

        return call

    torch.compile = deferred
    try:
        importlib.import_module(_MUON)
    except ImportError:  # a DeepSpeed without Muon
        pass
    finally:
        torch.compile = real_compile


def _clip_and_record_norm(engine: Engine) -> None:
    """ZeRO-0 fp32 clipping (called by DeepSpeed before the optimizer step), keeping the norm for the logs."""
    params = [p for p in engine.module.parameters() if p.grad is not None]
    norm = torch.nn.utils.get_total_norm([p.grad for p in params if p.grad is not None])  # (all: types it)
    if engine.dp_world_size > 1:
        # the gradients are averaged already; averaging the norm too makes every replica use one coefficient
        # even if a reduction left its last bits different
        torch.distributed.all_reduce(norm, group=engine.data_parallel_group)
        norm /= engine.dp_world_size
    torch.nn.utils.clip_grads_with_norm_(params, engine.gradient_clipping(), norm)
    engine._global_grad_norm = norm
