"""The shard loader: filters, equal batches per rank, exact resume by sample keys, faults skipped and counted."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from ldmscale.config import DataConfig, FilterConfig
from ldmscale.data import ResumableLoader, decode_image, reject_reason
from ldmscale.data.shard_writer import ShardSample, write_laion_shards


def _samples(n: int, seed: int, size: int = 40) -> list[ShardSample]:
    rng = np.random.default_rng(seed)
    return [ShardSample(Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)), f"caption {seed} {i}")
            for i in range(n)]


@pytest.fixture(scope="module")
def uneven_shards(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Five shards of very different sizes (30, 7, 18, 3, 12 samples)."""
    root = tmp_path_factory.mktemp("uneven")
    for shard, n in enumerate([30, 7, 18, 3, 12]):
        write_laion_shards(_samples(n, shard), root, samples_per_shard=100, start_key=shard, progress=False)
    return root


def _loader(shards: Path | list[str], rank: int = 0, world: int = 1, workers: int = 2, per_epoch: int = 40,
            global_batch: int | None = None, **kw: object) -> ResumableLoader:
    specs = [str(s) for s in shards] if isinstance(shards, list) else [str(shards)]
    dc = DataConfig(shards=specs, resolution=16, num_workers=workers, shuffle_buffer=8)
    return ResumableLoader(dc, None, seed=3, rank=rank, world=world, micro_batch=4, samples_per_epoch=per_epoch,
                           global_batch=global_batch, **kw)  # type: ignore[arg-type]


def _keys(loader: ResumableLoader, n: int) -> list[list[str]]:
    return [next(loader)["keys"] for _ in range(n)]


def test_every_rank_gets_the_same_number_of_batches(uneven_shards: Path) -> None:
    loaders = [_loader(uneven_shards, rank=r, world=2, workers=1) for r in range(2)]
    assert loaders[0].batches_per_epoch == loaders[1].batches_per_epoch == 5
    for loader in loaders:  # two whole epochs, although rank 1's shards hold far fewer samples
        batches = _keys(loader, 10)
        assert all(len(b) == 4 for b in batches)
        assert loader.position.epoch == 1 and loader.position.batches == 5
    first = {k for b in _keys(_loader(uneven_shards, rank=0, world=2, workers=1), 5) for k in b}
    second = {k for b in _keys(_loader(uneven_shards, rank=1, world=2, workers=1), 5) for k in b}
    assert not first & second  # ranks read disjoint shards


STOPS = (3, 7, 12)


@pytest.fixture(scope="module")
def reference_run(uneven_shards: Path) -> tuple[list[list[str]], dict[int, dict]]:
    """20 batches of an uninterrupted run, and its position saved after each of STOPS batches on the way (as the
    trainer saves one and goes on), each as it travels through a checkpoint."""
    loader, batches, saved = _loader(uneven_shards), [], {}
    for i in range(20):
        if i in STOPS:
            saved[i] = json.loads(json.dumps(loader.state_dict()))
        batches.append(next(loader)["keys"])
    return batches, saved


@pytest.mark.parametrize("stop_at", STOPS)
def test_resume_continues_with_the_same_keys_in_the_same_order(uneven_shards: Path, reference_run: tuple,
                                                               stop_at: int) -> None:
    reference, states = reference_run
    saved = states[stop_at]
    resumed = _loader(uneven_shards)
    resumed.load_state_dict(saved)
    assert _keys(resumed, 20 - stop_at) == reference[stop_at:]


def test_epochs_reshuffle(uneven_shards: Path) -> None:
    loader = _loader(uneven_shards, workers=1)
    epoch0 = _keys(loader, loader.batches_per_epoch)
    epoch1 = _keys(loader, loader.batches_per_epoch)
    assert epoch0 != epoch1


def test_an_old_format_position_is_refused_with_a_way_out(uneven_shards: Path) -> None:
    old = {"format": 2, "epoch": 4, "batches": 3, "epoch_batches": 10, "world": 1, "workers": 2, "roles": []}
    with pytest.raises(ValueError, match="format 2, written by an older ldmscale.*on_shard_list_change=new_epoch"):
        _loader(uneven_shards).load_state_dict(old)
    loader = _loader(uneven_shards)
    loader.cfg.on_shard_list_change = "new_epoch"
    assert "epoch 5 starts" in loader.load_state_dict(old) and loader.position.epoch == 5


