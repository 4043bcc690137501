"""Pure-PyTorch reference of the two-source row gather used by long-term-memory retrieval."""

from __future__ import annotations

import torch
from torch import Tensor


def gather_rows_reference_(out: Tensor, src_a: Tensor, src_b: Tensor, index: Tensor) -> None:
    """``out[r] = src_a[index[r]]`` if ``index[r] < len(src_a)`` else ``src_b[index[r] - len(src_a)]``."""
    n_a = src_a.shape[0]
    index = index.to(src_a.device)  # gathered where the sources are (they may be host rows for a device out)
    in_a = index < n_a
    rows = src_a.new_empty((index.shape[0], *src_a.shape[1:]))
    rows[in_a] = src_a.index_select(0, index[in_a])
    rows[~in_a] = src_b.index_select(0, index[~in_a] - n_a)
    out.copy_(rows)


def index_select_reference(src_a: Tensor, src_b: Tensor, index: Tensor) -> Tensor:
    """The usual way: concatenate the sources, then ``index_select`` (a full copy of both sources first)."""
    return torch.cat([src_a, src_b]).index_select(0, index)
