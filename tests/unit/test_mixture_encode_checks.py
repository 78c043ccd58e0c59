"""ldmscale-encode's checks on a mixture, before any model loads: each source's latent set is checked on its own
(its image shards, its folder `--out/<name>`, the set already there) and a refusal names the source; a set made
with another caption_key is refused like one made with another filter (it would hold other captions)."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from ldmscale.config import ConfigError, load_config
from ldmscale.data.shard_writer import ShardSample, write_laion_shards
from ldmscale.data.sources import source_views
from ldmscale.latents.encode import preflight
from ldmscale.latents.existing import planned_header, record_header
from tests.conftest import REPO, tiny_overrides


@pytest.fixture(scope="module")
def mix(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """big (2 shards) and small (1 shard), side by side in one folder."""
    root = tmp_path_factory.mktemp("encode-mix")
    rng = np.random.default_rng(0)
    for name, n, start in (("big", 10, 0), ("small", 5, 100)):
        images = [Image.fromarray(rng.integers(0, 255, (16, 16, 3), dtype=np.uint8)) for _ in range(n)]
        write_laion_shards([ShardSample(im, f"{name} {i}", extra={"recaption": f"synthetic {i}"})
                            for i, im in enumerate(images)], root / name, samples_per_shard=5, start_key=start,
                           progress=False)
    return root


def _cfg(assets: Path, mix: Path, tmp_path: Path, small_extra: str = "") -> Any:
    sources = (f"[{{name: big, shards: [{mix / 'big'}], weight: 0.7}}, "
               f"{{name: small, shards: [{mix / 'small'}], weight: 0.3{small_extra}}}]")
    overrides = [o for o in tiny_overrides(assets, tmp_path / "run") if not o.startswith("data.shards=")]
    return load_config(REPO / "configs/tiny.yaml", [*overrides, f"data.sources={sources}"])


def test_a_mixture_passes_when_each_source_has_its_own_folder(assets: Path, mix: Path, tmp_path: Path) -> None:
    preflight(_cfg(assets, mix, tmp_path), str(tmp_path / "latents"))


def test_an_out_whose_source_folder_is_the_image_folder_names_the_source(assets: Path, mix: Path,
                                                                        tmp_path: Path) -> None:
    """--out = the folder holding big/ and small/: each source's set would go where its image shards are."""
    with pytest.raises(ConfigError, match=r"^source big: --out .*big is where the image shards are"):
        preflight(_cfg(assets, mix, tmp_path), str(mix))


def test_a_source_that_is_not_tar_shards_is_named(assets: Path, mix: Path, tmp_path: Path) -> None:
    cfg = _cfg(assets, mix, tmp_path)
    cfg.data.sources[1].shards = [str(mix / "small" / "00000.parquet")]
    (mix / "small" / "00000.parquet").write_bytes(b"not a shard")
    with pytest.raises(ConfigError, match=r"^source small: data.shards names .*00000.parquet, which is not a .tar"):
        preflight(cfg, str(tmp_path / "latents"))


def test_a_set_started_with_another_caption_key_is_refused(assets: Path, mix: Path, tmp_path: Path) -> None:
    """small's set was started with txt; encoding it again with json.recaption would mix both captions in it."""
    out = tmp_path / "latents"
    before = _cfg(assets, mix, tmp_path)
    (_, _, view), = [v for v in source_views(before.data) if v[0] == "small"]  # the source's view, as encode sees it
    record_header(str(out / "small"), planned_header(dataclasses.replace(before, data=view), "fp16", False,
                                                     [str(p) for p in sorted((mix / "small").glob("*.tar"))]), None)
    preflight(before, str(out))  # the same config continues the set
    after = _cfg(assets, mix, tmp_path, small_extra=", caption_key: json.recaption")
    with pytest.raises(ConfigError, match=r"^source small: .*caption_key: 'txt' -> 'json.recaption'"):
        preflight(after, str(out))
