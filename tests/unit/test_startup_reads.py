"""Start-up reads at 1,024 ranks: before the process group only local shards are looked at; an object store gets
one request per job (rank 0's, shared), not one per rank."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from ldmscale.config import load_config
from ldmscale.latents import manifest
from ldmscale.trainer.loop import check_data_early
from tests.conftest import REPO, tiny_overrides


def test_no_rank_reads_an_object_stores_manifest_before_the_process_group(monkeypatch: pytest.MonkeyPatch,
                                                                        assets: Path) -> None:
    read: list[str] = []

    def recording_read_json(url: str, storage_options: Any = None) -> None:
        read.append(url)

    monkeypatch.setattr(manifest, "read_json", recording_read_json)
    for fmt in ("latents", "images"):
        cfg = load_config(REPO / "configs/tiny.yaml", tiny_overrides(assets, Path("unused"), **{
            "data.shards": "s3://laion/{00000..00007}.tar", "data.format": fmt}))
        assert check_data_early(cfg, 2) is False  # rank 0 reads it (shared_manifest) once the group is up
    assert read == []
    local = load_config(REPO / "configs/tiny.yaml", tiny_overrides(assets, Path("unused")))
    assert check_data_early(local, 2) is True and len(read) == 1  # beside local shards: a file every rank may read
