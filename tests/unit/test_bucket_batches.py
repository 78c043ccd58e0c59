"""Per-bucket batching in the loader (data.buckets.enabled): every micro-batch one shape, the batch order a pure
function of the streams, exact and elastic resume each sample once, short buckets carried over an epoch's end."""

from __future__ import annotations

import io
import json
import tarfile
import time
from collections import Counter
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

from ldmscale.config import BucketConfig, DataConfig
from ldmscale.data import ResumableLoader
from ldmscale.data.batches import ImageDecoder
from ldmscale.data.buckets import bucket_set, nearest_bucket
from ldmscale.data.shard_writer import ShardSample, write_laion_shards

SIZES = {"wide": (48, 24), "square": (32, 32), "tall": (24, 48)}  # (width, height): buckets 40x24, 32x32, 24x40
BUCKETS = bucket_set(32, 8, 2.0)
N = 120


def _samples() -> list[ShardSample]:
    rng = np.random.default_rng(3)
    shapes = rng.choice(list(SIZES), size=N, p=[0.5, 0.3, 0.2])  # uneven buckets: short ones at every epoch's end
    return [ShardSample(Image.fromarray(rng.integers(0, 255, (SIZES[s][1], SIZES[s][0], 3), dtype=np.uint8)),
                        f"{s} {i}") for i, s in enumerate(shapes)]


@pytest.fixture(scope="module")
def shards(tmp_path_factory: pytest.TempPathFactory) -> tuple[list[str], dict[str, tuple[int, int]]]:
    """Six shards of 20 mixed-aspect samples (wide, square, tall); each key's bucket (height, width)."""
    root = tmp_path_factory.mktemp("aspects")
    samples = _samples()
    tars = write_laion_shards(samples, root, samples_per_shard=20, progress=False)
    keys = [f"{i // 20:05d}{i % 20:04d}" for i in range(N)]
    canvas = {}
    for key, s in zip(keys, samples):
        b = nearest_bucket(BUCKETS, *s.image.size)
        canvas[key] = (b.height, b.width)
    return [str(t) for t in tars], canvas


def _loader(urls: list[str], rank: int = 0, world: int = 1, workers: int = 0, micro_batch: int = 4,
            **kw: Any) -> ResumableLoader:
    dc = DataConfig(shards=urls, resolution=32, num_workers=workers, shuffle_buffer=4, center_crop=False,
                    buckets=BucketConfig(enabled=True, step=8, max_aspect=2.0))
    return ResumableLoader(dc, None, seed=5, rank=rank, world=world, micro_batch=micro_batch, samples_per_epoch=N,
                           global_batch=kw.pop("global_batch", 8), urls=urls, **kw)


def _given(loader: ResumableLoader, n: int) -> list[list[tuple[str, int]]]:
    """The next n micro-batches as (key, epoch of its slot) pairs."""
    out = []
    for _ in range(n):
        batch = next(loader)
        out.append(list(zip(batch["keys"], batch["epochs"])))
    return out


def _flat(batches: list[list[tuple[str, int]]]) -> list[tuple[str, int]]:
    return [pair for batch in batches for pair in batch]


def _pending(loader: ResumableLoader, epoch: int) -> list[str]:
    return [p.key for role in loader.position.roles for p in role.pending if p.epoch == epoch]


def _through_epoch(loaders: list[ResumableLoader], epoch: int) -> list[tuple[str, int]]:
    """Run every loader to the end of `epoch` (one batch each in turn, as ranks step together); the pairs given."""
    pairs: list[tuple[str, int]] = []
    while loaders[0].position.epoch == epoch and loaders[0].position.remaining > 0:
        for loader in loaders:
            pairs += _flat(_given(loader, 1))
    return pairs


def test_every_micro_batch_holds_one_bucket(shards: Any) -> None:
    urls, canvas = shards
    loader = _loader(urls)
    shapes = Counter()
    for _ in range(2 * loader.batches_per_epoch):
        batch = next(loader)
        pixels, cond = batch["pixels"], batch["size_cond"]
        assert pixels.dtype == torch.uint8
        h, w = pixels.shape[-2:]
        assert {canvas[k] for k in batch["keys"]} == {(h, w)}  # each sample on its own bucket's canvas
        assert cond.shape == (4, 6) and (cond[:, 4:] == cond.new_tensor([h, w])).all()
        shapes[(h, w)] += 1
    assert len(shapes) == 3  # wide, square and tall batches all came


