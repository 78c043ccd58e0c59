"""Aspect buckets without the loader: the bucket set, which bucket an image goes to, the cover-crop and its offsets,
the config checks, the fixed per-bucket picks, and ldmscale-encode storing each sample's bucket and size/crop."""

from __future__ import annotations

import copy
import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from ldmscale.config import ConfigError, load_config, validate
from ldmscale.data.buckets import (
    Bucket,
    SizeCond,
    bucket_set,
    fixed_per_bucket,
    grid_buckets,
    nearest_bucket,
    original_size,
)
from ldmscale.data.decode import decode_sample_to_bucket, decode_to_bucket
from ldmscale.data.latent_format import LATENT_EXT, decode_latent, encode_latent, peek_size_cond
from ldmscale.data.shard_writer import iter_tar_samples
from ldmscale.demo.digits import write_digit_shards
from ldmscale.inference.images import labelled_grid
from tests.conftest import REPO, tiny_overrides
from tests.unit.test_latents import encode_cfg, run_encode

TINY = bucket_set(32, 8, 2.0)  # tall (40 high, 24 wide), square 32, wide (24 high, 40 wide)


def png(width: int, height: int, pattern: str = "gradient") -> bytes:
    """A picture whose pixels say where they are: red rises left to right, green top to bottom."""
    x = np.linspace(0, 255, width)[None, :].repeat(height, 0)
    y = np.linspace(0, 255, height)[:, None].repeat(width, 1)
    a = np.stack([x, y, np.full_like(x, 128)], -1).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(a).save(buf, format="PNG")
    return buf.getvalue()


# ---------------------------------------------------------------- the set and the assignment


def test_the_tiny_set_is_tall_square_wide() -> None:
    assert bucket_set(32, 8, 2.0) == (Bucket(40, 24), Bucket(32, 32), Bucket(24, 40))


def test_sdxl_scale_set_is_symmetric_near_equal_area_and_within_the_aspect_limit() -> None:
    buckets = bucket_set(1024, 64, 2.0)
    area = 1024 * 1024
    assert Bucket(1024, 1024) in buckets and Bucket(896, 1152) in buckets and Bucket(768, 1344) in buckets
    for b in buckets:
        assert b.width % 64 == 0 and b.height % 64 == 0
        assert 0.9 * area <= b.width * b.height <= area  # never more pixels than the square
        assert 1 / 2.0 <= b.aspect <= 2.0
        assert Bucket(b.width, b.height) in buckets  # the transpose
    assert [b.aspect for b in buckets] == sorted(b.aspect for b in buckets)
    assert len(bucket_set(1024, 64, 1.0)) == 1 and len(bucket_set(1024, 64, 4.0)) > len(buckets)


@pytest.mark.parametrize(("w", "h", "expected"), [
    (640, 480, "1152x896"), (480, 640, "896x1152"), (1000, 1000, "1024x1024"), (3000, 1000, "1408x704"),
    (1000, 3000, "704x1408"), (1344, 768, "1344x768"),
])
def test_an_image_goes_to_the_bucket_nearest_its_aspect(w: int, h: int, expected: str) -> None:
    assert nearest_bucket(bucket_set(1024, 64, 2.0), w, h).name == expected


def test_assignment_is_symmetric_in_log_aspect() -> None:
    buckets = bucket_set(512, 64, 2.0)
    for w, h in [(300, 200), (1000, 999), (512, 300), (7, 3)]:
        b, t = nearest_bucket(buckets, w, h), nearest_bucket(buckets, h, w)
        assert (t.width, t.height) == (b.height, b.width)


def test_original_size_comes_from_laion_json_or_is_none() -> None:
    assert original_size({"original_width": 640, "original_height": 480, "width": 256, "height": 256}) == (480, 640)
    for meta in (None, {}, {"width": 5, "height": 5}, {"original_width": "x", "original_height": 3},
                 {"original_width": 0, "original_height": 3}):
        assert original_size(meta) is None


# ---------------------------------------------------------------- decode: cover and crop


