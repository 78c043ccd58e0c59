"""The torch dtype of a precision name (`deepspeed.precision`: fp32, bf16, fp16)."""

from __future__ import annotations

import torch

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def torch_dtype(precision: str) -> torch.dtype:
    return DTYPES[precision]