def _simulated(stream: list[tuple[str, int]], canvas: dict[str, tuple[int, int]], batches: int, mb: int
               ) -> list[list[tuple[str, int]]]:
    """The bucket batches of one role by the rule alone: samples in stream order, the first queue to fill gives."""
    queues: dict[tuple[int, int], list[tuple[str, int]]] = {}
    out = []
    it = iter(stream)
    while len(out) < batches:
        key, epoch = next(it)
        q = queues.setdefault(canvas[key], [])
        q.append((key, epoch))
        if len(q) == mb:
            out.append(list(q))
            q.clear()
    return out


def test_batch_order_is_a_function_of_the_stream(shards: Any) -> None:
    """One role: the square loader's micro-batches are its stream in order; bucketing them by the rule gives
    exactly the bucket loader's batches, over an epoch's end (read ahead, carried samples)."""
    urls, canvas = shards
    square = ResumableLoader(DataConfig(shards=urls, resolution=32, num_workers=0, shuffle_buffer=4), None, seed=5,
                             rank=0, world=1, micro_batch=4, samples_per_epoch=N, global_batch=4, urls=urls)
    stream = [(k, e) for e in range(3) for _ in range(square.batches_per_epoch)
              for k in next(square)["keys"]]
    bucketed = _loader(urls, global_batch=4)
    got = _given(bucketed, 2 * bucketed.batches_per_epoch)
    assert got == _simulated(stream, canvas, len(got), 4)
    assert any(e == 1 for b in got[: bucketed.batches_per_epoch] for _, e in b)  # epoch 0 read into epoch 1


class _Jittery(ImageDecoder):
    """Decodes like ImageDecoder, sleeping a random while: worker timing differs from run to run."""

    def __call__(self, sample: dict[str, Any]) -> Any:
        time.sleep(float(np.random.default_rng().uniform(0, 0.01)))
        return super().__call__(sample)


def test_batch_order_does_not_depend_on_worker_timing(shards: Any) -> None:
    urls, _ = shards
    plain = _given(_loader(urls, workers=2), 20)
    dc = _loader(urls, workers=2).cfg
    jittery = _given(_loader(urls, workers=2, decoder=_Jittery(dc, 5, None)), 20)
    assert plain == jittery


@pytest.mark.parametrize("cut", [3, 14, 29])  # mid-epoch; at the epoch's end (read ahead); in the next epoch
def test_exact_resume_gives_the_uninterrupted_sequence(shards: Any, cut: int) -> None:
    urls, _ = shards
    whole = _given(_loader(urls), 40)
    first = _loader(urls)
    before = _given(first, cut)
    state = json.loads(json.dumps(first.state_dict()))  # what a checkpoint stores
    resumed = _loader(urls)
    resumed.load_state_dict(state)
    assert before + _given(resumed, 40 - cut) == whole


def test_elastic_two_ranks_to_one_gives_every_key_once(shards: Any) -> None:
    """2 ranks x 1 worker stop mid-epoch; 1 rank x 2 workers finishes the epoch: every sample of epoch 0 is given
    once or waits in a queue at its end, none twice, none lost."""
    urls, canvas = shards
    ranks = [_loader(urls, rank=r, world=2) for r in range(2)]
    given = []
    for _ in range(4):
        for loader in ranks:
            given += _flat(_given(loader, 1))
    saved = [json.loads(json.dumps(loader.state_dict())) for loader in ranks]
    one = _loader(urls, workers=2, global_batch=8)
    one.load_state_dict(saved)
    given += _through_epoch([one], 0)
    mine = [k for k, e in given if e == 0] + _pending(one, 0)
    assert Counter(mine) == Counter(canvas.keys())  # all 120 keys, each once
    assert one.position.given == one.position.epoch_samples


