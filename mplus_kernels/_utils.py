"""Small helpers shared by the op families (validation and raw-bit views)."""

from __future__ import annotations

import torch
from torch import Tensor

# Kernels that only move data see every dtype as integers of the element's width: one kernel per width, exact bits,
# and no bf16 arithmetic under the Triton interpreter.
BITS_DTYPE = {1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}
BITS_TRITON = {1: "*i8", 2: "*i16", 4: "*i32", 8: "*i64"}


def as_bits(t: Tensor) -> Tensor:
    """The same memory seen as integers of the element's width (a view, no copy)."""
    return t.view(BITS_DTYPE[t.element_size()])


def shape_str(t: Tensor) -> str:
    return f"[{', '.join(str(s) for s in t.shape)}]"


def dense_rows(t: Tensor, row_dim: int) -> bool:
    """Whether the dims after ``row_dim`` form one contiguous row (any strides on the leading dims)."""
    expected = 1
    for dim in range(t.dim() - 1, row_dim, -1):
        if t.shape[dim] != 1 and t.stride(dim) != expected:
            return False
        expected *= t.shape[dim]
    return True
