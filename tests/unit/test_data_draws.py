"""The loader's random draws: each a pure function of its parts, distinct parts distinct streams; data.random_flip
mirrors a deterministic half of each epoch's images."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from ldmscale.config import DataConfig, load_config
from ldmscale.config.schema import ConfigError
from ldmscale.data import ResumableLoader
from ldmscale.data.batches import flipped
from ldmscale.data.shard_writer import ShardSample, write_laion_shards
from ldmscale.data.stream import seeded
from tests.conftest import REPO


def test_distinct_parts_give_distinct_streams() -> None:
    # hash(-1) == hash(-2) in CPython: the block shuffle (-1) and the style pairing (-2) drew the same numbers
    shuffle, pairing = seeded(0, 0, 0, 1, 0, 1, -1, 7), seeded(0, 0, 0, 1, 0, 1, -2, 7)
    assert [shuffle.random() for _ in range(4)] != [pairing.random() for _ in range(4)]
    draws = {tuple(seeded(*parts).random() for _ in range(2)) for parts in [(1, 2), (2, 1), (12,), (1, 2, 0), (-1,)]}
    assert len(draws) == 5
    # a pure function of its parts, in any process (no PYTHONHASHSEED): pinned, so a change of streams is seen
    assert seeded(5, 0).randrange(10**9) == seeded(5, 0).randrange(10**9) == 525581549


@pytest.fixture(scope="module")
def arrows(tmp_path_factory: pytest.TempPathFactory) -> list[str]:
    """16 images whose left and right halves differ."""
    rng = np.random.default_rng(3)
    images = []
    for i in range(16):
        a = np.zeros((16, 16, 3), dtype=np.uint8)
        a[:, :8] = rng.integers(0, 255, 3)
        images.append(ShardSample(Image.fromarray(a), f"arrow {i}"))
    return [str(p) for p in write_laion_shards(images, tmp_path_factory.mktemp("arrows"), samples_per_shard=8,
                                               progress=False)]


def _pixels_by_key(urls: list[str], flip: bool, epochs: int = 1) -> list[dict[str, np.ndarray]]:
    dc = DataConfig(shards=urls, resolution=16, num_workers=0, shuffle_buffer=4, random_flip=flip)
    loader = ResumableLoader(dc, None, seed=9, rank=0, world=1, micro_batch=4, samples_per_epoch=16, urls=urls)
    out = []
    for _ in range(epochs):
        seen = {}
        for _ in range(loader.batches_per_epoch):
            batch = next(loader)
            for k, px in zip(batch["keys"], batch["pixels"]):
                seen[k] = px.permute(1, 2, 0).numpy()
        out.append(seen)
    return out


def test_random_flip_mirrors_a_deterministic_half_of_each_epoch(arrows: list[str]) -> None:
    plain = _pixels_by_key(arrows, False)[0]
    epochs = _pixels_by_key(arrows, True, epochs=2)
    for epoch, seen in enumerate(epochs):
        mirrored = {k for k, px in seen.items() if not np.array_equal(px, plain[k])}
        assert mirrored == {k for k in seen if flipped(9, epoch, k)}
        assert all(np.array_equal(seen[k], plain[k][:, ::-1]) for k in mirrored)
        assert 3 <= len(mirrored) <= 13
    assert {k for k in epochs[0] if flipped(9, 0, k)} != {k for k in epochs[1] if flipped(9, 1, k)}


def test_random_flip_with_latents_is_refused() -> None:
    with pytest.raises(ConfigError, match="random_flip=true with data.format=latents"):
        load_config(REPO / "configs/tiny.yaml", ["data.shards=[x]", "data.format=latents", "data.random_flip=true"])