def test_centre_cover_crop_has_the_bucket_shape_and_true_offsets() -> None:
    data = png(200, 100)  # 2:1 -> the wide bucket 40x24; cover scale 0.24 -> 48x24, 8 px spare in x
    pixels, cond = decode_to_bucket(data, TINY, center_crop=True, crop_seed=0, key="k")
    assert pixels.shape == (24, 40, 3) and pixels.dtype == np.uint8
    assert cond == SizeCond(original=(100, 200), crop=(0, 4), target=(24, 40))
    # the crop is the window at those offsets of the whole image resized to cover the bucket
    full = np.asarray(Image.open(io.BytesIO(data)).convert("RGB").resize((48, 24), Image.Resampling.BICUBIC))
    assert np.abs(pixels.astype(int) - full[0:24, 4:44].astype(int)).max() <= 2


def test_random_crops_are_fixed_per_seed_and_key_and_match_their_offsets() -> None:
    data = png(120, 40)  # 3:1 -> the wide bucket; cover: 72x24, 32 px spare in x
    full = np.asarray(Image.open(io.BytesIO(data)).convert("RGB").resize((72, 24), Image.Resampling.BICUBIC))
    lefts = set()
    for key in map(str, range(12)):
        pixels, cond = decode_to_bucket(data, TINY, center_crop=False, crop_seed=3, key=key)
        again, cond_again = decode_to_bucket(data, TINY, center_crop=False, crop_seed=3, key=key)
        assert np.array_equal(pixels, again) and cond == cond_again  # resume and ldmscale-encode cut the same
        top, left = cond.crop
        assert top == 0 and 0 <= left <= 32
        assert np.abs(pixels.astype(int) - full[:, left : left + 40].astype(int)).max() <= 2
        lefts.add(left)
    assert len(lefts) > 3  # the keys spread over the spare width
    other = {decode_to_bucket(data, TINY, False, 4, str(k))[1].crop for k in range(12)}
    assert other != {(0, left) for left in lefts}  # another seed, other crops


def test_the_json_original_size_chooses_the_bucket_and_is_the_conditioning() -> None:
    data = png(60, 60)
    sample = {"__key__": "k", "jpg": data, "json": json.dumps({"original_width": 1200, "original_height": 600})}
    pixels, cond = decode_sample_to_bucket(sample, "jpg", TINY, True, 0)
    assert pixels.shape == (24, 40, 3) and cond.original == (600, 1200) and cond.target == (24, 40)
    sample["json"] = b"{not json"
    pixels, cond = decode_sample_to_bucket(sample, "jpg", TINY, True, 0)  # from the image itself
    assert pixels.shape == (32, 32, 3) and cond.original == (60, 60)