def test_short_buckets_are_carried_into_the_next_epoch(shards: Any) -> None:
    urls, canvas = shards
    loader = _loader(urls)
    given = _through_epoch([loader], 0)
    carried = _pending(loader, 0)
    assert carried, "uneven buckets leave samples waiting at the epoch's end"
    assert Counter([k for k, e in given if e == 0] + carried) == Counter(canvas.keys())
    nxt = _given(loader, loader.batches_per_epoch)
    assert loader.position.epoch == 1
    later = [k for k, e in _flat(nxt) if e == 0]
    assert sorted(later) == sorted(carried)  # each carried sample given in the next epoch, once


def _ordinal(key: str) -> float:
    """The sample's number (exact in fp16): shard x 20 + index."""
    return float(int(key[:5]) * 20 + int(key[5:]))


@pytest.fixture(scope="module")
def latent_shards(tmp_path_factory: pytest.TempPathFactory, shards: Any) -> list[str]:
    """The same samples as latent shards (ldmscale-encode's member layout): moments on each key's bucket / 4."""
    from ldmscale.data.latent_format import encode_latent

    urls, canvas = shards
    root = tmp_path_factory.mktemp("latents")
    out = []
    keys = sorted(canvas)
    for s in range(0, N, 20):
        path = root / f"{s // 20:05d}.tar"
        with tarfile.open(path, "w") as tar:
            for key in keys[s : s + 20]:
                h, w = canvas[key]
                mean = torch.full((4, h // 4, w // 4), _ordinal(key))
                member = encode_latent(mean, torch.zeros_like(mean), torch.zeros(8, dtype=torch.int64),
                                       size_cond=[h, w, 0, 0, h, w])
                for name, data in ((f"{key}.latent.safetensors", member), (f"{key}.txt", key.encode())):
                    info = tarfile.TarInfo(name)
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
        out.append(str(path))
    return out


def test_latents_batch_by_bucket_alike(shards: Any, latent_shards: list[str]) -> None:
    """data.format=latents: every batch one bucket (from the member's header), each key once over an epoch."""
    _, canvas = shards
    dc = DataConfig(shards=latent_shards, format="latents", resolution=32, num_workers=0, shuffle_buffer=4,
                    buckets=BucketConfig(enabled=True, step=8, max_aspect=2.0))
    loader = ResumableLoader(dc, None, seed=5, rank=0, world=1, micro_batch=4, samples_per_epoch=N,
                             global_batch=4, urls=latent_shards)
    given = []
    while loader.position.remaining > 0:
        batch = next(loader)
        h, w = batch["moments"].shape[-2:]
        assert {canvas[k] for k in batch["keys"]} == {(h * 4, w * 4)}
        assert (batch["moments"][:, 0, 0, 0] == torch.tensor([_ordinal(k) for k in batch["keys"]])).all()
        assert (batch["size_cond"][:, 4:] == torch.tensor([h * 4, w * 4])).all()
        given += list(zip(batch["keys"], batch["epochs"]))
    assert Counter([k for k, e in given if e == 0] + _pending(loader, 0)) == Counter(canvas.keys())


def test_micro_batch_change_keeps_every_key_once(shards: Any) -> None:
    """Positions convert to another micro-batch (and worker count) on the same ranks: every sample of epoch 0 once."""
    urls, canvas = shards
    ranks = [_loader(urls, rank=r, world=2) for r in range(2)]
    given = []
    for _ in range(5):
        for loader in ranks:
            given += _flat(_given(loader, 1))
    saved = [json.loads(json.dumps(loader.state_dict())) for loader in ranks]
    resumed = [_loader(urls, rank=r, world=2, micro_batch=2, global_batch=8) for r in range(2)]
    for r, loader in enumerate(resumed):  # each rank its own position, as the checkpointer reads it
        loader.load_state_dict({r: saved[r]}, 2)
    given += _through_epoch(resumed, 0)
    assert {len(set(canvas[k] for k, _ in pairs)) for pairs in [given[i : i + 2] for i in range(40, len(given), 2)]} \
        == {1}  # the 2-sample batches after the resume hold one bucket each
    mine = [k for k, e in given if e == 0] + [k for loader in resumed for k in _pending(loader, 0)]
    assert Counter(mine) == Counter(canvas.keys())


def test_a_bucketed_position_is_not_resumed_with_square_batches(shards: Any) -> None:
    from ldmscale.data.position import PositionError

    urls, _ = shards
    loader = _loader(urls)
    _given(loader, 3)
    state = loader.state_dict()
    square = ResumableLoader(DataConfig(shards=urls, resolution=32, num_workers=0, shuffle_buffer=4), None, seed=5,
                             rank=0, world=1, micro_batch=4, samples_per_epoch=N, global_batch=4, urls=urls)
    with pytest.raises(PositionError, match="data.buckets.enabled=true"):
        square.load_state_dict(state)


@pytest.mark.parametrize("cut", [5, 29])  # mid-epoch; before the epoch's last batch, inside its read-ahead
def test_a_bucketed_mixture_resumes_exactly(shards: Any, cut: int) -> None:
    """Two sources: each slot (and each slot read ahead into the next epoch) from the source drawn for it."""
    from ldmscale.config import SourceConfig

    urls, _ = shards
    dc = DataConfig(sources=[SourceConfig(name="a", shards=urls[:3], weight=0.7),
                             SourceConfig(name="b", shards=urls[3:], weight=0.3)],
                    resolution=32, num_workers=0, shuffle_buffer=4,
                    buckets=BucketConfig(enabled=True, step=8, max_aspect=2.0))

    def loader() -> ResumableLoader:
        return ResumableLoader(dc, None, seed=5, rank=0, world=1, micro_batch=4, samples_per_epoch=N, global_batch=4)

    whole = _given(loader(), 40)
    first = loader()
    before = _given(first, cut)
    resumed = loader()
    resumed.load_state_dict(json.loads(json.dumps(first.state_dict())))
    assert before + _given(resumed, 40 - cut) == whole
    assert {k[:5] in {u[-9:-4] for u in urls[:3]} for k, _ in _flat(whole)} == {True, False}  # both sources drawn


def test_an_elastic_resume_saved_at_an_epochs_very_end_carries_the_waiting_samples(shards: Any) -> None:
    """Saved right after epoch 0's last batch (nothing left, samples waiting): 2 -> 1 ranks, the waiting samples
    are given in epoch 1, once."""
    urls, canvas = shards
    ranks = [_loader(urls, rank=r, world=2) for r in range(2)]
    given = _through_epoch(ranks, 0)
    waiting = [k for loader in ranks for k in _pending(loader, 0)]
    assert waiting and ranks[0].position.remaining == 0
    assert Counter([k for k, e in given if e == 0] + waiting) == Counter(canvas.keys())
    one = _loader(urls, workers=2, global_batch=8)
    one.load_state_dict([json.loads(json.dumps(loader.state_dict())) for loader in ranks])
    later = _flat(_given(one, one.batches_per_epoch))
    assert sorted(k for k, e in later if e == 0) == sorted(waiting)


def test_elastic_one_rank_to_two_reads_one_position_each(shards: Any) -> None:
    """1 -> 2 ranks: each new rank resumes from the one saved position (the checkpointer's O(1) read) and takes its
    share of the saved slots and waiting samples: every sample of epoch 0 once."""
    urls, canvas = shards
    one = _loader(urls, workers=2, global_batch=8)
    given = _flat(_given(one, 10))
    saved = json.loads(json.dumps(one.state_dict()))
    ranks = [_loader(urls, rank=r, world=2) for r in range(2)]
    for loader in ranks:
        assert list(loader.saved_ranks_needed(1)) == [0]
        loader.load_state_dict({0: saved}, 1)
    given += _through_epoch(ranks, 0)
    mine = [k for k, e in given if e == 0] + [k for loader in ranks for k in _pending(loader, 0)]
    assert Counter(mine) == Counter(canvas.keys())


# saved after 14 batches: inside rank 0's read-ahead; after 15: at the epoch's very end, after it
@pytest.mark.parametrize("saved_batches, world, workers, micro_batch",
                         [(14, 1, 2, 4), (15, 1, 2, 4), (14, 2, 1, 2), (15, 4, 1, 2)])
def test_an_elastic_resume_inside_a_read_ahead_gives_every_key_of_both_epochs_once(
        shards: Any, saved_batches: int, world: int, workers: int, micro_batch: int) -> None:
    """2 ranks stop after rank 0's role read into epoch 1 and gave some of it; other ranks, workers or micro-batch
    finish epochs 0 and 1: the samples read ahead and given are not given again, each key once per epoch."""
    urls, canvas = shards
    ranks = [_loader(urls, rank=r, world=2) for r in range(2)]
    given = []
    for _ in range(saved_batches):
        for loader in ranks:
            given += _flat(_given(loader, 1))
    assert any(e == 1 for _, e in given), "the save falls after a batch that read into epoch 1"
    saved = {r: json.loads(json.dumps(loader.state_dict())) for r, loader in enumerate(ranks)}
    resumed = [_loader(urls, rank=r, world=world, workers=workers, micro_batch=micro_batch) for r in range(world)]
    for loader in resumed:  # each new rank reads only the saved positions it needs
        loader.load_state_dict({r: saved[r] for r in loader.saved_ranks_needed(2)}, 2)
    given += _through_epoch(resumed, 0)
    for _ in range(resumed[0].batches_per_epoch):  # all of epoch 1 (a loader enters it with its next batch)
        for loader in resumed:
            given += _flat(_given(loader, 1))
    assert {(loader.position.epoch, loader.position.remaining) for loader in resumed} == {(1, 0)}
    for epoch in (0, 1):
        waiting = [k for loader in resumed for k in _pending(loader, epoch)]
        assert Counter([k for k, e in given if e == epoch] + waiting) == Counter(canvas.keys()), epoch


def test_a_second_elastic_resume_keeps_the_carried_next_epoch(shards: Any) -> None:
    """A two-source mixture: 2 ranks stop inside a role's read-ahead, 1 rank x 2 workers resumes and stops again
    one step later, still in epoch 0 (its next epoch the saved division's), 2 ranks finish. A mixture draws its
    sources by weight (a source's keys may come twice in an epoch), so each epoch must give what the uninterrupted
    run gives: the same slots, each from its source's same stream."""
    from ldmscale.config import SourceConfig

    urls, _ = shards
    dc = DataConfig(sources=[SourceConfig(name="a", shards=urls[:3], weight=0.6),
                             SourceConfig(name="b", shards=urls[3:], weight=0.4)],
                    resolution=32, num_workers=0, shuffle_buffer=4, center_crop=False,
                    buckets=BucketConfig(enabled=True, step=8, max_aspect=2.0))

    def loader(rank: int, world: int, workers: int) -> ResumableLoader:
        dw = dc.__class__(**{**dc.__dict__, "num_workers": workers})
        return ResumableLoader(dw, None, seed=5, rank=rank, world=world, micro_batch=4, samples_per_epoch=N,
                               global_batch=8)

    def resume(saved: list[ResumableLoader], world: int, workers: int) -> list[ResumableLoader]:
        states = {r: json.loads(json.dumps(s.state_dict())) for r, s in enumerate(saved)}
        out = [loader(r, world, workers) for r in range(world)]
        for new in out:
            new.load_state_dict({r: states[r] for r in new.saved_ranks_needed(len(saved))}, len(saved))
        return out

    def finish(ranks: list[ResumableLoader], given: list[tuple[str, int]]) -> list[Counter[str]]:
        given = given + _through_epoch(ranks, 0)
        for _ in range(ranks[0].batches_per_epoch):  # all of epoch 1 (a loader enters it with its next batch)
            for rank in ranks:
                given += _flat(_given(rank, 1))
        return [Counter([k for k, e in given if e == epoch] + [k for rank in ranks for k in _pending(rank, epoch)])
                for epoch in (0, 1)]

    ranks = [loader(r, 2, 1) for r in range(2)]
    given: list[tuple[str, int]] = []
    while not any(e == 1 for _, e in given):  # until a role read into epoch 1 and gave some of it
        for rank in ranks:
            given += _flat(_given(rank, 1))
    one = resume(ranks, 1, 2)
    expected = finish(ranks, given)  # the uninterrupted run
    assert one[0].position.following is not None
    given += _flat(_given(one[0], 2))  # one step (2 micro-batches of 4 make the global batch of 8)
    assert one[0].position.following is not None  # still in epoch 0 (its end at most): the carried next epoch
    assert finish(resume(one, 2, 1), given) == expected
