"""Offline tokenizer / text encoder / VAE folders: written, reloaded with from_pretrained, run."""

from __future__ import annotations

import importlib.util
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # an accidental hub call must fail fast, not hang

from pathlib import Path

import pytest
import torch
from diffusers import AutoencoderKL
from PIL import Image
from transformers import CLIPTextModel, CLIPTokenizer

from ldmscale.data.shard_writer import ShardSample, write_laion_shards
from ldmscale.models.offline import captions_from_shards, train_tokenizer, write_text_encoder, write_vae

ROOT = Path(__file__).resolve().parents[2]
CAPTIONS = [f"a handwritten digit {d}" for d in range(10)] * 5 + ["a small red square", "two blue lines"]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("models")
    tokenizer = train_tokenizer(CAPTIONS, out / "tokenizer", max_length=16)
    write_text_encoder(out / "text_encoder", tokenizer, seed=0)
    write_vae(out / "vae", preset="tiny", seed=0)
    return out


def test_tokenizer_round_trip_and_reload(model_dir: Path) -> None:
    written = {p.name for p in (model_dir / "tokenizer").iterdir()}
    assert {"vocab.json", "merges.txt", "tokenizer_config.json"} <= written
    tok = CLIPTokenizer.from_pretrained(model_dir / "tokenizer")
    assert tok.model_max_length == 16
    assert (tok.bos_token, tok.eos_token) == ("<|startoftext|>", "<|endoftext|>")
    ids = [tok(f"a handwritten digit {d}").input_ids for d in range(10)]
    assert all(i[0] == tok.bos_token_id and i[-1] == tok.eos_token_id for i in ids)
    assert len({tuple(i) for i in ids}) == 10  # each digit gets its own ids
    assert len({i[-2] for i in ids}) == 10  # and the difference is the digit token itself
    assert tok.decode(ids[7], skip_special_tokens=True) == "a handwritten digit 7"
    # Words never seen in training still encode (byte fallback) and decode back; case is folded like CLIP.
    text = "Zebra crossing, 42!"
    assert tok.decode(tok(text).input_ids, skip_special_tokens=True).replace(" ", "") == "zebracrossing,42!"
    padded = tok(["a handwritten digit 1"], padding="max_length", truncation=True, return_tensors="pt")
    assert padded.input_ids.shape == (1, 16)


def test_the_same_captions_give_the_same_tokenizer(tmp_path: Path) -> None:
    # the BPE trainer's own numbering of word-final characters follows hash-map order, which differs between
    # calls: the ids (and with them the random text encoder's rows for each digit) must not
    folders = [tmp_path / str(i) for i in range(4)]
    for folder in folders:
        train_tokenizer(CAPTIONS, folder, max_length=16)
    assert len({(folder / "vocab.json").read_text() for folder in folders}) == 1
    assert len({(folder / "merges.txt").read_text() for folder in folders}) == 1


def test_slow_format_files_match(model_dir: Path) -> None:
    # vocab.json + merges.txt alone rebuild the same tokenizer (what CLIP-format tools read).
    files = CLIPTokenizer(vocab=str(model_dir / "tokenizer" / "vocab.json"),
                          merges=str(model_dir / "tokenizer" / "merges.txt"))
    tok = CLIPTokenizer.from_pretrained(model_dir / "tokenizer")
    for caption in CAPTIONS[:10] + ["unseen words here"]:
        assert files(caption).input_ids == tok(caption).input_ids


def test_text_encoder_reload_and_forward(model_dir: Path) -> None:
    tok = CLIPTokenizer.from_pretrained(model_dir / "tokenizer")
    model = CLIPTextModel.from_pretrained(model_dir / "text_encoder").eval()
    assert (model_dir / "text_encoder" / "model.safetensors").exists()
    cfg = model.config
    assert (cfg.vocab_size, cfg.max_position_embeddings) == (len(tok), 16)
    assert (cfg.bos_token_id, cfg.eos_token_id, cfg.pad_token_id) == (
        tok.bos_token_id, tok.eos_token_id, tok.pad_token_id
    )
    ids = tok(["a handwritten digit 3", "a handwritten digit 4"], padding="max_length", return_tensors="pt")
    with torch.no_grad():
        out = model(input_ids=ids.input_ids)
    assert out.last_hidden_state.shape == (2, 16, 64)
    assert out.pooler_output.shape == (2, 64)
    # The digit token must reach the pooled (eos-position) output.
    assert not torch.allclose(out.pooler_output[0], out.pooler_output[1])


def test_seeded_weights_are_reproducible(model_dir: Path, tmp_path: Path) -> None:
    tok = CLIPTokenizer.from_pretrained(model_dir / "tokenizer")
    again = write_text_encoder(tmp_path / "te", tok, seed=0)
    first = CLIPTextModel.from_pretrained(model_dir / "text_encoder")
    for (name, a), b in zip(first.state_dict().items(), again.state_dict().values(), strict=True):
        assert torch.equal(a, b), name


def test_vae_reload_and_shapes(model_dir: Path) -> None:
    vae = AutoencoderKL.from_pretrained(model_dir / "vae").eval()
    assert (model_dir / "vae" / "diffusion_pytorch_model.safetensors").exists()
    x = torch.rand(1, 3, 32, 32) * 2 - 1
    with torch.no_grad():
        latent = vae.encode(x).latent_dist.sample()
        assert latent.shape == (1, 4, 8, 8)
        assert vae.decode(latent).sample.shape == (1, 3, 32, 32)
    with pytest.raises(ValueError, match="unknown VAE preset"):
        write_vae(model_dir / "nope", preset="huge")


def test_cli_reads_captions_from_shards(tmp_path: Path) -> None:
    samples = [ShardSample(Image.new("RGB", (8, 8)), f"a handwritten digit {d}") for d in range(10)]
    write_laion_shards(samples, tmp_path / "shards", samples_per_shard=4, progress=False)
    tars = sorted((tmp_path / "shards").glob("*.tar"))
    assert sorted(captions_from_shards(tars)) == sorted(s.caption for s in samples)

    spec = importlib.util.spec_from_file_location("cli", ROOT / "tools" / "make_offline_models.py")
    cli = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(cli)
    assert cli.main(["--shards", str(tmp_path / "shards" / "*.tar"), "--out", str(tmp_path / "m")]) == 0
    tok = CLIPTokenizer.from_pretrained(tmp_path / "m" / "tokenizer")
    assert len({tuple(tok(s.caption).input_ids) for s in samples}) == 10
    assert CLIPTextModel.from_pretrained(tmp_path / "m" / "text_encoder").config.vocab_size == len(tok)