def test_a_large_jpeg_is_drafted_and_still_covers_its_bucket() -> None:
    a = (np.random.default_rng(0).random((600, 1500, 3)) * 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(a).save(buf, format="JPEG", quality=90)
    buckets = bucket_set(256, 32, 2.0)
    pixels, cond = decode_to_bucket(buf.getvalue(), buckets, True, 0, "k")
    assert cond.target == (192, 320) and pixels.shape == (192, 320, 3)
    assert cond.original == (600, 1500)  # the file's size, not the DCT-reduced one


# ---------------------------------------------------------------- config


def tiny_cfg(assets: Path, tmp_path: Path, **extra: object):
    return load_config(REPO / "configs/tiny.yaml", tiny_overrides(assets, tmp_path, **extra))


def test_bucket_step_must_suit_the_models(assets: Path, tmp_path: Path) -> None:
    cfg = tiny_cfg(assets, tmp_path, **{"data.buckets.enabled": True, "data.buckets.step": 8})
    validate(cfg, world_size=1, device_type="cpu")  # tiny VAE (factor 4) x tiny U-Net (2): 8 divides
    with pytest.raises(ConfigError, match=r"data.buckets.step=12 is not a multiple of 8 \(VAE factor 4 x U-Net "
                                          r"downsampling 2\).*data.buckets.step=8"):
        tiny_cfg(assets, tmp_path, **{"data.buckets.enabled": True, "data.buckets.step": 12})  # load_config validates


@pytest.mark.parametrize(("extra", "message"), [
    ({"data.buckets.step": 64}, "larger than data.resolution=32"),
    ({"data.buckets.max_aspect": 0.5}, "must be >= 1"),
    ({"data.buckets.step": 0}, "data.buckets.step=0 must be > 0"),
])
def test_bucket_settings_out_of_range_are_one_line(assets: Path, tmp_path: Path, extra: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        tiny_cfg(assets, tmp_path, **{"data.buckets.enabled": True, "data.buckets.step": 8, **extra}).check()


def test_disabled_buckets_check_nothing(assets: Path, tmp_path: Path) -> None:
    tiny_cfg(assets, tmp_path, **{"data.buckets.step": 12, "data.buckets.max_aspect": 0.5}).check()  # step 64 > 32


# ---------------------------------------------------------------- fixed picks for validation and grids


def test_fixed_per_bucket_takes_the_first_of_each_bucket_in_stream_order() -> None:
    t, s, w = TINY
    assigned = [s, w, s, s, t, w, s, w, w]
    assert fixed_per_bucket(assigned, 2) == [(t, [4]), (s, [0, 2]), (w, [1, 5])]
    # more samples later in the stream change nothing: comparable whatever was read after
    assert fixed_per_bucket(assigned + [t, t, t], 2)[1:] == [(s, [0, 2]), (w, [1, 5])]


def test_grid_buckets_are_tallest_squarest_widest() -> None:
    assert grid_buckets(bucket_set(1024, 64, 2.0)) == (Bucket(1408, 704), Bucket(1024, 1024), Bucket(704, 1408))
    assert grid_buckets([Bucket(32, 32)]) == (Bucket(32, 32),)


def test_a_grid_of_mixed_sizes_keeps_each_image_whole_and_in_proportion() -> None:
    colours = {(24, 40): "red", (32, 32): "green", (40, 24): "blue"}
    images = [Image.new("RGB", (w, h), c) for (h, w), c in colours.items()]
    grid = labelled_grid(images, ["a"] * 3, cols=3, min_cell=96)
    # cells of 40x40 scaled by 3 -> 120x120; each image centred at the same scale
    assert grid.size == (120 + 3 * 122, 122)
    a = np.asarray(grid)
    for c, ((h, w), colour) in enumerate(colours.items()):
        rgb = np.array(Image.new("RGB", (1, 1), colour).getpixel((0, 0)))
        cell = a[0:120, 120 + c * 122 : 120 + c * 122 + 120]
        painted = (cell == rgb).all(-1)
        assert painted.sum() == (h * 3) * (w * 3)
        rows, cols = np.nonzero(painted)
        assert (rows.min(), cols.min()) == ((120 - 3 * h) // 2, (120 - 3 * w) // 2)


# ---------------------------------------------------------------- latents


def test_a_latent_member_carries_its_size_conditioning_in_tensor_and_header() -> None:
    mean, logvar, ids = torch.randn(4, 6, 10), torch.randn(4, 6, 10), torch.arange(8)
    data = encode_latent(mean, logvar, ids, None, "fp16", size_cond=[600, 1200, 0, 7, 24, 40])
    assert peek_size_cond(data) == [600, 1200, 0, 7, 24, 40]
    back = decode_latent(data)
    assert back["size_cond"].tolist() == [600, 1200, 0, 7, 24, 40] and back["size_cond"].dtype == torch.int64
    plain = encode_latent(mean, logvar, ids, None, "fp16")
    assert peek_size_cond(plain) is None and "size_cond" not in decode_latent(plain)


@pytest.fixture(scope="module")
def aspect_digits(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("aspect_digits")
    write_digit_shards(root, samples_per_shard=90, heldout_fraction=0.05, aspects=True)
    return root / "heldout"  # 90 digits in one shard: wide, square, tall in turn


def encode_buckets(assets: Path, shards: Path, out: Path, center_crop: bool) -> dict:
    cfg = encode_cfg(assets, shards, **{"data.buckets.enabled": True, "data.buckets.step": 8,
                                        "data.center_crop": center_crop, "train.seed": 5})
    res = run_encode(cfg, out, dtype="fp32", batch_size=7)  # chunks that mix buckets
    return {"cfg": cfg, "res": res, "out": out, "center_crop": center_crop}


@pytest.fixture(scope="module", params=[True, False], ids=["centre", "random"])
def bucket_latents(assets: Path, aspect_digits: Path, tmp_path_factory: pytest.TempPathFactory,
                   request: pytest.FixtureRequest) -> dict:
    return encode_buckets(assets, aspect_digits, tmp_path_factory.mktemp("latents"), request.param)


def test_encode_stores_each_samples_bucket_and_size_with_its_moments(bucket_latents: dict, aspect_digits: Path
                                                                    ) -> None:
    out, center_crop = bucket_latents["out"], bucket_latents["center_crop"]
    assert bucket_latents["res"].written == ["00000"] and bucket_latents["res"].samples == 90
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["buckets"] == {"step": 8, "max_aspect": 2.0, "crop_seed": None if center_crop else 5}
    src = {s["__key__"]: s for s in iter_tar_samples(next(aspect_digits.glob("*.tar")))}
    written = list(iter_tar_samples(out / "00000.tar"))
    assert [s["__key__"] for s in written] == sorted(src)  # the shard's order, whatever the buckets
    seen = set()
    for s in written:
        cond = decode_latent(s[LATENT_EXT])["size_cond"].tolist()
        assert peek_size_cond(s[LATENT_EXT]) == cond
        meta = json.loads(s["json"])
        _, expected = decode_sample_to_bucket(src[s["__key__"]], "jpg", TINY, center_crop, 5)
        assert cond == expected.as_list() and cond[:2] == [meta["original_height"], meta["original_width"]]
        moments = decode_latent(s[LATENT_EXT])["moments"]
        assert moments.shape[-2:] == (cond[4] // 4, cond[5] // 4)  # the bucket through the VAE's factor 4
        seen.add((cond[4], cond[5]))
    assert seen == {(24, 40), (32, 32), (40, 24)}


def test_encode_moments_of_a_bucket_equal_its_images_encoded_alone(assets: Path, aspect_digits: Path,
                                                                    bucket_latents: dict) -> None:
    """Grouping a chunk by bucket for the VAE changes no sample's moments."""
    from diffusers import AutoencoderKL

    vae = AutoencoderKL.from_pretrained(assets / "models/vae").eval()
    src = {s["__key__"]: s for s in iter_tar_samples(next(aspect_digits.glob("*.tar")))}
    for s in list(iter_tar_samples(bucket_latents["out"] / "00000.tar"))[:6]:
        pixels, _ = decode_sample_to_bucket(src[s["__key__"]], "jpg", TINY, bucket_latents["center_crop"], 5)
        x = torch.from_numpy(pixels.copy()).permute(2, 0, 1)[None].float() / 127.5 - 1
        with torch.no_grad():
            post = vae.encode(x).latent_dist
        torch.testing.assert_close(decode_latent(s[LATENT_EXT])["moments"], torch.cat([post.mean, post.logvar], 1)[0],
                                   rtol=1e-4, atol=1e-4)


def test_training_from_latents_refuses_a_set_with_other_buckets(bucket_latents: dict) -> None:
    from ldmscale.latents.manifest import check_manifest

    cfg, out = copy.deepcopy(bucket_latents["cfg"]), bucket_latents["out"]
    manifest = json.loads((out / "manifest.json").read_text())
    urls = [str(out / "00000.tar")]
    check_manifest(cfg, manifest, urls)
    for change in ("buckets", "step", "seed"):
        other = copy.deepcopy(cfg)
        if change == "buckets":
            other.data.buckets.enabled = False
        elif change == "step":
            other.data.buckets.step = 16
        else:
            other.train.seed = 6  # random crops come from the seed; centre crops do not
        if change == "seed" and bucket_latents["center_crop"]:
            check_manifest(other, manifest, urls)
            continue
        with pytest.raises(ConfigError, match="encoded with aspect buckets"):
            check_manifest(other, manifest, urls)
