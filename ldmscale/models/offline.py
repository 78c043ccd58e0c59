"""Model folders that `from_pretrained` loads offline: tokenizer, text encoder and VAE.

No weights can be downloaded here, so the demo and tests use small random-init models written with
save_pretrained. They go through the same from_pretrained paths as real Stable Diffusion folders.
"""

from __future__ import annotations

import json
import tarfile
from collections.abc import Iterable, Iterator
from pathlib import Path

import torch
from diffusers import AutoencoderKL
from tokenizers import Regex, Tokenizer, normalizers, pre_tokenizers
from tokenizers.models import BPE
from tokenizers.trainers import BpeTrainer
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

from ldmscale.models.networks import VAE_PRESETS as _MODEL_VAE_PRESETS
from ldmscale.models.networks import build_vae

BOS, EOS = "<|startoftext|>", "<|endoftext|>"
END_OF_WORD = "</w>"
# CLIP's own word splitter (from transformers' CLIPTokenizer), so training sees the words CLIP will see.
CLIP_SPLIT = (
    r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""
)

# one table of autoencoder architectures for the whole project (the autoencoder stage trains the same ones)
VAE_PRESETS = _MODEL_VAE_PRESETS


def captions_from_shards(tar_paths: Iterable[str | Path]) -> Iterator[str]:
    """The .txt members (captions) of LAION-layout tars."""
    for path in tar_paths:
        with tarfile.open(path, "r") as tar:
            for member in tar:
                if member.isfile() and member.name.endswith(".txt"):
                    fobj = tar.extractfile(member)
                    assert fobj is not None  # regular files always have data
                    yield fobj.read().decode("utf-8")


def _train_bpe(captions: Iterable[str], vocab_size: int) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """Byte-level BPE with CLIP's normalizer, splitter and </w> word ends; returns (vocab, merges)."""
    bpe = Tokenizer(BPE(unk_token=EOS, continuing_subword_prefix="", end_of_word_suffix=END_OF_WORD))
    bpe.normalizer = normalizers.Sequence(
        [normalizers.NFC(), normalizers.Replace(Regex(r"\s+"), " "), normalizers.Lowercase()]
    )
    bpe.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(CLIP_SPLIT), behavior="removed", invert=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False),
        ]
    )
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    trainer = BpeTrainer(
        vocab_size=vocab_size,
        initial_alphabet=alphabet,
        # Every word-final character up front, in sorted order. Left to the trainer, those it meets get ids in
        # hash-map order, which changes from one process to the next, and the ids break ties between merges
        # (huggingface/tokenizers#2066): the same captions gave other merges and the digits other ids, hence
        # other rows of the random text encoder, so no demo ran twice the same. (Only the ids and merges are
        # kept below: these are not special tokens of the tokenizer written.)
        special_tokens=[ch + END_OF_WORD for ch in sorted(alphabet)],
        end_of_word_suffix=END_OF_WORD,
        continuing_subword_prefix="",
        show_progress=False,
    )
    bpe.train_from_iterator(captions, trainer=trainer)
    state = json.loads(bpe.to_str())["model"]
    vocab: dict[str, int] = dict(sorted(state["vocab"].items(), key=lambda kv: kv[1]))
    pairs = [m.split(" ") if isinstance(m, str) else m for m in state["merges"]]
    merges = [(a, b) for a, b in pairs]
    # Every byte must exist both inside and at the end of a word, as in CLIP's vocab; otherwise a caption
    # ending in a character the training captions never ended with would map to unk.
    for ch in sorted(alphabet):
        for token in (ch, ch + END_OF_WORD):
            vocab.setdefault(token, len(vocab))
    # Special tokens last, like CLIP (49406, 49407): the text encoder pools at the eos position, and its
    # legacy path (eos_token_id == 2) would instead take argmax(ids), which only works if eos is largest.
    for token in (BOS, EOS):
        vocab.setdefault(token, len(vocab))
    return vocab, merges


def train_tokenizer(
    captions: Iterable[str], out_dir: str | Path, max_length: int = 16, vocab_size: int = 1000
) -> CLIPTokenizer:
    """Train a byte-level BPE on captions, wrap it as CLIPTokenizer, save_pretrained to out_dir."""
    vocab, merges = _train_bpe(captions, vocab_size)
    tokenizer = CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=max_length)
    out = Path(out_dir)
    tokenizer.save_pretrained(out)
    # Also the slow-format files, so tools that expect CLIP's vocab.json + merges.txt find them.
    (out / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False))
    merges_text = "#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges)
    (out / "merges.txt").write_text(merges_text, encoding="utf-8")
    return tokenizer


def write_text_encoder(
    out_dir: str | Path,
    tokenizer: CLIPTokenizer,
    hidden_size: int = 64,
    layers: int = 2,
    seed: int = 0,
    initializer_factor: float = 3.0,
) -> CLIPTextModel:
    """Random-init CLIPTextModel matching the tokenizer (vocab, max length, special ids); safetensors.

    With CLIP's own small init (factor 1) the position embeddings dominate and captions that differ in one
    word map to nearly the same states (pairwise distance ~2 at norm 8 for "a handwritten digit N"); a
    trained encoder separates them. Factor 3 gives ~3x larger separation, closer to a real encoder's.
    """
    config = CLIPTextConfig(
        initializer_factor=initializer_factor,
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_hidden_layers=layers,
        num_attention_heads=2,
        projection_dim=hidden_size,
        max_position_embeddings=tokenizer.model_max_length,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(seed)
    model = CLIPTextModel(config).eval()
    model.save_pretrained(out_dir, safe_serialization=True)
    return model


def write_vae(out_dir: str | Path, preset: str = "tiny", seed: int = 0) -> AutoencoderKL:
    """Random-init AutoencoderKL from a named preset, saved with save_pretrained (safetensors)."""
    if preset not in VAE_PRESETS:
        raise ValueError(f"unknown VAE preset {preset!r}; choose from {sorted(VAE_PRESETS)}")
    torch.manual_seed(seed)
    vae = build_vae(preset, resolution=32 if preset == "tiny" else 512).eval()
    vae.save_pretrained(out_dir, safe_serialization=True)
    return vae


def write_offline_models(
    captions: Iterable[str],
    out_dir: str | Path,
    max_length: int = 16,
    vae_preset: str = "tiny",
    seed: int = 0,
) -> dict[str, Path]:
    """tokenizer/, text_encoder/ and vae/ under out_dir; returns their paths."""
    out = Path(out_dir)
    tokenizer = train_tokenizer(captions, out / "tokenizer", max_length=max_length)
    write_text_encoder(out / "text_encoder", tokenizer, seed=seed)
    write_vae(out / "vae", preset=vae_preset, seed=seed)
    return {name: out / name for name in ("tokenizer", "text_encoder", "vae")}
