"""The counter-based per-sample generator (ldmscale/noise.py): exact uint64 arithmetic in int64 tensors, one
function of (seed, stream, id, element), and the distributions the objective assumes."""

from __future__ import annotations

import math
import random

import pytest
import torch

from ldmscale.models import noise


def test_int64_tensor_splitmix_equals_the_uint64_reference() -> None:
    rng = random.Random(0)
    # the edges where a sign-extending shift or a non-wrapping multiply would go wrong
    xs = [0, 1, (1 << 63) - 1, 1 << 63, (1 << 64) - 1] + [rng.getrandbits(64) for _ in range(20000)]
    got = noise.splitmix64_tensor(torch.tensor([noise._as_int64(x) for x in xs], dtype=torch.int64))
    assert got.tolist() == [noise._as_int64(noise.splitmix64(x)) for x in xs]


def test_a_draw_is_the_same_whatever_the_batch_the_order_or_the_ids_type() -> None:
    a = noise.randn(3, range(100, 108), (4, 5, 5), noise.Stream.NOISE)
    assert torch.equal(a[[5, 2]], noise.randn(3, [105, 102], (4, 5, 5), noise.Stream.NOISE))
    assert torch.equal(a, noise.randn(3, torch.arange(100, 108), (4, 5, 5), noise.Stream.NOISE))
    assert torch.equal(noise.rand(3, [7, 9], noise.Stream.CAPTION_DROP)[1],
                       noise.rand(3, range(9, 10), noise.Stream.CAPTION_DROP)[0])
    # an odd element count (Box-Muller pairs) gives a prefix of the next even one's draw, flattened
    odd = noise.randn(3, range(4), (3, 3), noise.Stream.NOISE).flatten(1)
    assert torch.equal(odd, noise.randn(3, range(4), (10,), noise.Stream.NOISE)[:, :9])


@pytest.mark.parametrize("change", ["seed", "stream", "id"])
def test_seed_stream_and_id_each_change_the_draw(change: str) -> None:
    base = dict(seed=1, ids=[5], stream=noise.Stream.NOISE)
    other = {**base, **{"seed": {"seed": 2}, "stream": {"stream": noise.Stream.POSTERIOR}, "id": {"ids": [6]}}[change]}
    a = noise.randn(base["seed"], base["ids"], (64,), base["stream"])
    b = noise.randn(other["seed"], other["ids"], (64,), other["stream"])
    assert not torch.isclose(a, b).any()


def test_normals_are_standard_and_independent_across_elements_and_samples() -> None:
    z = noise.randn(0, range(2000), (4, 16, 16), noise.Stream.NOISE).double()
    flat = z.flatten()
    n = flat.numel()
    assert abs(flat.mean().item()) < 5 / math.sqrt(n)
    assert abs(flat.var().item() - 1) < 5 * math.sqrt(2 / n)
    assert abs((flat**4).mean().item() - 3) < 0.05  # Gaussian kurtosis, not just two moments
    # the Box-Muller partners (cos, sin of one draw) and neighbouring samples are uncorrelated
    pairs = z.flatten(1).reshape(2000, -1, 2)
    assert abs(torch.corrcoef(pairs.reshape(-1, 2).T)[0, 1].item()) < 0.01
    assert abs(torch.corrcoef(torch.stack([z[:-1].flatten(), z[1:].flatten()]))[0, 1].item()) < 0.01


def test_uniforms_and_integers_cover_their_range_evenly() -> None:
    u = noise.rand(0, range(200000), noise.Stream.CAPTION_DROP)
    assert u.dtype == torch.float64 and u.min() >= 0 and u.max() < 1
    counts = torch.histc(u, bins=20, min=0, max=1)
    expected = len(u) / 20
    assert ((counts - expected) ** 2 / expected).sum().item() < 45  # chi-square, 19 dof: p ~ 0.001
    t = noise.randint(0, range(200000), 1000, noise.Stream.TIMESTEP)
    assert t.min() == 0 and t.max() == 999
    assert ((torch.bincount(t, minlength=1000) - 200) ** 2 / 200).sum().item() < 1150  # 999 dof


def test_draws_are_made_on_the_requested_device_without_a_host_step() -> None:
    # the meta device stands in for a GPU: any CPU generator or host tensor on the way would show up here
    for draw in (noise.randn(0, range(4), (4, 8, 8), noise.Stream.NOISE, "meta"),
                 noise.rand(0, range(4), noise.Stream.STYLE_DROP, "meta"),
                 noise.randint(0, range(4), 1000, noise.Stream.TIMESTEP, "meta")):
        assert draw.device.type == "meta" and draw.shape[0] == 4
