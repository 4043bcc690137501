"""The M+ retriever projectors (SPEC.md §3.3): ``f(x) = W2 · SiLU(W1 · x)`` on RMS-normalised hidden states.

Per layer there are three: ``query_proj`` (generation queries), ``key_proj`` (keys of memory rows, computed when a
row leaves the short-term memory) and ``encoder_query_proj`` (update side). Module names follow the official
checkpoint (``query_proj.0.weight``, ``query_proj.2.weight``; index 1 is the activation).
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["Projector"]


class Projector(nn.Sequential):
    """``Linear(d, 2·ds) → SiLU → Linear(2·ds, ds)`` without biases (``num_selector_layers = 2``), or a single
    ``Linear(d, ds)`` (``num_selector_layers = 1``)."""

    def __init__(self, hidden_size: int, out_dim: int, num_layers: int = 2, dtype: torch.dtype | None = None) -> None:
        if num_layers == 1:
            super().__init__(nn.Linear(hidden_size, out_dim, bias=False, dtype=dtype))
        elif num_layers == 2:
            super().__init__(
                nn.Linear(hidden_size, 2 * out_dim, bias=False, dtype=dtype),
                nn.SiLU(),
                nn.Linear(2 * out_dim, out_dim, bias=False, dtype=dtype),
            )
        else:
            raise ValueError(f"Projector: num_selector_layers={num_layers} is not supported (1 or 2)")
