"""Resumes where something changed since the save, at the loader: the micro-batch, the number of loader workers,
the shard list. Each is continued exactly (every sample of the interrupted epoch once) or refused in one line."""

from __future__ import annotations

import json
from collections import Counter
from typing import Any

import numpy as np
import pytest
from PIL import Image

from ldmscale.config import DataConfig
from ldmscale.data import PositionError, ResumableLoader
from ldmscale.data.batches import EpochBatches, ImageDecoder
from ldmscale.data.position import check_saved_shards
from ldmscale.data.shard_writer import ShardSample, write_laion_shards

SAMPLES = 160  # eight shards of 20


@pytest.fixture(scope="module")
def shards(tmp_path_factory: pytest.TempPathFactory) -> list[str]:
    rng = np.random.default_rng(0)
    samples = [ShardSample(Image.fromarray(rng.integers(0, 255, (16, 16, 3), dtype=np.uint8)), f"c{i}")
               for i in range(SAMPLES)]
    return [str(p) for p in write_laion_shards(samples, tmp_path_factory.mktemp("eight"), samples_per_shard=20,
                                               progress=False)]


def _loader(urls: list[str], rank: int, world: int, micro: int, *, workers: int = 1, global_batch: int = 16,
            **data: Any) -> ResumableLoader:
    dc = DataConfig(shards=urls, resolution=16, num_workers=workers, shuffle_buffer=8, **data)
    return ResumableLoader(dc, None, seed=5, rank=rank, world=world, micro_batch=micro, samples_per_epoch=SAMPLES,
                           global_batch=global_batch, urls=urls)


def _run(urls: list[str], world: int, micro: int, batches: int, start: list[dict] | None = None, **kw: Any
         ) -> tuple[Counter[str], list[dict]]:
    """Keys all ranks see in `batches` micro-batches each (resuming every rank from `start`), and their positions."""
    keys: Counter[str] = Counter()
    states = []
    for rank in range(world):
        loader = _loader(urls, rank, world, micro, **kw)
        if start is not None:
            loader.load_state_dict(json.loads(json.dumps(start)))
        for _ in range(batches):
            keys.update(next(loader)["keys"])
        states.append(loader.state_dict())
    return keys, states


