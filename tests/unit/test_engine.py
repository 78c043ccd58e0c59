"""build_engine: ZeRO-0 on one rank skips the all-reduce with itself (nothing else changes); ZeRO-0 fp32 clips with
torch's multi-tensor norm and reports it; ZeRO-1/2/3 engines start without compiling DeepSpeed's Muon optimizer."""

from __future__ import annotations

import sys
from typing import Any

import deepspeed
import pytest
import torch

from ldmscale.trainer.engine import build_engine


@pytest.fixture(scope="module", autouse=True)
def _group(single_rank_group: None) -> None:
    """Every test here builds engines in this process."""


def _model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.GroupNorm(2, 8), torch.nn.SiLU(),
                               torch.nn.Flatten(), torch.nn.Linear(8 * 6 * 6, 4))


def _config(stage: int, clip: float = 0.0) -> dict[str, Any]:
    # accumulation over 2 micro-batches: the reduction happens at the boundary only
    return {"train_batch_size": 8, "train_micro_batch_size_per_gpu": 4, "gradient_accumulation_steps": 2,
            "gradient_clipping": clip, "zero_optimization": {"stage": stage},
            "optimizer": {"type": "AdamW", "params": {"lr": 0.01, "torch_adam": True}}}


def _train(engine: Any, steps: int) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(1)
    for _ in range(steps * 2):
        x = torch.randn(4, 3, 8, 8, generator=gen)
        engine.backward(engine(x).pow(2).mean())
        engine.step()
    return [p.detach().clone() for p in engine.module.parameters()]


def _count_allreduces(engine: Any) -> list[int]:
    calls = [0]
    real = engine.allreduce_gradients

    def counting(*args: Any, **kwargs: Any) -> Any:
        calls[0] += 1
        return real(*args, **kwargs)

    engine.allreduce_gradients = counting
    return calls


def test_zero0_single_rank_skips_the_allreduce_with_identical_weights() -> None:
    model = _model()
    plain, *_ = deepspeed.initialize(model=model, model_parameters=list(model.parameters()), config=_config(0))
    plain_calls = _count_allreduces(plain)
    expected = _train(plain, steps=3)
    assert plain_calls[0] > 0  # DeepSpeed's own engine reduces with itself at every boundary

    model = _model()
    lean = build_engine(model, list(model.parameters()), _config(0))
    lean_calls = _count_allreduces(lean)
    got = _train(lean, steps=3)
    assert lean_calls[0] == 0
    assert all(torch.equal(a, b) for a, b in zip(expected, got, strict=True))


def test_zero0_fp32_clips_like_deepspeed_and_reports_the_norm() -> None:
    model = _model()
    plain, *_ = deepspeed.initialize(model=model, model_parameters=list(model.parameters()), config=_config(0, 0.05))
    expected = _train(plain, steps=3)

    model = _model()
    lean = build_engine(model, list(model.parameters()), _config(0, 0.05))
    norms: list[float] = []
    clip = lean.clip_fp32_gradients

    def measuring() -> None:  # the global norm before clipping, in float64 from the gradients themselves
        grads = [p.grad.double().flatten() for p in lean.module.parameters() if p.grad is not None]
        norms.append(float(torch.linalg.vector_norm(torch.cat(grads))))
        clip()

    lean.clip_fp32_gradients = measuring
    got = _train(lean, steps=3)
    assert len(norms) == 3 and min(norms) > 0.05  # once per step, and the clip bites
    assert float(lean.get_global_grad_norm()) == pytest.approx(norms[-1], rel=1e-5)
    assert all(torch.allclose(a, b, rtol=1e-5, atol=1e-7) for a, b in zip(expected, got, strict=True))


def test_partitioned_stages_keep_their_reduction() -> None:
    model = _model()
    engine = build_engine(model, list(model.parameters()), _config(2))
    assert engine.enable_backward_allreduce  # ZeRO-1/2/3 reduce inside their optimizer: left as DeepSpeed has it


@pytest.mark.parametrize("stage", [2, 3])
def test_zero_engines_start_without_compiling_muon(stage: int, monkeypatch: pytest.MonkeyPatch) -> None:
    # DeepSpeed's ZeRO engines import its Muon optimizer, whose torch.compile decorators import Inductor: seconds
    # of every rank's start-up for an optimizer ldmscale never builds
    for name in ("deepspeed.runtime.zero.muon.muon_optimizer", "deepspeed.runtime.zero.muon.original_muon"):
        monkeypatch.delitem(sys.modules, name, raising=False)
    compile_calls: list[object] = []

    def counting_compile(model: Any = None, **kwargs: Any) -> Any:  # counts; compiles nothing (no Inductor here)
        compile_calls.append(model)
        return model if model is not None else (lambda fn: fn)

    monkeypatch.setattr(torch, "compile", counting_compile)
    model = _model()
    engine = build_engine(model, list(model.parameters()), _config(stage))
    assert engine.zero_optimization_stage() == stage  # AdamW is still a ZeRO-supported optimizer
    assert "deepspeed.runtime.zero.muon.muon_optimizer" in sys.modules  # DeepSpeed's own imports of it work
    assert compile_calls == []
    assert torch.compile is counting_compile  # put back

    # a Muon function still compiles, on its first call
    from deepspeed.runtime.zero.muon.original_muon import zeropower_via_newtonschulz5

    orth = zeropower_via_newtonschulz5(torch.eye(4), steps=1)
    assert compile_calls == [zeropower_via_newtonschulz5.__wrapped__] and orth.shape == (4, 4)
