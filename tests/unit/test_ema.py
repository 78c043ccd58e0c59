"""EMA arithmetic on one process, resume from its saved state; ZeRO 0-3 in tests/test_zero_paths.py."""

from __future__ import annotations

import torch

from ldmscale.trainer.ema import EMA


def test_ema_tracks_the_decayed_average() -> None:
    p = torch.nn.Parameter(torch.zeros(3))
    ema = EMA([("w", p)], decay=0.9)
    expected = torch.zeros(3)
    for v in (1.0, 2.0, 3.0):
        with torch.no_grad():
            p.fill_(v)
        ema.update()
        expected = 0.9 * expected + 0.1 * v
    assert torch.allclose(ema.state_dict()["w"], expected)
    assert ema.state_dict()["w"].dtype == torch.float32


def test_ema_keeps_fp32_of_bf16_weights_and_reloads() -> None:
    p = torch.nn.Parameter(torch.ones(4, dtype=torch.bfloat16))
    ema = EMA([("w", p)], decay=0.999)
    with torch.no_grad():
        p.fill_(2.0)
    ema.update()
    assert ema.state_dict()["w"].dtype == torch.float32
    assert torch.allclose(ema.state_dict()["w"], torch.full((4,), 1.001))  # below bf16's resolution at 1.0
    other = EMA([("w", p)], decay=0.999)
    other.load_state_dict(ema.state_dict())
    assert torch.equal(other.state_dict()["w"], ema.state_dict()["w"])


def test_warmup_decay_starts_low_and_reaches_the_cap() -> None:
    from ldmscale.trainer.ema import warmup_decay

    assert warmup_decay(0.9999, 0) == 0.1  # the first update nearly copies the weights
    assert warmup_decay(0.9999, 90) == 0.91
    assert warmup_decay(0.99, 10**6) == 0.99
    decays = [warmup_decay(0.999, n) for n in range(5000)]
    assert decays == sorted(decays)