def _epoch(urls: list[str], world: int, micro: int, save_at: int, **kw: Any
           ) -> tuple[Counter[str], Counter[str], list[dict]]:
    """An uninterrupted epoch (every sample once): its keys, those of its first `save_at` micro-batches per rank, and
    every rank's position saved there on the way (as the trainer saves one and goes on)."""
    keys: Counter[str] = Counter()
    seen: Counter[str] = Counter()
    states = []
    for rank in range(world):
        loader = _loader(urls, rank, world, micro, **kw)
        for i in range(SAMPLES // (world * micro)):
            if i == save_at:
                states.append(json.loads(json.dumps(loader.state_dict())))
            batch = next(loader)["keys"]
            keys.update(batch)
            seen.update(batch if i < save_at else [])
    assert len(keys) == SAMPLES and set(keys.values()) == {1}
    return keys, seen, states


@pytest.mark.parametrize(("before", "after"), [((2, 4), (4, 2)), ((2, 4), (1, 8)), ((1, 2), (2, 8))],
                         ids=["2x4->4x2", "2x4->1x8", "1x2->2x8"])
def test_a_micro_batch_change_gives_the_rest_of_the_epoch_once(shards: list[str], before: tuple, after: tuple) -> None:
    """The global batch stays 16; ranks x micro-batch change: 3 of the epoch's 10 steps before, 7 after."""
    (w0, m0), (w1, m1) = before, after
    epoch, seen, states = _epoch(shards, w0, m0, save_at=3 * 16 // (w0 * m0))
    rest, after_states = _run(shards, w1, m1, 7 * 16 // (w1 * m1), start=states)
    assert seen + rest == epoch  # nothing repeated, nothing left out
    assert all(s["given"] == s["epoch_samples"] for s in after_states)  # and the epoch ends exactly there


def test_a_new_global_batch_that_cannot_take_the_rest_in_whole_steps_is_refused(shards: list[str]) -> None:
    _, states = _run(shards, 2, 4, 6)  # 3 steps of 16: 112 samples left
    with pytest.raises(PositionError, match=r"112 samples.*train.global_batch_size=16"):
        _loader(shards, 0, 2, 4, global_batch=24).load_state_dict(states)


class CountingDecoder(ImageDecoder):
    """Counts the images it decodes (in this process: the roles are played in-process below)."""

    def __init__(self, cfg: DataConfig) -> None:
        super().__init__(cfg, 5, None)
        self.calls = 0

    def __call__(self, sample: dict[str, Any]) -> dict[str, Any]:
        self.calls += 1
        return super().__call__(sample)


@pytest.mark.parametrize(("before", "after"), [((1, 2), (1, 3)), ((1, 1), (2, 1))], ids=["workers2->3", "ranks1->2"])
def test_a_re_divided_epoch_never_decodes_what_another_worker_gives(shards: list[str], before: tuple,
                                                                    after: tuple) -> None:
    """After 3 of 10 steps, each new role's first batch decodes only its own 4 samples, and the whole rest of
    its epoch only the samples it gives: what it passes over (another role's) is read, never decoded."""
    (w0, k0), (w1, k1) = before, after
    _, states = _run(shards, w0, 4, 3 * 16 // (w0 * 4), workers=k0)
    skipped = 0
    for rank in range(w1):
        resumed = _loader(shards, rank, w1, 4, workers=k1)
        resumed.load_state_dict(json.loads(json.dumps(states)))
        for j, role in enumerate(resumed.position.roles):
            skipped += sum(s.skip for s in role.segments)
            decoder = CountingDecoder(resumed.cfg)
            batches = iter(EpochBatches(resumed.cfg, shards, None, seed=5, epoch=0, micro_batch=4,
                                        roles=resumed.position.roles, first_batch=j, decoder=decoder))
            next(batches)
            assert decoder.calls == 4, (rank, j)
            assert role.segments[0].skip == min(s.skip for s in role.segments), j  # the cheapest start comes first
            rest = list(batches)
            assert decoder.calls == role.samples == 4 * (1 + len(rest)), (rank, j)
    assert skipped > 0  # some pieces start inside another worker's stream


def test_a_changed_shard_list_is_refused_naming_what_changed(shards: list[str]) -> None:
    """One shard removed before the resume: every saved index after it would point at another shard."""
    _, states = _run(shards, 2, 4, 6)
    fewer = shards[:3] + shards[4:]
    with pytest.raises(PositionError, match=r"0 shard\(s\) added and 1 removed.*on_shard_list_change=new_epoch"):
        _loader(fewer, 0, 2, 4).load_state_dict(states)  # rank 0's position holds the saved list
    with pytest.raises(PositionError, match="8 shards then, 7 now"):
        _loader(fewer, 1, 2, 4).load_state_dict(states[1])  # another rank's own position: the fingerprint
    with pytest.raises(PositionError, match=r"1 shard\(s\) added and 1 removed"):  # renamed: same count
        check_saved_shards(states[0], shards[:7] + [shards[7] + ".renamed"], "refuse")
    assert check_saved_shards(states[0], shards, "refuse") is None


def test_new_epoch_on_a_changed_shard_list_starts_the_next_epoch_over_the_new_list(shards: list[str]) -> None:
    _, states = _run(shards, 2, 4, 6)
    fewer = shards[:3] + shards[4:]
    assert "epoch 1 starts" in check_saved_shards(states[0], fewer, "new_epoch")
    _, after = _run(fewer, 2, 4, 2, start=states, on_shard_list_change="new_epoch")
    assert {s["epoch"] for s in after} == {1}
    first = _loader(fewer, 0, 2, 4, on_shard_list_change="new_epoch")
    first.load_state_dict(json.loads(json.dumps(states)))
    reference = _loader(fewer, 0, 2, 4)
    for _ in range(SAMPLES // 8):
        next(reference)
    assert [next(first)["keys"] for _ in range(3)] == [next(reference)["keys"] for _ in range(3)]
