"""ldmscale-encode in one process: what a latent shard holds, bad images counted, resume by skipping complete
shards, the manifest and its check against a training config, and one-line errors with exit code 2."""

from __future__ import annotations

import io
import json
import os
import shutil
import tarfile
from pathlib import Path

import pytest
import torch

from ldmscale.config import ConfigError, load_config
from ldmscale.data import decode_image, normalize_pixels, stack_uint8
from ldmscale.data.latent_format import LATENT_EXT, decode_latent, encode_latent, read_latent
from ldmscale.data.shard_writer import iter_tar_samples
from ldmscale.latents import encode
from tests.conftest import REPO, tiny_overrides
from tests.s3_fixtures import make_laion_tar, shard_keys


def encode_cfg(assets: Path, shards: Path, **extra: object):
    return load_config(REPO / "configs/tiny.yaml", tiny_overrides(assets, Path("unused"), **{
        "data.shards": f"[{shards}]", **extra}))


def run_encode(cfg, out: Path, **kw: object) -> encode.EncodeResult:
    with pytest.MonkeyPatch.context() as mp:  # world_info_from_env writes these; restored for later subprocesses
        for k, v in {"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "MASTER_ADDR": "", "MASTER_PORT": ""}.items():
            mp.setenv(k, v)
        return encode.main(cfg, str(out), progress=False, **kw)


def latent_samples(tar: Path) -> list[dict]:
    return list(iter_tar_samples(tar))


@pytest.mark.parametrize("dtype,tol", [("fp32", 0.0), ("fp16", 1e-3), ("bf16", 1e-2)])
def test_latent_member_round_trip(dtype: str, tol: float) -> None:
    mean, logvar = torch.randn(4, 8, 8), torch.randn(4, 8, 8) - 3
    ids, emb = torch.arange(16), torch.randn(16, 32)
    data = encode_latent(mean, logvar, ids, emb, dtype)
    back = decode_latent(data)
    assert back["moments"].dtype == torch.float32 and back["moments"].shape == (8, 8, 8)
    torch.testing.assert_close(back["moments"], torch.cat([mean, logvar]), rtol=tol, atol=tol * 4)
    torch.testing.assert_close(back["text_embeddings"], emb, rtol=tol, atol=tol * 4)
    assert torch.equal(read_latent(data)["input_ids"], ids)
    assert "text_embeddings" not in decode_latent(encode_latent(mean, logvar, ids, None, dtype))


def copy_shard_head(tar: Path, out: Path, samples: int) -> None:
    """The shard's first `samples` samples (every member of each), in their order."""
    keys: list[str] = []
    with tarfile.open(tar) as tin, tarfile.open(out, "w") as tout:
        for m in tin:
            key = m.name.split(".", 1)[0]
            if key not in keys:
                keys.append(key)
            if len(keys) > samples:
                break
            tout.addfile(m, tin.extractfile(m))


@pytest.fixture(scope="module")
def encoded(assets: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """The first 64 samples of three digit shards encoded: three shards for the rerun's skip-and-redo, more than one
    32-image batch each; every property below holds on them, at an eighth of the three whole shards' time."""
    root = tmp_path_factory.mktemp("latents")
    src = root / "images"
    src.mkdir()
    for tar in sorted((assets / "digits/train").glob("*.tar"))[:3]:
        copy_shard_head(tar, src / tar.name, 64)
    cfg = encode_cfg(assets, src)
    res = run_encode(cfg, root / "set", dtype="fp32", batch_size=32)
    return {"out": root / "set", "src": src, "res": res, "cfg": cfg}


def test_one_latent_shard_per_image_shard_with_the_same_samples(encoded: dict) -> None:
    from ldmscale.models.encoders import load_vae

    out, cfg = encoded["out"], encoded["cfg"]
    sources = sorted(encoded["src"].glob("*.tar"))
    assert sorted(p.name for p in out.glob("*.tar")) == [p.name for p in sources]
    vae = load_vae(cfg.model).eval()
    for src in sources[:2]:
        want, got = latent_samples(src), latent_samples(out / src.name)
        assert [s["__key__"] for s in got] == [s["__key__"] for s in want]  # same samples, same order
        assert all(g["txt"] == w["txt"] and g["json"] == w["json"] for g, w in zip(got, want))
        pixels = normalize_pixels(stack_uint8([decode_image(w["jpg"], 32, True) for w in want[:32]]))
        with torch.no_grad():
            post = vae.encode(pixels).latent_dist
        moments = torch.stack([decode_latent(g[LATENT_EXT])["moments"] for g in got[:32]])
        torch.testing.assert_close(moments, torch.cat([post.mean, post.logvar], 1), rtol=1e-5, atol=1e-5)
        stats = json.loads((out / f"{src.stem}_stats.json").read_text())
        assert stats["successes"] == len(want) and stats["dropped"] == {}


def test_manifest_describes_the_set(encoded: dict) -> None:
    from ldmscale.models.encoders import VAE_ENCODER_PARTS, load_vae, weights_hash

    m = json.loads((encoded["out"] / "manifest.json").read_text())
    n_src = sum(1 for p in encoded["src"].glob("*.tar") for _ in latent_samples(p))
    assert m["counts"]["samples"] == n_src == encoded["res"].samples
    assert m["resolution"] == 32 and m["dtype"] == "fp32" and m["vae"]["scaling_factor"] == 0.18215
    assert m["vae"]["encoder_hash"] == weights_hash(load_vae(encoded["cfg"].model), VAE_ENCODER_PARTS)
    assert len(m["source_shards"]) == len(m["shards"]) == 3


def test_rerun_skips_complete_shards_and_redoes_an_incomplete_one(encoded: dict,
                                                                  tmp_path: Path) -> None:
    out = tmp_path / "set"
    shutil.copytree(encoded["out"], out)
    (out / "00001_stats.json").unlink()  # killed between the tar's commit and its stats: not complete
    (out / "manifest.json").unlink()
    before = {p.name: p.stat().st_mtime_ns for p in out.glob("*.tar")}
    res = run_encode(encoded["cfg"], out, dtype="fp32", batch_size=32)
    assert res.written == ["00001"] and len(res.skipped) == 2
    after = {p.name: p.stat().st_mtime_ns for p in out.glob("*.tar")}
    assert {k for k in after if after[k] != before[k]} == {"00001.tar"}
    assert (out / "00001.tar").read_bytes() == (encoded["out"] / "00001.tar").read_bytes()  # deterministic bytes
    assert json.loads((out / "manifest.json").read_text()) == json.loads((encoded["out"] / "manifest.json").read_text())


def test_bad_images_and_filtered_samples_are_skipped_and_counted(assets: Path,
                                                                 tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    keys = shard_keys(0, 12)
    raw = make_laion_tar(keys)
    buf = io.BytesIO()
    with tarfile.open(fileobj=io.BytesIO(raw)) as tin, tarfile.open(fileobj=buf, mode="w") as tout:
        for m in tin:
            data = tin.extractfile(m).read()
            if m.name == f"{keys[4]}.jpg":
                data = b"not a jpeg"
            if m.name == f"{keys[7]}.txt":
                data = b"x"  # shorter than data.filters.min_caption_chars
            m.size = len(data)
            tout.addfile(m, io.BytesIO(data))
    (src / "00000.tar").write_bytes(buf.getvalue())
    cfg = encode_cfg(assets, src, **{"data.filters.min_caption_chars": 3})
    res = run_encode(cfg, tmp_path / "out")
    got = [s["__key__"] for s in latent_samples(tmp_path / "out/00000.tar")]
    assert got == [k for i, k in enumerate(keys) if i not in (4, 7)]
    assert dict(res.dropped) == {"decode_error": 1, "caption_short": 1}
    m = json.loads((tmp_path / "out/manifest.json").read_text())
    assert m["counts"]["dropped"] == {"caption_short": 1, "decode_error": 1} and m["counts"]["samples"] == 10


def test_cli_bad_input_is_one_line_and_exit_2(assets: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    base = ["--config", str(REPO / "configs/tiny.yaml"), *tiny_overrides(assets, tmp_path)]
    cases = [
        (["--out", str(tmp_path / "o"), *base, f"data.shards=[{tmp_path / 'nothing'}]"],
         "ldmscale-encode: data error: no shards found"),
        (["--out", str(assets / "digits/train"), *base], "give the latent shards their own folder"),
        (["--out", str(tmp_path / "o"), *base, "data.nope=1"], "config error: unknown config key data.nope"),
        (["--out", str(tmp_path / "o"), *base, "data.format=latents"], "data.format must be images for ldmscale-enc"),
    ]
    for args, message in cases:
        with pytest.raises(SystemExit) as exit_info:
            encode.cli(args)
        err = capsys.readouterr().err
        assert exit_info.value.code == 2 and message in err and len(err.strip().splitlines()) == 1, err
    assert not os.path.exists(tmp_path / "o")


# ---------------------------------------------------------------- training from latent shards


def test_latent_mode_loads_no_vae_encoder(assets: Path) -> None:
    from ldmscale.models.encoders import FrozenEncoders

    cfg = encode_cfg(assets, assets / "digits/train")
    enc = FrozenEncoders.load(cfg.model, torch.device("cpu"), torch.float32, vae_encoder=False)
    assert enc.vae.encoder is None and enc.vae.decoder is not None and enc.vae_encoder_hash


def test_manifest_mismatches_are_config_errors(encoded: dict, assets: Path, tmp_path: Path) -> None:
    from ldmscale.latents.manifest import check_encoders, check_shard_format, read_manifest

    out = encoded["out"]
    urls = sorted(str(p) for p in out.glob("*.tar"))
    ok = encode_cfg(assets, out, **{"data.format": "latents"})
    check_shard_format(ok, urls)  # the config it was encoded with passes
    with pytest.raises(ConfigError, match=r"encoded at data.resolution=32 center_crop=True, the config says 64"):
        check_shard_format(encode_cfg(assets, out, **{"data.format": "latents", "data.resolution": 64}), urls)
    other = tmp_path / "vae"
    shutil.copytree(assets / "models/vae", other)
    conf = json.loads((other / "config.json").read_text())
    (other / "config.json").write_text(json.dumps({**conf, "scaling_factor": 0.5}))
    with pytest.raises(ConfigError, match=r"VAE scaling_factor=0.18215, the configured VAE .* has 0.5"):
        check_shard_format(encode_cfg(assets, out, **{"data.format": "latents", "model.vae": other}), urls)
    with pytest.raises(ConfigError, match="but data.format=images: set data.format=latents"):
        check_shard_format(encode_cfg(assets, out), urls)
    with pytest.raises(ConfigError, match="is missing or not an ldmscale latent manifest"):
        check_shard_format(encode_cfg(assets, assets / "digits/train", **{"data.format": "latents"}),
                           sorted(str(p) for p in (assets / "digits/train").glob("*.tar")))
    with pytest.raises(ConfigError, match="encoder weights differ"):
        check_encoders(read_manifest(urls, {}), "0" * 64, "")


def test_train_cli_stops_on_a_mismatched_latent_set_with_exit_2(encoded: dict, assets: Path, tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch,
                                                                 capsys: pytest.CaptureFixture) -> None:
    from ldmscale.runtime import dist
    from ldmscale.trainer.cli import cli

    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("a process group was started before the latent set was checked")

    monkeypatch.setattr(dist, "init_distributed", refuse)
    args = ["--config", str(REPO / "configs/tiny.yaml"), *tiny_overrides(assets, tmp_path / "run", **{
        "data.shards": f"[{encoded['out']}]", "data.format": "latents", "data.resolution": 64})]
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        cli(args)
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and "ldmscale-train: config error: latent shards were encoded at" in err, err
    assert "Traceback" not in err and not (tmp_path / "run").exists()  # before any process group or output


def test_style_and_autoencoder_stage_refuse_latents() -> None:
    base = ["data.shards=[latents]", "data.format=latents"]
    with pytest.raises(ConfigError, match="train style step 2 from the image shards"):
        load_config(REPO / "configs/tiny.yaml", [*base, "style.enabled=true"])
    with pytest.raises(ConfigError, match="the autoencoder stage trains on images"):
        load_config(REPO / "configs/tiny.yaml", [*base, "train.stage=autoencoder"])
    with pytest.raises(ConfigError, match="set train.eval_every=0 or train from images"):
        load_config(REPO / "configs/tiny.yaml", [*base, "train.eval_every=5", "data.val_shards=[val]"])


