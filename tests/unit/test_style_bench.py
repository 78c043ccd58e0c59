"""The style benchmark's measurements on real palette digits: palette recovery and ink-based digit features."""

from __future__ import annotations

import numpy as np
from sklearn.datasets import load_digits

from ldmscale.demo.styled_digits import PALETTES, render_styled
from ldmscale.eval.style_follow import content_features, nearest_palette


def test_palette_and_ink_are_recovered_from_rendered_digits() -> None:
    digits = load_digits()
    for i in range(0, 60, 7):
        plain = None
        for k, (_, ink, bg) in enumerate(PALETTES):
            rgb = np.asarray(render_styled(digits.images[i], ink, bg))
            assert nearest_palette(rgb) == k
            feats = content_features(rgb)
            plain = feats if plain is None else plain
            # the same digit in any palette maps to nearly the same ink features (0..16 scale)
            assert np.abs(feats - plain).mean() < 1.5
        assert np.corrcoef(plain, digits.images[i].ravel())[0, 1] > 0.8  # and they look like the digit itself
