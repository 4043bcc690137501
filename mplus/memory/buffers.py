"""Buffers of the long-term store: one layer's capacity buffers (:class:`StoreLayer`) and the in-place moves the
store makes on them (placement, asynchronous copies into pinned memory, compaction after an eviction)."""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

ROW_BUFFERS = ("hidden", "keys", "age", "rf", "k", "v")  # a StoreLayer's buffers (k, v: None without K/V)


def nbytes_of(shape: tuple[int, ...], dtype: torch.dtype) -> int:
    return math.prod(shape) * torch.empty((), dtype=dtype).element_size()


def copy_async_(dst: Tensor, src: Tensor) -> None:
    """``dst.copy_(src)``, asynchronous into pinned host memory. A meta source (the stand-in for a GPU) has no data
    to move: the copy is skipped, which is all the meta device can model."""
    if src.device.type == "meta" and dst.device.type != "meta":
        return
    dst.copy_(src, non_blocking=dst.is_pinned())


def moved(t: Tensor, device: torch.device, dtype: torch.dtype, pin: bool = False) -> Tensor:
    """``t`` on ``device`` as ``dtype`` (pinned when asked, on the host); a meta tensor (a model built under
    ``torch.device("meta")``) has no values to move: an empty tensor of its shape is allocated instead."""
    if t.device.type == "meta" and device.type != "meta":
        return torch.empty(t.shape, dtype=dtype, device=device, pin_memory=pin)
    t = t.to(device, dtype)
    return t.pin_memory() if pin and not t.is_pinned() else t


def row_runs(keep: Tensor) -> list[tuple[int, int]]:
    """Maximal runs ``(start, length)`` of consecutive indices in the ascending index list ``keep``."""
    if keep.numel() == 0:
        return []
    breaks = (keep[1:] - keep[:-1] != 1).nonzero().squeeze(1) + 1
    starts = torch.cat([torch.zeros(1, dtype=torch.long), breaks])
    ends = torch.cat([breaks, torch.tensor([keep.numel()])])
    return [(int(keep[s]), int(e - s)) for s, e in zip(starts.tolist(), ends.tolist())]


def compact_(buf: Tensor, runs: list[tuple[int, int]]) -> None:
    """Move the row runs of ``buf`` down to the front, in place, in chunks whose source and target never overlap."""
    dst = 0
    for start, length in runs:
        if start != dst:
            step = start - dst  # > 0: rows only move towards the front
            for off in range(0, length, step):
                c = min(step, length - off)
                buf[dst + off : dst + off + c].copy_(buf[start + off : start + off + c])
        dst += length


class StoreLayer(nn.Module):
    """One layer's long-term rows: capacity buffers ``hidden [C, d]``, ``keys [C, ds]``, ``age [C]``, ``rf [C]``
    and optionally ``k``/``v [C, Hkv, D]``; the owning store counts the used rows."""

    def __init__(self, buffers: dict[str, Tensor | None]) -> None:
        super().__init__()
        for name in ROW_BUFFERS:
            self.register_buffer(name, buffers.get(name))

    @property
    def capacity(self) -> int:
        return self.hidden.shape[0]

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs) -> None:
        """A state of another capacity loads: each buffer is re-made at the incoming capacity first (same place)."""
        for name in ROW_BUFFERS:
            have, got = self._buffers.get(name), state_dict.get(prefix + name)
            resized = isinstance(got, Tensor) and have is not None and got.shape[0] != have.shape[0]
            if resized and got.shape[1:] == have.shape[1:]:
                self._buffers[name] = torch.empty(
                    got.shape, dtype=have.dtype, device=have.device, pin_memory=have.is_pinned()
                )
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
