"""``torch.ops.mplus.gather_rows_``: gather rows from two sources ([LTM rows ; cached rows]) into a staging buffer."""

from __future__ import annotations

import torch
from torch import Tensor

from .. import _backend
from .._utils import dense_rows
from .reference import gather_rows_reference_

OP = "mplus::gather_rows_"


def _dense_rows(t: Tensor) -> bool:  # [R, *F]: each row contiguous
    return dense_rows(t, 0)


def gather_rows_(out: Tensor, src_a: Tensor, src_b: Tensor, index: Tensor, *, backend: str | None = None) -> Tensor:
    """``out[r] = src_a[index[r]]`` if ``index[r] < len(src_a)`` else ``src_b[index[r] - len(src_a)]``; returns out.

    Args:
        out: ``[R, *F]`` destination (e.g. a reusable, pinned staging buffer), contiguous rows.
        src_a, src_b: ``[Na, *F]`` and ``[Nb, *F]`` sources, same dtype and device as ``out``, contiguous rows.
        index: ``[R]`` integer indices into the concatenation ``[src_a ; src_b]`` (never materialised).
    """
    for name, t in (("out", out), ("src_a", src_a), ("src_b", src_b), ("index", index)):
        if not isinstance(t, Tensor):
            raise TypeError(f"gather_rows_: {name} must be a torch.Tensor, got {type(t).__name__}")
    for name, t in (("src_a", src_a), ("src_b", src_b)):
        if t.dim() != out.dim() or t.shape[1:] != out.shape[1:]:
            raise ValueError(
                f"gather_rows_: {name} {list(t.shape)} must be [N, {', '.join(map(str, out.shape[1:]))}]"
                f" to match out {list(out.shape)}"
            )
        if t.dtype != out.dtype or t.device != out.device:
            raise ValueError(f"gather_rows_: {name} is {t.dtype} on {t.device}; out is {out.dtype} on {out.device}")
        if not _dense_rows(t):
            raise ValueError(f"gather_rows_: {name} {list(t.shape)} must have contiguous rows")
    if out.dim() < 1 or not _dense_rows(out):
        raise ValueError(f"gather_rows_: out {list(out.shape)} must be [R, ...] with contiguous rows")
    if index.dim() != 1 or index.shape[0] != out.shape[0]:
        raise ValueError(f"gather_rows_: index must be [R={out.shape[0]}], got {list(index.shape)}")
    if index.dtype.is_floating_point or index.dtype == torch.bool:
        raise TypeError(f"gather_rows_: index must be an integer tensor, got {index.dtype}")
    total = src_a.shape[0] + src_b.shape[0]
    if index.numel():
        lo, hi = int(index.min()), int(index.max())
        if lo < 0 or hi >= total:
            raise ValueError(f"gather_rows_: index range [{lo}, {hi}] is outside [0, {total}) (src_a + src_b rows)")
    which = _backend.resolve("gather_rows_", out.device, backend)
    index = index.to(device=out.device, dtype=torch.int64).contiguous()
    if which == "cpp":
        torch.ops.mplus.gather_rows_(out, src_a, src_b, index)
    elif which == "triton":
        _backend.import_triton_impl("gather").gather_rows_fwd(out, src_a, src_b, index)
    else:
        gather_rows_reference_(out, src_a, src_b, index)
    return out


def _register() -> None:
    if not _backend.cpp_available():
        return

    @torch.library.register_fake(OP)
    def _fake(out, src_a, src_b, index):  # noqa: ARG001 - mutates out only
        return None

    @torch.library.impl(OP, "CUDA")
    def _cuda(out, src_a, src_b, index):
        _backend.import_triton_impl("gather").gather_rows_fwd(out, src_a, src_b, index)


_register()
