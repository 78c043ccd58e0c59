"""What a rank reads at resume: the rank files its share of the epoch comes from (its own on the same world, 2-3 on
another; never every rank's), and its own slices of the EMA file (not the whole average)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import save_file

from ldmscale.checkpoint import checkpointer as checkpointer_module
from ldmscale.checkpoint import store as store_module
from ldmscale.checkpoint.checkpointer import Checkpointer, TrainState
from ldmscale.checkpoint.slices import TensorSlices
from ldmscale.data.position import saved_ranks_needed


def test_flat_slices_equal_the_flattened_tensor(tmp_path: Path) -> None:
    g = torch.Generator().manual_seed(0)
    tensors = {"scalar": torch.tensor(3.5), "bias": torch.randn(37, generator=g),
               "linear": torch.randn(13, 7, generator=g), "conv": torch.randn(6, 5, 3, 3, generator=g),
               "empty": torch.zeros(0, 4)}
    save_file(tensors, str(tmp_path / "ema.safetensors"))
    with TensorSlices(tmp_path / "ema.safetensors") as f:
        assert f.keys() == set(tensors)
        for name, full in tensors.items():
            flat = full.reshape(-1)
            n = flat.numel()
            cases = [(0, n), (0, 0)] + [(a, b - a) for a, b in
                                        (sorted(torch.randint(0, n + 1, (2,), generator=g).tolist())
                                         for _ in range(20))] if n else [(0, 0)]
            for start, numel in cases:
                assert torch.equal(f.flat_slice(name, start, numel), flat[start:start + numel]), (name, start, numel)


class RecordingData:
    """A data object with the loader's resume interface (the loader's own saved_ranks_needed); records what it
    was given."""

    def __init__(self, rank: int, world: int) -> None:
        self.rank, self.world, self.got = rank, world, None

    def state_dict(self) -> dict[str, Any]:
        return {}

    def saved_ranks_needed(self, saved_world: int) -> range:
        return saved_ranks_needed(self.rank, self.world, saved_world)

    def load_state_dict(self, positions: dict[int, dict[str, Any]], saved_world: int) -> str:
        self.got = (positions, saved_world)
        return ""


def _rank_files(tag_dir: Path, world: int, garbage: set[int] = frozenset()) -> None:  # type: ignore[assignment]
    for rank in range(world):
        path = store_module.rank_state_file(tag_dir, rank)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("{not json" if rank in garbage else json.dumps({"data": {"world": world, "rank": rank}}))


def _restore_on(tmp_path: Path, rank: int, world: int, saved_world: int,
                monkeypatch: pytest.MonkeyPatch) -> tuple[RecordingData, list[str]]:
    opened: list[str] = []
    real_read = store_module.read_json
    monkeypatch.setattr(store_module, "read_json", lambda path: opened.append(Path(path).name) or real_read(path))
    monkeypatch.setattr(checkpointer_module.dist, "rank", lambda: rank)
    data = RecordingData(rank, world)
    ck = Checkpointer(tmp_path / "unused", {"engine": object(), "train": TrainState(), "data": data}, keep_last=1,
                      every=1, config_yaml="", world_size=world)
    ck._restore_data(tmp_path, saved_world=saved_world)
    return data, opened


def test_each_rank_reads_only_its_own_rank_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Rank 1 of 2 resumes on 2 ranks: it reads ranks/rank00001.json alone (rank 0's file is unreadable here,
    and it does not matter); at 1,024 ranks that is 1,024 opens instead of a million."""
    _rank_files(tmp_path, 2, garbage={0})
    data, opened = _restore_on(tmp_path, 1, 2, 2, monkeypatch)
    assert data.got == ({1: {"world": 2, "rank": 1}}, 2) and opened == ["rank00001.json"]


def test_another_world_size_reads_only_the_saved_ranks_its_share_comes_from(tmp_path: Path,
                                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    """Rank 1 of 3 resumes an 8-rank save: its third of the epoch's rest lies in saved ranks 2..5, the files it
    reads (the others are unreadable here); 1,024 -> 768 ranks reads 2-3 files per rank."""
    _rank_files(tmp_path, 8, garbage={0, 1, 6, 7})
    data, opened = _restore_on(tmp_path, 1, 3, 8, monkeypatch)
    assert data.got is not None and data.got[1] == 8 and sorted(data.got[0]) == [2, 3, 4, 5]
    assert data.got[0][3] == {"world": 8, "rank": 3} and opened == [f"rank0000{r}.json" for r in (2, 3, 4, 5)]
    assert max(len(saved_ranks_needed(r, 768, 1024)) for r in range(768)) <= 3


def test_the_checkpointer_takes_only_the_objects_it_knows() -> None:
    with pytest.raises(ValueError, match="engine and train required"):
        Checkpointer(Path("unused"), {"engine": object(), "train": TrainState(), "optimizer": object()},
                     keep_last=1, every=1, config_yaml="", world_size=1)
