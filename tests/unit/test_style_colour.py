"""Continuous styles: the colour-pair data writer, the benchmark's measurements and the colour-statistics path."""

from __future__ import annotations

import colorsys
import random

import numpy as np
import torch
from sklearn.datasets import load_digits

from ldmscale.config import StyleConfig
from ldmscale.demo.colour_pairs import UNSEEN_HUES, colour_pair, in_band
from ldmscale.demo.styled_digits import render_styled
from ldmscale.eval.style_follow import colour_error, probe_error
from ldmscale.style.encoder import COLOUR_STATS_DIM, StyleEncoder, colour_statistics


def _hue(rgb: tuple[int, ...]) -> float:
    return colorsys.rgb_to_hsv(*(c / 255 for c in rgb))[0]


def test_training_colours_avoid_the_unseen_band_and_unseen_inks_lie_in_it() -> None:
    rng = random.Random(0)
    for _ in range(500):
        ink, bg, hue = colour_pair(rng, unseen=False)
        # hsv -> 8-bit rgb -> hsv moves a hue by < 0.01: stay that far from the band's edges
        assert not in_band(hue) and not UNSEEN_HUES[0] + 0.01 < _hue(bg) < UNSEEN_HUES[1] - 0.01
        assert not UNSEEN_HUES[0] + 0.01 < _hue(ink) < UNSEEN_HUES[1] - 0.01
        assert abs(max(ink) - max(bg)) > 70  # one dark, one light: the digit stays readable
        ink, bg, hue = colour_pair(rng, unseen=True)
        assert in_band(hue) and UNSEEN_HUES[0] - 0.01 < _hue(ink) < UNSEEN_HUES[1] + 0.01
        assert not UNSEEN_HUES[0] + 0.01 < _hue(bg) < UNSEEN_HUES[1] - 0.01


def test_colour_error_is_small_for_the_true_colours_and_large_for_others() -> None:
    digits, rng = load_digits(), random.Random(1)
    own, other = [], []
    for i in range(40):
        ink, bg, _ = colour_pair(rng, unseen=i % 2 == 1)
        rgb = np.asarray(render_styled(digits.images[i], ink, bg).resize((32, 32)))  # the model's resolution
        own.append(colour_error(rgb, np.array(ink), np.array(bg)))
        ink2, bg2, _ = colour_pair(rng, unseen=False)
        other.append(colour_error(rgb, np.array(ink2), np.array(bg2)))
    assert np.mean(own) < 15 and max(own) < 40
    assert np.mean(other) > 100


def test_probe_error_tells_tokens_that_hold_the_colours_from_tokens_that_do_not() -> None:
    rng = np.random.default_rng(0)
    refs = {k: [{"ink": rng.uniform(0, 255, 3), "bg": rng.uniform(0, 255, 3)} for _ in range(80)]
            for k in ("seen", "unseen")}
    mix = rng.normal(size=(6, 12))
    linear = {k: np.stack([np.concatenate([r["ink"], r["bg"]]) for r in refs[k]]) @ mix for k in refs}
    noise = {k: rng.normal(size=(80, 12)) for k in refs}
    good, bad = probe_error(linear, refs), probe_error(noise, refs)
    assert good["seen"] < 1 and good["unseen"] < 1
    assert bad["seen"] > 60 and bad["unseen"] > 60


def test_colour_statistics_hold_a_two_colour_image_colours() -> None:
    ink, bg = (200, 30, 120), (20, 210, 240)
    rgb = np.asarray(render_styled(load_digits().images[3], ink, bg))
    x = torch.from_numpy(rgb.copy()).permute(2, 0, 1)[None].float() / 127.5 - 1
    s = colour_statistics(x)
    assert s.shape == (1, COLOUR_STATS_DIM)
    q = s[0, 6:].view(3, 5)  # per channel 5%, 25%, 50%, 75%, 95% quantiles after mean and std
    to_rgb = (q + 1) * 127.5
    for c in range(3):  # channel by channel: the background end is the background, the other end near the ink
        bg_end, ink_end = (to_rgb[c, 0], to_rgb[c, 4]) if bg[c] < ink[c] else (to_rgb[c, 4], to_rgb[c, 0])
        assert abs(bg_end - bg[c]) < 2
        assert (ink_end - bg[c]) / (ink[c] - bg[c]) > 0.6
    assert torch.allclose(s[0, :3], x.flatten(2).mean(2)[0])


def test_colour_stats_reach_the_head_so_flat_colours_are_told_apart() -> None:
    """The same encoder with the conv backbone silenced (weights zero: it sees no colour) still maps two flat
    references of different colour to different tokens when colour_stats is on, and to the same without."""
    flat = torch.tensor([[0.8, -0.6, -0.2], [-0.6, 0.8, 0.4]]).view(2, 3, 1, 1).expand(2, 3, 16, 16)
    out = {}
    for on in (False, True):
        torch.manual_seed(0)
        enc = StyleEncoder(StyleConfig(conv_channels=[8, 16], num_tokens=2, colour_stats=on), 32)
        with torch.no_grad():
            for p in enc.backbone.parameters():
                p.zero_()
        assert enc.head.in_features == enc.backbone.out_dim + (COLOUR_STATS_DIM if on else 0)
        mu, _ = enc(flat)
        out[on] = (mu[0] - mu[1]).abs().max().item()
    assert out[False] == 0.0 and out[True] > 1e-3

