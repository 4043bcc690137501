"""Placement helpers: module state that follows ``model.to(...)`` without taking the model's dtype."""

from __future__ import annotations

import torch
from torch import nn


class FixedDtypeBuffers(nn.Module):
    """An ``nn.Module`` whose buffers named in ``fixed_dtype_buffers`` follow device moves but never dtype casts.

    ``model.to(torch.bfloat16)`` casts every floating buffer; ages (float64, exact integer counts) and RoPE tables
    (fp32: the kernels take fp32 tables) must keep their dtype, so they are set aside, the cast applied to the rest,
    and they are moved to the device the cast chose (probed on an empty tensor) without a round trip through the
    narrower dtype.
    """

    fixed_dtype_buffers: tuple[str, ...] = ()

    def _apply(self, fn, recurse: bool = True):
        kept = {name: self._buffers[name] for name in self.fixed_dtype_buffers if self._buffers.get(name) is not None}
        super()._apply(fn, recurse)
        device = fn(torch.empty(0)).device
        for name, t in kept.items():
            self._buffers[name] = t.to(device)
        return self
