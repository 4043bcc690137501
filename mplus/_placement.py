"""Module-state helpers: buffers that follow ``model.to(...)`` without taking the model's dtype, and a child module
left out of its parent's ``state_dict``."""

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
        for name, t in kept.items():  # (a meta buffer, e.g. built under torch.device("meta"), has no values: to_empty)
            meta = t.device.type == "meta" and device.type != "meta"
            self._buffers[name] = torch.empty(t.shape, dtype=t.dtype, device=device) if meta else t.to(device)
        return self


def leave_out_of_state_dict(module: nn.Module, child: str) -> None:
    """Leave ``module.<child>`` out of ``module.state_dict()``, and never report its tensors missing from
    ``module.load_state_dict(...)``: the model's memory is user data, saved per state, not weights. (The child's own
    ``state_dict()`` still holds all of it.)"""

    def drop(mod: nn.Module, state_dict: dict, prefix: str, local_metadata: dict) -> None:
        for key in [k for k in state_dict if k.startswith(f"{prefix}{child}.")]:
            del state_dict[key]

    def not_missing(mod: nn.Module, incompatible) -> None:
        own = {f"{child}.{name}" for name in getattr(mod, child).state_dict()}
        incompatible.missing_keys[:] = [
            k for k in incompatible.missing_keys if not any(k == n or k.endswith("." + n) for n in own)
        ]

    module.register_state_dict_post_hook(drop)
    module.register_load_state_dict_post_hook(not_missing)
