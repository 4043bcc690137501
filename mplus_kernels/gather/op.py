"""``torch.ops.mplus.gather_rows_``: gather rows from two sources ([LTM rows ; cached rows]) into a staging buffer.

The long-term rows live on the host; the retrieved indices are computed on the device. On CUDA the sources may be
*pinned host* tensors while ``out`` and ``index`` are on the GPU: the Triton kernel then reads the selected rows
straight from host memory through unified virtual addressing (a zero-copy gather, DESIGN.md §2.4) — no
device-to-host sync of the indices, no CPU-side gather, no staging copy. On the CPU the same op is the threaded C++
gather. On the meta device (the stand-in for a GPU) the call reaches the fake kernel.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .. import _backend
from .._utils import (
    check_device,
    check_integer,
    check_no_grad,
    check_tensor,
    dense_rows,
    host_values,
    register_no_backward,
    rows_disjoint,
)
from .reference import gather_rows_reference_

OP = "mplus::gather_rows_"


def _dense_rows(t: Tensor) -> bool:  # [R, *F]: each row contiguous
    return dense_rows(t, 0)


def _host_source_ok(src: Tensor, out: Tensor) -> bool:
    """A host source for a device ``out``: pinned (CUDA reads it through UVA), or any host tensor when ``out`` is on
    the meta device (no data moves there; pinning needs a CUDA runtime)."""
    return src.device.type == "cpu" and out.device.type != "cpu" and (out.device.type == "meta" or src.is_pinned())


def gather_rows_(out: Tensor, src_a: Tensor, src_b: Tensor, index: Tensor, *, backend: str | None = None) -> Tensor:
    """``out[r] = src_a[index[r]]`` if ``index[r] < len(src_a)`` else ``src_b[index[r] - len(src_a)]``; returns out.

    Args:
        out: ``[R, *F]`` destination (e.g. a reusable staging buffer, or device memory), contiguous rows.
        src_a, src_b: ``[Na, *F]`` and ``[Nb, *F]`` sources, out's dtype, contiguous rows; on out's device, or —
            when out is on CUDA — pinned host memory (zero-copy read by the GPU).
        index: ``[R]`` integer indices into the concatenation ``[src_a ; src_b]`` (never materialised), on out's
            device (or on the host when out is on the host). Checked on the host when it is there; device indices
            are range-checked only under ``MPLUS_DEBUG_CHECKS=1`` (a host sync).
    """
    fn = "gather_rows_"
    for name, t in (("out", out), ("src_a", src_a), ("src_b", src_b), ("index", index)):
        check_tensor(fn, name, t)
    check_no_grad(fn, {"out": out, "src_a": src_a, "src_b": src_b})
    for name, t in (("src_a", src_a), ("src_b", src_b)):
        if t.dim() != out.dim() or t.shape[1:] != out.shape[1:]:
            raise ValueError(
                f"{fn}: {name} {list(t.shape)} must be [N, {', '.join(map(str, out.shape[1:]))}]"
                f" to match out {list(out.shape)}"
            )
        if t.dtype != out.dtype or (t.device != out.device and not _host_source_ok(t, out)):
            raise ValueError(
                f"{fn}: {name} is {t.dtype} on {t.device}{' (not pinned)' if t.device.type == 'cpu' else ''}; out "
                f"is {out.dtype} on {out.device}. Sources must be on out's device or, for a CUDA out, in pinned "
                "host memory"
            )
        if not _dense_rows(t):
            raise ValueError(f"{fn}: {name} {list(t.shape)} must have contiguous rows")
    if out.dim() < 1 or not _dense_rows(out):
        raise ValueError(f"{fn}: out {list(out.shape)} must be [R, ...] with contiguous rows")
    if not rows_disjoint(out, 0):
        raise ValueError(
            f"{fn}: out {list(out.shape)} with strides {list(out.stride())} has overlapping rows (an expand()ed or "
            "stride-0 view?); every row it writes needs its own memory"
        )
    if index.dim() != 1 or index.shape[0] != out.shape[0]:
        raise ValueError(f"{fn}: index must be [R={out.shape[0]}], got {list(index.shape)}")
    check_integer(fn, "index", index)
    if index.device != out.device and not (index.device.type == "cpu" and out.device.type == "cpu"):
        raise ValueError(f"{fn}: index is on {index.device}, expected {out.device} (where out is)")
    total = src_a.shape[0] + src_b.shape[0]
    if index.numel() and host_values(index):
        lo, hi = (int(x) for x in torch.aminmax(index))
        if lo < 0 or hi >= total:
            raise ValueError(f"{fn}: index range [{lo}, {hi}] is outside [0, {total}) (src_a + src_b rows)")
    which = _backend.resolve(fn, out.device, backend)
    index = index.to(dtype=torch.int64).contiguous()
    # Meta tensors have no values: every backend there is the fake kernel (the reference would copy them to the host).
    if not _backend.through_dispatcher(which, out.device) and out.device.type != "meta":
        if which == "triton":
            _backend.import_triton_impl("gather").gather_rows_fwd(out, src_a, src_b, index)
        else:
            gather_rows_reference_(out, src_a, src_b, index)
        return out
    torch.ops.mplus.gather_rows_(out, src_a, src_b, index)
    return out


def _register() -> None:
    if not _backend.cpp_available():
        return

    register_no_backward(OP, ("out", "src_a", "src_b", "index"))

    @torch.library.register_fake(OP)
    def _fake(out, src_a, src_b, index):  # mutates out only
        check_device("gather_rows_", "index", index, out.device, "out")
        for name, src in (("src_a", src_a), ("src_b", src_b)):  # out's device, or host rows (zero-copy)
            if src.device.type != "cpu":
                check_device("gather_rows_", name, src, out.device, "out")
        return None

    @torch.library.impl(OP, "CUDA")
    def _cuda(out, src_a, src_b, index):
        _backend.import_triton_impl("gather").gather_rows_fwd(out, src_a, src_b, index)


_register()
