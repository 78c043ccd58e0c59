"""One latent sample as stored in a latent shard: the member `{key}.latent.safetensors` beside `{key}.txt` and
`{key}.json` (copied unchanged from the image shard).

The member holds the VAE posterior's mean and log-variance (not a sample: training draws the posterior per sample
id with noise.Stream.POSTERIOR, so the cache is exact and every epoch sees fresh posterior noise), the token ids,
and optionally the frozen text encoder's hidden states. safetensors stores bf16 natively and loads from bytes
without pickle.
"""

from __future__ import annotations

from typing import Literal

import torch
from safetensors.torch import load, save

LATENT_EXT = "latent.safetensors"
LatentDtype = Literal["fp16", "bf16", "fp32"]
DTYPES: dict[str, torch.dtype] = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}


def encode_latent(mean: torch.Tensor, logvar: torch.Tensor, input_ids: torch.Tensor,
                  text_embeddings: torch.Tensor | None = None, dtype: LatentDtype = "fp16") -> bytes:
    """One sample's tensors ([C, h, w] moments, [L] ids, optional [L, D] embeddings) -> the member's bytes."""
    dt = DTYPES[dtype]
    tensors = {
        "mean": mean.detach().to("cpu", dt).contiguous(),
        "logvar": logvar.detach().to("cpu", dt).contiguous(),
        "input_ids": input_ids.detach().to("cpu", torch.int64).contiguous(),
    }
    if text_embeddings is not None:
        tensors["text_embeddings"] = text_embeddings.detach().to("cpu", dt).contiguous()
    return save(tensors)


def read_latent(data: bytes) -> dict[str, torch.Tensor]:
    """The member's tensors as stored: mean, logvar, input_ids, optional text_embeddings."""
    return load(data)


def decode_latent(data: bytes) -> dict[str, torch.Tensor]:
    """The member's bytes -> what training needs: {"moments": [2C, h, w] float32 (mean then log-variance,
    diffusers' DiagonalGaussianDistribution layout), optional "text_embeddings": [L, D] float32}. The token ids
    are not used: training tokenizes the txt member as the image path does, so both paths see the same ids."""
    t = load(data)
    out = {"moments": torch.cat([t["mean"], t["logvar"]]).float()}
    if "text_embeddings" in t:
        out["text_embeddings"] = t["text_embeddings"].float()
    return out


def collate_latents(samples: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Per-sample dicts from decode_latent -> one micro-batch's tensors (stacked on a new first dim)."""
    return {k: torch.stack([s[k] for s in samples]) for k in samples[0]}
