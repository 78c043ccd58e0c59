"""Mixtures at the loader: the draw of a source per sample slot (the same on 1, 2 and 4 ranks), the realised share
over an epoch, a small source repeated pass after pass and a large one never within an epoch, exact resume and an
elastic re-division that gives the epoch's draws once each, per-source captions and filters, latent shards that
mix alike, the per-source accounting, the plan and the config's one-line errors."""

from __future__ import annotations

import dataclasses
import io
import json
import math
import tarfile
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

from ldmscale.config import ConfigError, DataConfig, FilterConfig, SourceConfig
from ldmscale.data import PositionError, ResumableLoader, preflight
from ldmscale.data.latent_format import LATENT_EXT, encode_latent
from ldmscale.data.mixture import Deal, Mixture
from ldmscale.data.shard_writer import ShardSample, write_laion_shards
from ldmscale.data.shardlist import ShardListError
from ldmscale.data.sources import listed_without_store

SEED, EPOCH_SAMPLES, GLOBAL = 5, 160, 16  # 10 steps of 16 samples an epoch


def _images(n: int, seed: int) -> list[Image.Image]:
    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 255, (16, 16, 3), dtype=np.uint8)) for _ in range(n)]


@pytest.fixture(scope="module")
def sets(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """big: 8 shards x 20 (keys 00000xxxx..00007xxxx, captions "big i"); small: 4 x 5 (keys 001xxxxxx, "small i");
    recap: 4 x 5 (keys 002xxxxxx) whose json carries a `recaption` for even i only."""
    root = tmp_path_factory.mktemp("mix")
    write_laion_shards([ShardSample(im, f"big {i}") for i, im in enumerate(_images(160, 0))], root / "big",
                       samples_per_shard=20, progress=False)
    write_laion_shards([ShardSample(im, f"small {i}") for i, im in enumerate(_images(20, 1))], root / "small",
                       samples_per_shard=5, start_key=100, progress=False)
    write_laion_shards([ShardSample(im, f"alt {i}", extra={"recaption": f"synthetic {i}"} if i % 2 == 0 else {})
                        for i, im in enumerate(_images(20, 2))], root / "recap", samples_per_shard=5, start_key=200,
                       progress=False)
    return {name: root / name for name in ("big", "small", "recap")}


def source_of(key: str) -> str:
    return {"000": "big", "001": "small", "002": "recap"}[key[:3]]


def _cfg(sets: dict[str, Path], weights: dict[str, float], workers: int = 0, **data: Any) -> DataConfig:
    extra = data.pop("source_extra", {})
    sources = [SourceConfig(name=n, shards=[str(sets[n])], weight=w, **extra.get(n, {})) for n, w in weights.items()]
    return DataConfig(sources=sources, resolution=16, num_workers=workers, shuffle_buffer=8, **data)


def _loader(cfg: DataConfig, rank: int = 0, world: int = 1, micro: int = 4, **kw: Any) -> ResumableLoader:
    return ResumableLoader(cfg, None, seed=SEED, rank=rank, world=world, micro_batch=micro,
                           samples_per_epoch=EPOCH_SAMPLES, global_batch=GLOBAL, **kw)


def _batches(loader: ResumableLoader, n: int) -> list[dict[str, Any]]:
    return [next(loader) for _ in range(n)]


def _epoch_by_slot(cfg: DataConfig, world: int, micro: int) -> dict[int, str]:
    """Every slot of epoch 0 (the trainer's global sample index) -> the key that filled it, over all ranks."""
    by_slot = {}
    for rank in range(world):
        loader = _loader(cfg, rank, world, micro)
        accumulation = GLOBAL // (world * micro)
        for b, batch in enumerate(_batches(loader, loader.batches_per_epoch)):
            step, m = divmod(b, accumulation)
            for i, key in enumerate(batch["keys"]):
                by_slot[step * GLOBAL + (m * world + rank) * micro + i] = key
    return by_slot


def test_the_deal_numbers_every_slot_of_an_epoch_once() -> None:
    for deal in (Deal(1, 1, 4, 16), Deal(2, 2, 4, 16), Deal(4, 3, 2, 24), Deal(3, 2, 1, 6)):
        per_role = deal.global_batch // deal.world * 5 // deal.workers  # 5 steps, whole micro-batches per role
        slots = [deal.slots(r, j, 0, per_role) for r in range(deal.world) for j in range(deal.workers)]
        assert sorted(np.concatenate(slots).tolist()) == list(range(5 * deal.global_batch)), deal


def test_the_draw_is_the_same_slot_by_slot_on_1_2_and_4_ranks(sets: dict[str, Path]) -> None:
    """Which source fills each slot is a pure function of (seed, epoch, slot): the loader's epochs on 1, 2 and 4 ranks
    (micro-batch 4, 2 loader workers each) fill every slot from the source the mixture draws for it."""
    cfg = _cfg(sets, {"big": 0.5, "small": 0.5}, workers=2)
    drawn = Mixture.of(SEED, [0.5, 0.5]).sources(0, np.arange(EPOCH_SAMPLES)).tolist()
    expected = {g: ["big", "small"][k] for g, k in enumerate(drawn)}
    for world in (1, 2, 4):
        by_slot = _epoch_by_slot(cfg, world, 4)
        assert {g: source_of(k) for g, k in by_slot.items()} == expected, world
    assert Mixture.of(SEED, [0.5, 0.5]).sources(1, np.arange(64)).tolist() != drawn[:64]  # each epoch draws anew


def test_equal_weights_of_unequal_sources_repeat_the_small_one_and_never_the_large_one(sets: dict[str, Path]) -> None:
    """0.5/0.5 over 160 samples (small: 20, big: 160) on 2 ranks: the realised share is the draw's, within sampling
    error of 1/2; the small source is read pass after pass (each of its samples as often as the others, to the end
    of the epoch), the big one without a repeat."""
    cfg = _cfg(sets, {"big": 0.5, "small": 0.5})
    keys, late = Counter(), Counter()
    for rank in range(2):
        loader = _loader(cfg, rank, 2)
        for b, batch in enumerate(_batches(loader, loader.batches_per_epoch)):
            keys.update(batch["keys"])
            late.update(source_of(k) for k in batch["keys"] if b >= loader.batches_per_epoch * 3 // 4)
        assert sum(loader.position.drawn) == 80  # the rank's 80 samples, counted by source
    small = {k: n for k, n in keys.items() if source_of(k) == "small"}
    n_small = sum(small.values())
    assert n_small == Mixture.of(SEED, [0.5, 0.5]).counts(0, np.arange(EPOCH_SAMPLES))[1]
    assert abs(n_small / EPOCH_SAMPLES - 0.5) < 4 * math.sqrt(0.25 / EPOCH_SAMPLES)
    assert len(small) == 20 and max(small.values()) - min(small.values()) <= 2  # whole passes, reshuffled
    assert n_small / 20 > 2.5  # repeated: a small source does not run out
    assert late["small"] > 0  # and is not drained early: it still fills slots in the epoch's last quarter
    big = {k: n for k, n in keys.items() if source_of(k) == "big"}
    assert set(big.values()) == {1} and len(big) == EPOCH_SAMPLES - n_small  # sampled without repeats


def test_a_resumed_mixture_continues_bitwise(sets: dict[str, Path]) -> None:
    """Each rank saves after 5 micro-batches (2 loader workers: the round-robin and every source's stream position
    travel through the position) and resumes to the epoch's end: the keys of the run that was never stopped."""
    cfg = _cfg(sets, {"big": 0.3, "small": 0.7}, workers=2)
    for rank in range(2):
        reference = [b["keys"] for b in _batches(_loader(cfg, rank, 2), 20)]
        first = _loader(cfg, rank, 2)
        assert [b["keys"] for b in _batches(first, 5)] == reference[:5]
        state = json.loads(json.dumps(first.state_dict()))
        resumed = _loader(cfg, rank, 2)
        assert "data resume" in resumed.load_state_dict(state)
        assert [b["keys"] for b in _batches(resumed, 15)] == reference[5:], rank
        assert sum(resumed.position.drawn) == 80  # the counts by source carried over


@pytest.mark.parametrize(("before", "after"), [((2, 2, 4), (1, 0, 8)), ((1, 0, 4), (2, 2, 4))],
                         ids=["2x2w->1x1w-micro8", "1->2x2w"])
def test_an_elastic_resume_gives_the_epochs_draws_once_each(sets: dict[str, Path], before: tuple,
                                                            after: tuple) -> None:
    """3 of 10 steps on `before` (ranks, loader workers, micro-batch), the rest on `after`: every draw of the
    uninterrupted epoch (key and source, the small source's repeats included) exactly once."""
    (w0, k0, m0), (w1, k1, m1) = before, after
    cfg0 = _cfg(sets, {"big": 0.5, "small": 0.5}, workers=k0)
    cfg1 = _cfg(sets, {"big": 0.5, "small": 0.5}, workers=k1)
    epoch = Counter(_epoch_by_slot(cfg0, w0, m0).values())
    seen, states = Counter(), []
    for rank in range(w0):
        loader = _loader(cfg0, rank, w0, m0)
        for batch in _batches(loader, 3 * GLOBAL // (w0 * m0)):
            seen.update(batch["keys"])
        states.append(json.loads(json.dumps(loader.state_dict())))
    drawn = [0, 0]
    for rank in range(w1):
        loader = _loader(cfg1, rank, w1, m1)
        assert "epoch 0 continues with 112 samples left" in loader.load_state_dict(
            {r: states[r] for r in loader.saved_ranks_needed(w0)}, w0)
        for batch in _batches(loader, 7 * GLOBAL // (w1 * m1)):
            seen.update(batch["keys"])
        assert loader.position.given == loader.position.epoch_samples
        drawn = [a + b for a, b in zip(drawn, loader.position.drawn)]
    assert seen == epoch
    assert drawn == [sum(n for k, n in epoch.items() if source_of(k) == s) for s in ("big", "small")]


def test_a_missing_caption_field_is_counted_and_skipped(sets: dict[str, Path]) -> None:
    """caption_key json.recaption: the odd samples of `recap` have none (`no_caption`, counted for that source)."""
    cfg = _cfg(sets, {"big": 0.5, "recap": 0.5}, source_extra={"recap": {"caption_key": "json.recaption"}})
    loader = _loader(cfg)
    given = [(k, c) for b in _batches(loader, 12) for k, c in zip(b["keys"], b["captions"])]
    recap = [(k, c) for k, c in given if source_of(k) == "recap"]
    index = {k: (int(k[:5]) - 200) * 5 + int(k[5:]) for k, _ in recap}  # 5 samples a shard from shard 00200
    assert recap and all(c == f"synthetic {index[k]}" and index[k] % 2 == 0 for k, c in recap)  # their recaption
    assert all(c.startswith("big ") for k, c in given if source_of(k) == "big")  # the other source reads txt
    big_drops, recap_drops = loader.dropped_by_source()
    assert recap_drops["no_caption"] >= 10 and "no_caption" not in big_drops  # every odd sample of each pass


def test_a_caption_key_with_probabilities_picks_per_sample_id(sets: dict[str, Path]) -> None:
    cfg = _cfg(sets, {"recap": 1.0}, source_extra={"recap": {"caption_key": {"txt": 0.5, "json.recaption": 0.5}}})
    picks: dict[str, set[str]] = {}
    for _ in range(2):  # two runs, each over the source's passes: a sample's pick never changes
        for b in _batches(_loader(cfg), 10):
            for k, c in zip(b["keys"], b["captions"]):
                picks.setdefault(k, set()).add(c)
    assert all(len(c) == 1 for c in picks.values())
    synthetic = sum(next(iter(c)).startswith("synthetic") for c in picks.values())
    assert 0 < synthetic < len(picks)  # both fields picked (odd samples without a recaption: dropped if picked)


def test_per_source_filters_replace_the_data_filters_for_that_source(sets: dict[str, Path]) -> None:
    """data.filters drops "big 0".."big 9" (5 characters); small's own filters drop "small 0".."small 9" (7) and
    none of its samples by data.filters. Each drop is counted for its source."""
    cfg = _cfg(sets, {"big": 0.5, "small": 0.5}, filters=FilterConfig(min_caption_chars=6),
               source_extra={"small": {"filters": FilterConfig(min_caption_chars=8)}})
    loader = _loader(cfg)
    captions = [c for b in _batches(loader, loader.batches_per_epoch) for c in b["captions"]]
    small = {c for c in captions if c.startswith("small")}
    big = {c for c in captions if c.startswith("big")}
    assert small == {f"small {i}" for i in range(10, 20)}
    assert not {f"big {i}" for i in range(10)} & big and len(big) > 10
    big_drops, small_drops = loader.dropped_by_source()
    assert big_drops["caption_short"] >= 10 and small_drops["caption_short"] >= 10


def _latent_copy(images: Path, out: Path) -> None:
    """The image set's shards as latent shards (same names, keys, order): random moments for each sample."""
    out.mkdir(parents=True, exist_ok=True)
    for tar_path in sorted(images.glob("*.tar")):
        with tarfile.open(tar_path) as src, tarfile.open(out / tar_path.name, "w") as dst:
            for member in src.getmembers():
                data = src.extractfile(member).read()  # type: ignore[union-attr]
                if member.name.endswith(".jpg"):
                    member = tarfile.TarInfo(member.name[: -len("jpg")] + LATENT_EXT)
                    data = encode_latent(torch.randn(4, 2, 2), torch.randn(4, 2, 2), torch.zeros(8), None, "fp32")
                member.size = len(data)
                dst.addfile(member, io.BytesIO(data))


def test_latent_shards_mix_the_same_way(sets: dict[str, Path], tmp_path: Path) -> None:
    """data.format=latents over latent copies of the two sets draws the same source for each slot and gives the
    same keys in the same micro-batches as the image shards they came from."""
    for name in ("big", "small"):
        _latent_copy(sets[name], tmp_path / name)
    images = _cfg(sets, {"big": 0.3, "small": 0.7})
    latents = _cfg({n: tmp_path / n for n in ("big", "small")}, {"big": 0.3, "small": 0.7}, format="latents")
    for rank in range(2):
        a, b = _loader(images, rank, 2), _loader(latents, rank, 2)
        for x, y in zip(_batches(a, a.batches_per_epoch), _batches(b, b.batches_per_epoch)):
            assert x["keys"] == y["keys"] and "moments" in y
        assert a.position.drawn == b.position.drawn


def test_accounting_sums_the_ranks_per_source(sets: dict[str, Path]) -> None:
    """What the trainer's one reduction per step carries: per source the draws of the step and since the start, and
    the drops; the window's realised shares, the samples and the passes (draws / the planned samples)."""
    cfg = _cfg(sets, {"big": 0.5, "small": 0.5}, source_extra={"small": {"filters": FilterConfig(min_caption_chars=8)}})
    loaders = [_loader(cfg, rank, 2) for rank in range(2)]
    for loader in loaders:
        for source, size in zip(loader.sources, (160, 10)):
            source.samples = size
        loader.accounting.sizes = [160, 10]
    for _ in range(3):  # three steps: 2 micro-batches of 4 per rank, one reduction after each step
        vecs = []
        for loader in loaders:
            _batches(loader, 2)
            vecs.append(loader.accounting_vector())
        summed = [sum(v) for v in zip(*vecs)]
        tallies = [loader.read_accounting(summed) for loader in loaders]
    metrics = loaders[0].accounting.metrics(tallies[0])
    drawn = [sum(loader.position.drawn[k] for loader in loaders) for k in range(2)]
    assert sum(drawn) == 48 and metrics["data/big/samples"] == drawn[0] and metrics["data/small/samples"] == drawn[1]
    assert metrics["data/big/share"] + metrics["data/small/share"] == pytest.approx(1.0)
    assert metrics["data/small/share"] == pytest.approx(drawn[1] / 48)
    assert metrics["data/small/passes"] == pytest.approx(drawn[1] / 10)
    assert metrics["data/small/dropped_caption_short"] >= 10 and "data/big/dropped_caption_short" not in metrics
    assert metrics["data/dropped_caption_short"] == metrics["data/small/dropped_caption_short"]
    assert loaders[1].accounting.metrics(tallies[1]) == metrics  # every rank reads the same sums


def test_one_source_positions_of_format_3_still_resume(sets: dict[str, Path]) -> None:
    """A position written before mixtures (format 3: one source) resumes exactly."""
    cfg = DataConfig(shards=[str(sets["big"])], resolution=16, num_workers=0, shuffle_buffer=8)
    reference = [b["keys"] for b in _batches(_loader(cfg), 12)]
    first = _loader(cfg)
    _batches(first, 5)
    d = first.state_dict()
    old = {k: d[k] for k in ("epoch", "given", "epoch_samples", "micro_batch", "global_batch", "world", "workers")}
    old.update(format=3, shards=d["sources"][0]["shards"], roles=[
        {"segments": [{"src": s["src"], "samples": s["samples"], **s["streams"][0]} for s in r["segments"]],
         "counts": r["counts"][0]} for r in d["roles"]])
    resumed = _loader(cfg)
    resumed.load_state_dict(json.loads(json.dumps(old)))
    assert [b["keys"] for b in _batches(resumed, 7)] == reference[5:]


def test_a_changed_mixture_is_refused_or_starts_the_next_epoch(sets: dict[str, Path]) -> None:
    cfg = _cfg(sets, {"big": 0.5, "small": 0.5})
    first = _loader(cfg)
    _batches(first, 3)
    state = json.loads(json.dumps(first.state_dict()))
    with pytest.raises(PositionError, match=r"weighs its sources otherwise.*big 0.5 -> 0.25; small 0.5 -> 0.75"):
        _loader(_cfg(sets, {"big": 0.25, "small": 0.75})).load_state_dict(state)
    with pytest.raises(PositionError, match=r"names other sources.*big, small then, big, recap now"):
        _loader(_cfg(sets, {"big": 0.5, "recap": 0.5})).load_state_dict(state)
    moved = _loader(_cfg(sets, {"big": 0.25, "small": 0.75}, on_shard_list_change="new_epoch"))
    assert "epoch 1 starts" in moved.load_state_dict(state) and moved.position.epoch == 1


def test_the_plan_sizes_each_source_and_the_epoch_sums_them(sets: dict[str, Path]) -> None:
    cfg = _cfg(sets, {"big": 3.0, "small": 1.0}, source_extra={"small": {"filters": FilterConfig(min_caption_chars=8)}})
    plan = preflight.plan_data(cfg)
    big, small = plan.sources
    assert (big.samples, small.samples) == (160, 10) and plan.samples_per_epoch == 170
    text = plan.summary()
    assert "a mixture of 2 sources, epoch = 170 samples drawn by weight" in text
    assert "small: 4 shards, 20 samples in the shards, ~50.0% pass its filters" in text
    assert "weight 0.25: ~42 samples, 4.25 passes an epoch" in text  # 0.25 x 170 drawn from its 10 samples
    assert [(s.name, s.weight, len(s.urls), s.samples) for s in plan.mix_sources(cfg)] == [
        ("big", 0.75, 8, 160), ("small", 0.25, 4, 10)]  # what the loader reads: the listed shards, the sizes
    given = preflight.plan_data(_cfg(sets, {"big": 1.0, "small": 1.0}, samples_per_epoch=400))
    assert given.samples_per_epoch == 400 and "(data.samples_per_epoch)" in given.summary()


def test_an_empty_local_source_is_refused_before_any_process_group(sets: dict[str, Path], tmp_path: Path) -> None:
    cfg = _cfg({**sets, "none": tmp_path}, {"big": 1.0, "none": 1.0})
    with pytest.raises(ShardListError, match=r"source none: no shards found"):
        listed_without_store(cfg)
    with pytest.raises(Exception, match=r"source none: no shards found"):
        preflight.plan_data(cfg)


@pytest.mark.parametrize(("sources", "extra", "message"), [
    ([{"name": "a", "shards": ["x"], "weight": 1}], {"shards": ["y"]}, "data.shards and data.sources are both set"),
    ([{"name": "a", "shards": ["x"], "weight": 0}], {}, r"data.sources\[a\].weight=0.0 must be a number > 0"),
    ([{"name": "a", "shards": ["x"], "weight": -1}], {}, r"data.sources\[a\].weight=-1.0 must be"),
    ([{"name": "a", "shards": ["x"]}], {}, r"data.sources\[a\].weight=0.0 must be a number > 0"),
    ([{"name": "a", "shards": [], "weight": 1}], {}, r"data.sources\[a\].shards is empty"),
    ([{"name": "a", "shards": ["x"], "weight": 1}, {"name": "a", "shards": ["y"], "weight": 1}], {},
     "two sources are named 'a'"),
    ([{"shards": ["x"], "weight": 1}], {}, r"data.sources\[0\].name=''"),
    ([{"name": "a b", "shards": ["x"], "weight": 1}], {}, r"name='a b'"),
    ([{"name": "a", "shards": ["x"], "weight": 1, "caption_key": {"txt": 0.5, "json.recaption": 0.4}}], {},
     "the probabilities sum to 0.9, not 1"),
    ([{"name": "a", "shards": ["x"], "weight": 1, "caption_key": "json"}], {}, "'json' names no caption field"),
    ([{"name": "a", "shards": ["x"], "weight": float("inf")}], {}, "must be a number > 0"),
])
def test_bad_sources_are_one_line_config_errors(sources: list[dict], extra: dict, message: str) -> None:
    from ldmscale.config.loading import _from_dict
    from ldmscale.config.schema import Config

    cfg = _from_dict(Config, {"data": {"sources": sources, **extra}})
    with pytest.raises(ConfigError, match=message) as info:
        cfg.check()
    assert "\n" not in str(info.value)


def test_latents_read_the_caption_the_encoder_stored() -> None:
    from ldmscale.config.loading import _from_dict
    from ldmscale.config.schema import Config

    cfg = _from_dict(Config, {"data": {"format": "latents", "sources": [
        {"name": "a", "shards": ["x"], "weight": 1, "caption_key": "json.recaption"}]}})
    with pytest.raises(ConfigError, match="leave it at txt for the latent shards"):
        cfg.check()


def test_a_source_with_fewer_shards_than_workers_shares_them_each_sample_once(sets: dict[str, Path]) -> None:
    """small (4 shards of 5) on 4 ranks x 2 workers: 8 streams, two on each shard, each taking its own residue of
    the shard's samples, so one pass of all of them reads each of the 20 samples once."""
    from ldmscale.data.stream import SourceStream

    cfg = DataConfig(shards=[str(sets["small"])], resolution=16, shuffle_buffer=1)
    urls = sorted(str(p) for p in sets["small"].glob("*.tar"))
    seen: Counter[str] = Counter()
    for rank in range(4):
        for role in range(2):
            stream = SourceStream(cfg, urls, seed=SEED, epoch=0, src=(rank, 4, role, 2))
            seen.update(next(stream)["__key__"] for _ in range(2))  # 5 samples a shard, 2 streams: 3 and 2 each
    assert len(seen) == 16 and set(seen.values()) == {1}


def test_ldmscale_encode_writes_one_latent_set_per_source(assets: Path, sets: dict[str, Path], tmp_path: Path) -> None:
    """Each source into <out>/<name>/ with its manifest and the caption its caption_key picks; training from them
    (data.format=latents, the same names and weights) passes the manifest checks and mixes as the images do."""
    from ldmscale.config import load_config
    from ldmscale.data.sources import resolve_sources
    from ldmscale.latents.manifest import check_shard_format
    from tests.conftest import REPO, tiny_overrides
    from tests.unit.test_latents import latent_samples, run_encode

    sources = (f'[{{name: big, shards: [{sets["big"]}], weight: 0.5}}, {{name: recap, shards: [{sets["recap"]}], '
               f'weight: 0.5, caption_key: json.recaption}}]')
    overrides = [o for o in tiny_overrides(assets, tmp_path / "run") if not o.startswith("data.shards=")]
    cfg = load_config(REPO / "configs/tiny.yaml", [*overrides, f"data.sources={sources}", "data.num_workers=0"])
    res = run_encode(cfg, tmp_path / "latents", dtype="fp32", batch_size=32)
    assert set(res.manifests) == {"big", "recap"} and len(res.written) == 12
    recap_manifest = res.manifests["recap"]
    assert recap_manifest["caption_key"] == "json.recaption" and recap_manifest["counts"]["samples"] == 10
    recap = [s for t in sorted((tmp_path / "latents/recap").glob("*.tar")) for s in latent_samples(t)]
    assert sorted(s["txt"] for s in recap) == sorted(f"synthetic {i}".encode() for i in range(0, 20, 2))
    latent_sources = sources.replace(str(sets["big"]), str(tmp_path / "latents/big")).replace(
        str(sets["recap"]), str(tmp_path / "latents/recap")).replace(", caption_key: json.recaption", "")
    lcfg = load_config(REPO / "configs/tiny.yaml", [*overrides, f"data.sources={latent_sources}",
                                                    "data.format=latents"])
    for source in resolve_sources(lcfg.data):
        check_shard_format(dataclasses.replace(lcfg, data=source.cfg), source.urls)  # each set's own manifest
    loader = ResumableLoader(lcfg.data, None, seed=SEED, rank=0, world=1, micro_batch=4, samples_per_epoch=40,
                             global_batch=4, sources=resolve_sources(lcfg.data))
    batches = _batches(loader, 10)
    drawn = Mixture.of(SEED, [0.5, 0.5]).sources(0, np.arange(40)).tolist()
    assert [source_of(k) for b in batches for k in b["keys"]] == [["big", "recap"][k] for k in drawn]
    assert all(c.startswith("synthetic") for b in batches for k, c in zip(b["keys"], b["captions"])
               if source_of(k) == "recap")


def test_faults_in_one_source_resume_as_they_were_decided(sets: dict[str, Path], tmp_path: Path) -> None:
    """A tar that is not one among small's shards (retried, then dropped) and 1 in 5 JPEGs corrupt in big's: each
    rank, saved after 5 micro-batches and resumed, gives the keys and counts of the run that was never stopped,
    and each fault is counted for its own source."""
    import shutil

    from tests.integration.test_multiproc import _corrupt_every_fifth_jpeg

    big, small = tmp_path / "big", tmp_path / "small"
    shutil.copytree(sets["big"], big)
    shutil.copytree(sets["small"], small)
    for tar in sorted(big.glob("*.tar"))[::2]:
        _corrupt_every_fifth_jpeg(tar)
    (small / "00199.tar").write_bytes(b"not a tar" * 100)
    cfg = _cfg({"big": big, "small": small}, {"big": 0.5, "small": 0.5})
    for rank in range(2):
        reference = _loader(cfg, rank, 2)
        keys = [b["keys"] for b in _batches(reference, 20)]
        first = _loader(cfg, rank, 2)
        _batches(first, 5)
        resumed = _loader(cfg, rank, 2)
        resumed.load_state_dict(json.loads(json.dumps(first.state_dict())))
        assert [b["keys"] for b in _batches(resumed, 15)] == keys[5:], rank
        assert resumed.dropped_by_source() == reference.dropped_by_source()
    counts = [Counter(), Counter()]
    for rank in range(2):
        loader = _loader(cfg, rank, 2)
        _batches(loader, 20)
        for k, c in enumerate(loader.dropped_by_source()):
            counts[k].update(c)
    assert counts[0]["decode_error"] > 0 and "shard_error" not in counts[0]
    assert counts[1]["shard_error"] == 1 and "decode_error" not in counts[1]
