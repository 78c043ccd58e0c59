"""One latent sample as stored in a latent shard: the member `{key}.latent.safetensors` beside `{key}.txt` and
`{key}.json` (copied unchanged from the image shard).

The member holds the VAE posterior's mean and log-variance (not a sample: training draws the posterior per sample
id with noise.Stream.POSTERIOR, so the cache is exact and every epoch sees fresh posterior noise), the token ids,
and optionally the frozen text encoder's hidden states. safetensors stores bf16 natively and loads from bytes
without pickle.

With aspect buckets (data.buckets) it also holds the sample's size conditioning, "size_cond" (int64 [6]: original
height, width, crop top, left, target height, width; the target is the sample's bucket), and the same six numbers
in the safetensors header's metadata, which `peek_size_cond` reads without decoding a tensor: what a loader needs
to put the sample in its bucket's batch.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Sequence
from typing import Literal

import torch
from safetensors.torch import load, save

LATENT_EXT = "latent.safetensors"
LatentDtype = Literal["fp16", "bf16", "fp32"]
DTYPES: dict[str, torch.dtype] = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}


def encode_latent(mean: torch.Tensor, logvar: torch.Tensor, input_ids: torch.Tensor,
                  text_embeddings: torch.Tensor | None = None, dtype: LatentDtype = "fp16",
                  size_cond: Sequence[int] | None = None) -> bytes:
    """One sample's tensors ([C, h, w] moments, [L] ids, optional [L, D] embeddings, optional six size-conditioning
    numbers) -> the member's bytes."""
    dt = DTYPES[dtype]
    tensors = {
        "mean": mean.detach().to("cpu", dt).contiguous(),
        "logvar": logvar.detach().to("cpu", dt).contiguous(),
        "input_ids": input_ids.detach().to("cpu", torch.int64).contiguous(),
    }
    if text_embeddings is not None:
        tensors["text_embeddings"] = text_embeddings.detach().to("cpu", dt).contiguous()
    if size_cond is None:
        return save(tensors)
    numbers = [int(v) for v in size_cond]
    tensors["size_cond"] = torch.tensor(numbers, dtype=torch.int64)
    return save(tensors, metadata={"size_cond": ",".join(map(str, numbers))})


def peek_size_cond(data: bytes) -> list[int] | None:
    """The six size-conditioning numbers from the member's header alone (8-byte length, then JSON), or None for a
    sample encoded without buckets."""
    (length,) = struct.unpack("<Q", data[:8])
    meta = json.loads(data[8 : 8 + length]).get("__metadata__") or {}
    return [int(v) for v in meta["size_cond"].split(",")] if "size_cond" in meta else None


def read_latent(data: bytes) -> dict[str, torch.Tensor]:
    """The member's tensors as stored: mean, logvar, input_ids, optional text_embeddings."""
    return load(data)


def decode_latent(data: bytes) -> dict[str, torch.Tensor]:
    """The member's bytes -> what training needs: {"moments": [2C, h, w] float32 (mean then log-variance,
    diffusers' DiagonalGaussianDistribution layout), optional "text_embeddings": [L, D] float32, optional
    "size_cond": [6] int64}. The token ids are not used: training tokenizes the txt member as the image path does,
    so both paths see the same ids."""
    t = load(data)
    out = {"moments": torch.cat([t["mean"], t["logvar"]]).float()}
    if "text_embeddings" in t:
        out["text_embeddings"] = t["text_embeddings"].float()
    if "size_cond" in t:
        out["size_cond"] = t["size_cond"]
    return out


def collate_latents(samples: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Per-sample dicts from decode_latent -> one micro-batch's tensors (stacked on a new first dim)."""
    return {k: torch.stack([s[k] for s in samples]) for k in samples[0]}
