"""The noise schedule, the eps/v targets, min-SNR weights and per-sample determinism."""

from __future__ import annotations

import torch

from ldmscale.config import ModelConfig
from ldmscale.models import noise
from ldmscale.models.networks import build_unet
from ldmscale.models.objective import LatentDiffusion, build_noise_scheduler


def _module(prediction_type: str, snr_gamma: float = 0.0) -> LatentDiffusion:
    torch.manual_seed(0)
    cfg = ModelConfig(prediction_type=prediction_type, snr_gamma=snr_gamma)
    return LatentDiffusion(build_unet("tiny", 4, 32, 8), build_noise_scheduler(cfg), snr_gamma)


def test_noisy_latents_follow_the_schedule() -> None:
    m = _module("epsilon")
    x0, eps = torch.randn(3, 4, 8, 8), torch.randn(3, 4, 8, 8)
    t = torch.tensor([0, 500, 999])
    a = m.scheduler.alphas_cumprod[t].view(-1, 1, 1, 1)
    assert torch.allclose(m.scheduler.add_noise(x0, eps, t), a.sqrt() * x0 + (1 - a).sqrt() * eps, atol=1e-6)
    assert a[0] > 0.99 and a[2] < 0.01  # scaled_linear: almost clean at t=0, almost pure noise at t=999


def test_targets_eps_and_v() -> None:
    x0, eps, t = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8), torch.tensor([10, 700])
    assert torch.equal(_module("epsilon").target(x0, eps, t), eps)
    m = _module("v_prediction")
    a = m.scheduler.alphas_cumprod[t].view(-1, 1, 1, 1)
    assert torch.allclose(m.target(x0, eps, t), a.sqrt() * eps - (1 - a).sqrt() * x0, atol=1e-6)


def test_min_snr_weights() -> None:
    t = torch.tensor([1, 300, 999])
    m = _module("epsilon", snr_gamma=5.0)
    a = m.scheduler.alphas_cumprod[t]
    snr = a / (1 - a)
    assert torch.allclose(m.loss_weights(t), torch.clamp(snr, max=5.0) / snr, rtol=1e-5)
    assert m.loss_weights(t)[0] < 0.1 and torch.isclose(m.loss_weights(t)[2], torch.tensor(1.0))
    mv = _module("v_prediction", snr_gamma=5.0)
    assert torch.allclose(mv.loss_weights(t), torch.clamp(snr, max=5.0) / (snr + 1), rtol=1e-5)
    assert _module("epsilon").loss_weights(t) is None


def test_loss_is_mse_to_target_and_trains() -> None:
    m = _module("epsilon")
    x0, ctx = torch.randn(4, 4, 8, 8), torch.randn(4, 16, 32)
    eps, t = torch.randn(4, 4, 8, 8), torch.tensor([5, 100, 500, 900])
    loss, parts = m(x0, ctx, eps, t)
    pred = m.unet(m.scheduler.add_noise(x0, eps, t), t, encoder_hidden_states=ctx).sample
    assert torch.allclose(loss, ((pred - eps) ** 2).mean(), rtol=1e-5)
    opt = torch.optim.Adam(m.parameters(), lr=1e-3)
    first = loss.item()
    for _ in range(8):  # the loss falls below 0.4x within 5 steps
        opt.zero_grad()
        loss, _ = m(x0, ctx, eps, t)
        loss.backward()
        opt.step()
    assert loss.item() < 0.7 * first


def test_per_sample_noise_depends_only_on_seed_id_stream() -> None:
    a = noise.randn(7, [10, 11, 12], (4, 2, 2), noise.Stream.NOISE)
    b = noise.randn(7, [12, 10], (4, 2, 2), noise.Stream.NOISE)  # other batch, other order
    assert torch.equal(a[0], b[1]) and torch.equal(a[2], b[0])
    assert not torch.equal(a[0], a[1])
    assert not torch.equal(a[0], noise.randn(7, [10], (4, 2, 2), noise.Stream.POSTERIOR)[0])
    assert not torch.equal(a[0], noise.randn(8, [10], (4, 2, 2), noise.Stream.NOISE)[0])
    t = noise.randint(0, range(2000), 1000, noise.Stream.TIMESTEP)
    assert t.min() >= 0 and t.max() < 1000 and len(t.unique()) > 800  # spread over the schedule