def _sample(meta: dict | None, caption: str = "a cat") -> dict:
    s = {"__key__": "000000000", "jpg": b"x", "txt": caption.encode()}
    if meta is not None:
        s["json"] = json.dumps(meta).encode()
    return s


def test_metadata_filters_name_their_reason() -> None:
    f = FilterConfig(min_width=256, min_height=256, max_aspect=2.0, min_similarity=0.3, allowed_nsfw=["UNLIKELY"],
                     max_punsafe=0.5, max_caption_chars=20)
    good = {"original_width": 512, "original_height": 400, "similarity": 0.35, "NSFW": "UNLIKELY"}
    assert reject_reason(_sample(good), f) is None
    assert reject_reason(_sample({**good, "original_width": 100}), f) == "too_narrow"
    assert reject_reason(_sample({**good, "original_width": 1000}), f) == "aspect"
    assert reject_reason(_sample({**good, "similarity": 0.2}), f) == "similarity"
    assert reject_reason(_sample({**good, "NSFW": "NSFW"}), f) == "nsfw"
    assert reject_reason(_sample({**good, "punsafe": 0.9}), f) == "unsafe"
    assert reject_reason(_sample(good, caption="x" * 30), f) == "caption_long"
    assert reject_reason(_sample(None), f) == "no_json"  # a half sample from a tar cut at a member boundary
    assert reject_reason({"__key__": "1", "txt": b"a"}, f) == "no_image"
    assert reject_reason({"__key__": "1", "jpg": b"a"}, f) == "no_caption"
    assert reject_reason(_sample(None), FilterConfig()) is None  # no metadata filter set: json not needed


def test_decode_reduces_in_dct_domain_and_crops() -> None:
    buf = io.BytesIO()
    Image.new("RGB", (800, 400), (200, 10, 10)).save(buf, "JPEG")
    out = decode_image(buf.getvalue(), 64, center_crop=True)
    assert out.shape == (64, 64, 3)
    assert abs(int(out[..., 0].mean()) - 200) < 6


def test_faults_are_skipped_and_counted(tmp_path: Path) -> None:
    """Missing shard, truncated tar, non-tar object, corrupt JPEG, samples without caption: none crashes."""
    good = write_laion_shards(_samples(24, 0), tmp_path / "s", samples_per_shard=12, progress=False)
    bad_dir = tmp_path / "s"
    data = good[1].read_bytes()
    (bad_dir / "00002.tar").write_bytes(data[: len(data) // 2])  # truncated mid-member
    (bad_dir / "00003.tar").write_bytes(b"this is not a tar archive" * 100)
    with tarfile.open(bad_dir / "00004.tar", "w") as tar:
        for key, members in {"000040000": {"jpg": b"\xff\xd8 corrupt", "txt": b"bad jpeg"},
                             "000040001": {"jpg": good[0].read_bytes()[:0] or b"\x00", "json": b"{}"}}.items():
            for ext, payload in members.items():
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(payload)
                tar.addfile(info, io.BytesIO(payload))
    shards = [str(p) for p in sorted(bad_dir.glob("*.tar"))] + [str(bad_dir / "00099.tar")]  # the last is missing
    dc = DataConfig(shards=shards, resolution=16, num_workers=1, shuffle_buffer=4, max_failed_shards=1.0)
    loader = ResumableLoader(dc, None, seed=0, rank=0, world=1, micro_batch=4, samples_per_epoch=60)
    keys = [k for _ in range(loader.batches_per_epoch) for k in next(loader)["keys"]]
    dropped = loader.dropped_counts()
    assert len(keys) == 60
    assert dropped["decode_error"] >= 1 and dropped["no_caption"] >= 1
    # the truncated and the non-tar shard: each retried once later in the epoch, then dropped for it
    assert dropped["shard_retry"] == dropped["shard_error"] == 2
    assert "000040000" not in keys


def test_a_prefix_and_a_glob_list_only_tar_objects_as_full_urls() -> None:
    """Object-store listing through fsspec (the memory filesystem stands in for s3:// here)."""
    import fsspec

    from ldmscale.data import expand_shard_urls

    fs = fsspec.filesystem("memory")
    for name in ("00001.tar", "00000.tar", "00000_stats.json", "00000.parquet"):
        fs.pipe(f"/laion-prefix-test/{name}", b"x")
    expected = ["memory:///laion-prefix-test/00000.tar", "memory:///laion-prefix-test/00001.tar"]
    assert expand_shard_urls("memory:///laion-prefix-test/") == expected
    assert expand_shard_urls("memory:///laion-prefix-test/*.tar") == expected
