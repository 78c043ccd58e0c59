"""One rank of tests/test_zero_paths.py (started by torchrun, 2 ranks): the sharded EMA and gradient
checkpointing under real DeepSpeed engines, every ZeRO stage, fp32 and bf16, and ldmscale's ZeRO-0 clipping
(ldmscale.trainer.engine). Writes its findings as JSON.

    python -m torch.distributed.run --nproc_per_node=2 tests/zero_worker.py OUT.json
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import deepspeed
import torch
import torch.distributed as tdist
from deepspeed.utils import safe_get_full_fp32_param
from safetensors.torch import save_file

from ldmscale.checkpoint.slices import TensorSlices
from ldmscale.models.networks import build_unet
from ldmscale.runtime import dist
from ldmscale.trainer.ds_config import bf16_reduction
from ldmscale.trainer.ema import EMA, gathered
from ldmscale.trainer.engine import build_engine

STEPS = 3
DECAY = 0.7  # far from 1, so every step moves the average visibly


class FullCopyEMA:
    """The reference: gather every parameter each step (ZeRO-3), rank 0 keeps one full fp32 copy."""

    def __init__(self, named: list[tuple[str, Any]], decay: float) -> None:
        self.named, self.decay = named, decay
        with gathered([p for _, p in named]):
            self.shadow = {n: p.detach().float().clone() for n, p in named} if dist.rank() == 0 else {}

    @torch.no_grad()
    def update(self, decay: float | None = None) -> None:
        d = self.decay if decay is None else decay
        with gathered([p for _, p in self.named]):
            if self.shadow:
                torch._foreach_lerp_([self.shadow[n] for n, _ in self.named],
                                     [p.detach().float() for _, p in self.named], 1.0 - d)


@contextmanager
def counting_collectives() -> Iterator[list[str]]:
    """The names of the c10d collectives run inside, as the profiler records them (whatever layer calls them)."""
    calls: list[str] = []
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        yield calls
    calls += [e.name for e in prof.events() if e.name.startswith("c10d::")]


def ds_config(zero: int, precision: str) -> dict[str, Any]:
    cfg: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 1,
        "optimizer": {"type": "AdamW", "params": {"lr": 1e-2, "torch_adam": True}},
        "zero_optimization": {"stage": zero}, "bf16": {"enabled": precision == "bf16"},
        "steps_per_print": 10**9,
    }
    if zero == 3:
        cfg["zero_optimization"]["stage3_param_persistence_threshold"] = 0  # every parameter partitioned
    if precision == "bf16":
        cfg.update(bf16_reduction(zero))  # as the trainer configures bf16 runs
    return cfg


def make_engine(zero: int, precision: str, checkpointing: bool = False, clip: float = 0.0,
                lean: bool = False) -> Any:
    """DeepSpeed's own engine, or the trainer's (`lean`: ldmscale.trainer.engine.build_engine)."""
    torch.manual_seed(0)
    unet = build_unet("tiny", 4, 32, 8)
    if checkpointing:
        unet.enable_gradient_checkpointing()
    cfg = {**ds_config(zero, precision), "gradient_clipping": clip}
    if lean:
        return build_engine(unet, list(unet.parameters()), cfg)
    engine, *_ = deepspeed.initialize(model=unet, model_parameters=list(unet.parameters()), config=cfg)
    return engine


def train_step(engine: Any, step: int) -> float:
    g = torch.Generator().manual_seed(1000 * step + dist.rank())
    dtype = next(engine.module.parameters()).dtype
    x = torch.randn(2, 4, 8, 8, generator=g).to(dtype)
    ctx = torch.randn(2, 16, 32, generator=g).to(dtype)
    t = torch.randint(0, 1000, (2,), generator=g)
    loss = engine(x, t, encoder_hidden_states=ctx).sample.float().pow(2).mean()
    engine.backward(loss)
    engine.step()
    return float(loss.detach())


def bitwise(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def ema_case(zero: int, precision: str, tmp: str) -> dict[str, Any]:
    engine = make_engine(zero, precision)
    named = [(n, p) for n, p in engine.module.named_parameters() if p.requires_grad]
    sharded = EMA(named, DECAY, engine.optimizer)
    full_copy = FullCopyEMA(named, DECAY)  # the fp32 reference
    # the reference for bf16: the EMA of the optimizer's full fp32 masters (a collective to read under ZeRO)
    masters = {n: safe_get_full_fp32_param(p).detach().float().cpu().clone() for n, p in named} if zero else {}
    update_calls: list[str] = []
    for step in range(STEPS):
        train_step(engine, step)
        with counting_collectives() as calls:
            sharded.update()
        update_calls += calls
        full_copy.update()
        if zero > 0:
            full = {n: safe_get_full_fp32_param(p).detach().float().cpu().clone() for n, p in named}
            for n, v in full.items():
                masters[n] = torch.lerp(masters[n], v, 1.0 - DECAY)
    with counting_collectives() as gather_calls:
        full_copy.update(decay=1.0)  # a no-op average: only counts what the old scheme communicates
    full = sharded.state_dict()
    # resume: a fresh EMA on every rank takes its shares from the consolidated file
    if dist.rank() == 0:
        save_file(full, os.path.join(tmp, f"ema-{zero}-{precision}.safetensors"))
    dist.barrier()
    again = EMA(named, 0.0, engine.optimizer)
    with TensorSlices(Path(tmp) / f"ema-{zero}-{precision}.safetensors") as f:  # each rank reads its share only
        again.load_state_dict(f)
    reloaded = again.state_dict()
    mine = sum(s.master.numel() for s in sharded.shares)
    owned = torch.tensor([mine])
    tdist.all_reduce(owned)
    opt = engine.optimizer
    out = {"optimizer": type(opt).__name__, "communication_dtype": str(engine.communication_data_type),
           "accumulation_dtype": str(getattr(opt, "gradient_accumulation_dtype", getattr(opt, "grad_acc_dtype", None))),
           "update_collectives": len(update_calls), "gathered_update_collectives": len(gather_calls),
           "elements_here": mine, "elements_all_ranks": int(owned), "elements_model": sum(p.ds_numel if hasattr(
               p, "ds_id") else p.numel() for _, p in named)}
    if dist.rank() == 0:
        ref = full_copy.shadow
        out.update(
            equals_gathered=bitwise(full, ref),
            reload_exact=bitwise(full, reloaded),
            # bf16: the average of the fp32 masters keeps digits the bf16 working copies cannot hold
            finer_than_bf16=any(not torch.equal(v, v.bfloat16().float()) for v in full.values()),
        )
        if masters:
            out["equals_master_ema"] = bitwise(full, masters)
    return out


def checkpointing_case() -> dict[str, Any]:
    """ZeRO-3 with and without gradient checkpointing: the same losses, and the recompute really ran."""
    result: dict[str, Any] = {}
    for ckpt in (False, True):
        engine = make_engine(3, "fp32", checkpointing=ckpt)
        calls = [0]
        block = engine.module.down_blocks[0].resnets[0]
        forward = block.forward

        def counted(*a: Any, _f: Any = forward, _n: list[int] = calls, **k: Any) -> Any:  # hooks miss recomputes
            _n[0] += 1
            return _f(*a, **k)

        block.forward = counted
        losses = [train_step(engine, s) for s in range(STEPS)]
        result["ckpt" if ckpt else "plain"] = {"losses": losses, "block_forwards": calls[0]}
    return result


def clip_case() -> dict[str, Any]:
    """ZeRO-0 fp32 with clipping on 2 ranks (each its own data): DeepSpeed's engine against ldmscale's, whose
    clip uses torch's multi-tensor norm averaged over the ranks and reports it."""
    plain, lean = make_engine(0, "fp32", clip=0.05), make_engine(0, "fp32", clip=0.05, lean=True)
    norms = []
    for step in range(STEPS):
        train_step(plain, step)
        train_step(lean, step)
        norms.append(float(lean.get_global_grad_norm()))
    flat = {name: torch.cat([p.detach().flatten() for p in e.module.parameters()]) for name, e in
            (("plain", plain), ("lean", lean))}
    return {"norms": norms, "max_diff_to_deepspeed": float((flat["plain"] - flat["lean"]).abs().max()),
            "weights_bits": flat["lean"].view(torch.int32).sum().item()}


def main() -> None:
    out_path = sys.argv[1]
    dist.init_distributed()
    tmp = os.path.dirname(out_path)
    report: dict[str, Any] = {"ema": {}}
    for zero in (0, 1, 2, 3):
        for precision in ("fp32", "bf16"):
            report["ema"][f"{zero}-{precision}"] = ema_case(zero, precision, tmp)
    report["checkpointing"] = checkpointing_case()
    report["clip"] = clip_case()
    with open(f"{out_path}.rank{dist.rank()}", "w") as f:
        json.dump(report, f, indent=1)
    dist.barrier()
    dist.cleanup()


if __name__ == "__main__":
    main()
