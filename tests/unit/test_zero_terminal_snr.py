"""model.zero_terminal_snr: the training schedule ends at zero SNR, every sampler built from its config starts at
that last timestep, and the config refuses it without v-prediction."""

from __future__ import annotations

import pytest
import torch

from ldmscale.config import SAMPLERS, ConfigError, ModelConfig
from ldmscale.inference.samplers import make_scheduler
from ldmscale.models.objective import LatentDiffusion, build_noise_scheduler


def test_the_last_timestep_is_pure_noise_and_sampling_starts_there() -> None:
    sched = build_noise_scheduler(ModelConfig(prediction_type="v_prediction", zero_terminal_snr=True))
    assert sched.alphas_cumprod[-1] == 0 and sched.alphas_cumprod[0] > 0.99
    x0, eps = torch.ones(1, 4, 2, 2), torch.randn(1, 4, 2, 2)
    assert torch.equal(sched.add_noise(x0, eps, torch.tensor([999])), eps)
    for name in SAMPLERS:
        s = make_scheduler(name, dict(sched.config))
        s.set_timesteps(10)
        assert int(s.timesteps[0]) == 999, name
    old = make_scheduler("ddim", dict(build_noise_scheduler(ModelConfig()).config))
    old.set_timesteps(10)
    assert int(old.timesteps[0]) < 999  # the default schedule is unchanged: never starts at pure noise


def test_min_snr_weights_stay_finite_at_zero_snr() -> None:
    sched = build_noise_scheduler(ModelConfig(prediction_type="v_prediction", zero_terminal_snr=True))
    module = LatentDiffusion(torch.nn.Identity(), sched, snr_gamma=5.0)  # type: ignore[arg-type]
    w = module.loss_weights(torch.tensor([0, 500, 999]))
    assert torch.isfinite(w).all() and w[-1] == 0


def test_epsilon_prediction_is_refused() -> None:
    with pytest.raises(ConfigError, match="v_prediction"):
        ModelConfig(zero_terminal_snr=True).check()
