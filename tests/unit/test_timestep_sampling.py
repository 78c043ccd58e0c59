"""model.timestep_sampling: the uniform draw unchanged, the logit-normal one a pure function of (seed, sample id)
with SD3's distribution, both made on the device."""

from __future__ import annotations

import math

import torch

from ldmscale.models import noise


def test_uniform_is_the_draw_it_always_was() -> None:
    ids = range(1000, 1512)
    assert torch.equal(noise.timesteps(7, ids, 1000), noise.randint(7, ids, 1000, noise.Stream.TIMESTEP))


def test_logit_normal_depends_only_on_seed_and_sample_id() -> None:
    a = noise.timesteps(3, range(100, 140), 1000, "logit_normal")
    assert torch.equal(a[[7, 2]], noise.timesteps(3, [107, 102], 1000, "logit_normal"))  # batch, order
    assert not torch.equal(a, noise.timesteps(4, range(100, 140), 1000, "logit_normal"))
    assert noise.timesteps(0, range(4), 1000, "logit_normal", device="meta").device.type == "meta"


def _logit_normal_cdf(t: float, n: int, mean: float, std: float) -> float:
    """P(T < t) for T = floor(sigmoid(mean + std z) * n): P(z < (logit(t / n) - mean) / std)."""
    u = t / n
    if u <= 0:
        return 0.0
    if u >= 1:
        return 1.0
    return 0.5 * (1 + math.erf((math.log(u / (1 - u)) - mean) / (std * math.sqrt(2))))


def test_logit_normal_has_sd3s_distribution_and_stays_in_range() -> None:
    n, draws = 1000, 100_000
    for mean, std in ((0.0, 1.0), (0.5, 0.6)):
        t = noise.timesteps(0, range(draws), n, "logit_normal", mean, std)
        assert t.dtype == torch.int64 and t.min() >= 0 and t.max() <= n - 1
        counts = torch.bincount(t, minlength=n).double()
        empirical = torch.cumsum(counts, 0) / draws  # P(T <= k)
        expected = torch.tensor([_logit_normal_cdf(k + 1, n, mean, std) for k in range(n)], dtype=torch.float64)
        # Kolmogorov-Smirnov: 1.95 / sqrt(N) is the 0.1% critical value
        assert (empirical - expected).abs().max().item() < 1.95 / math.sqrt(draws)
    # the uniform draw would fail the same test: it is not vacuous
    u = noise.timesteps(0, range(draws), n).bincount(minlength=n).double().cumsum(0) / draws
    assert (u - expected).abs().max().item() > 0.1
