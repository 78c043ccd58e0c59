"""Parts of the tensors in a safetensors file, read without loading the file: a rank that keeps 1/N of the EMA
reads about 1/N of ema.safetensors (safetensors' `get_slice` reads only the rows asked for)."""

from __future__ import annotations

import math
from pathlib import Path
from types import TracebackType

import torch
from safetensors import SafetensorError, safe_open

from ldmscale.checkpoint.store import CheckpointError


class TensorSlices:
    """`with TensorSlices(path) as f: f.flat_slice(name, start, numel)` is
    `load_file(path)[name].reshape(-1)[start:start + numel]`, reading only the rows that range covers."""

    def __init__(self, path: Path) -> None:
        self.path = path
        try:
            self._file = safe_open(str(path), framework="pt", device="cpu")
        except (SafetensorError, OSError) as e:
            raise CheckpointError(f"{path} cannot be read ({e}); resume from an earlier step") from None
        self._names = set(self._file.keys())

    def __enter__(self) -> TensorSlices:
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        del self._file  # drops the only reference to the open file, which closes it

    def keys(self) -> set[str]:
        return self._names

    def shape(self, name: str) -> list[int]:
        return list(self._file.get_slice(name).get_shape())

    def flat_slice(self, name: str, start: int, numel: int) -> torch.Tensor:
        """Elements [start, start + numel) of tensor `name` flattened (row-major), as a 1-D tensor."""
        part = self._file.get_slice(name)
        shape = part.get_shape()
        if len(shape) == 0:
            return self._file.get_tensor(name).reshape(-1)[start:start + numel]
        if numel == 0:  # (a tensor with a zero-sized dimension has no rows to divide by)
            return part[0:0].reshape(-1)
        row = math.prod(shape[1:])  # elements per index of the first dimension
        first, last = start // row, -(-(start + numel) // row)
        rows = part[first:last].reshape(-1)
        offset = start - first * row
        return rows[offset:offset + numel]
