"""Helpers shared by the op families: argument validation (one kit for every wrapper) and raw-bit views."""

from __future__ import annotations

import operator

import torch
from torch import Tensor

from . import _config

# Kernels that only move data see every dtype as integers of the element's width: one kernel per width, exact bits,
# and no bf16 arithmetic under the Triton interpreter.
BITS_DTYPE = {1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}
BITS_TRITON = {1: "*i8", 2: "*i16", 4: "*i32", 8: "*i64"}
FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def as_bits(t: Tensor) -> Tensor:
    """The same memory seen as integers of the element's width (a view, no copy)."""
    return t.view(BITS_DTYPE[t.element_size()])


def shape_str(t: Tensor) -> str:
    return f"[{', '.join(str(s) for s in t.shape)}]"


def dense_rows(t: Tensor, row_dim: int) -> bool:
    """Whether the dims after ``row_dim`` form one contiguous row (any strides on the leading dims). An empty tensor
    addresses nothing and has dense rows whatever its strides."""
    if t.numel() == 0:
        return True
    expected = 1
    for dim in range(t.dim() - 1, row_dim, -1):
        if t.shape[dim] != 1 and t.stride(dim) != expected:
            return False
        expected *= t.shape[dim]
    return True


def rows_disjoint(t: Tensor, row_dim: int) -> bool:
    """Whether the rows of ``t`` (dims after ``row_dim``, dense: see :func:`dense_rows`) occupy pairwise disjoint
    memory: the leading dims of size > 1, innermost (smallest stride) first, each stride at least the extent of
    everything inside it. False for ``expand()``ed (stride-0) and other self-overlapping views, which an op must not
    write (the C++ ops check the same, csrc/cpu/memory_update.cpp ``rows_are_disjoint``)."""
    row = 1
    for size in t.shape[row_dim + 1 :]:
        row *= size
    if row == 0 or t.numel() == 0:
        return True
    extent = row
    for stride, size in sorted((t.stride(d), t.shape[d]) for d in range(row_dim + 1) if t.shape[d] > 1):
        if stride < extent:
            return False
        extent += (size - 1) * stride
    return True


# ------------------------------------------------------------------------------------------------ validation kit
def check_tensor(fn: str, name: str, t: object) -> Tensor:
    """``t`` itself, or a ``TypeError`` naming the argument when it is not a tensor (e.g. None)."""
    if not isinstance(t, Tensor):
        raise TypeError(f"{fn}: {name} must be a torch.Tensor, got {type(t).__name__}")
    return t


def check_float(fn: str, name: str, t: Tensor, dtype: torch.dtype | None = None) -> None:
    """``t`` is fp16/bf16/fp32 (or exactly ``dtype`` when given)."""
    if dtype is None and t.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{fn}: {name} must be float16, bfloat16 or float32, got {t.dtype}")
    if dtype is not None and t.dtype != dtype:
        raise TypeError(f"{fn}: {name} has dtype {t.dtype}, expected {dtype}")


def check_integer(fn: str, name: str, t: Tensor) -> None:
    """``t`` holds integers (any width; not bool)."""
    if t.dtype.is_floating_point or t.is_complex() or t.dtype == torch.bool:
        raise TypeError(f"{fn}: {name} must be an integer tensor, got {t.dtype}")


def check_int(fn: str, name: str, value: object, minimum: int | None = None) -> int:
    """``value`` as an ``int`` (a Python int or anything with ``__index__``; not bool), at least ``minimum`` when
    given; else a ``TypeError`` / ``ValueError`` naming the argument."""
    if isinstance(value, bool):
        raise TypeError(f"{fn}: {name} must be an int, got bool")
    try:
        value = operator.index(value)
    except TypeError:
        raise TypeError(f"{fn}: {name} must be an int, got {type(value).__name__}") from None
    if minimum is not None and value < minimum:
        raise ValueError(f"{fn}: {name} must be >= {minimum}, got {value}")
    return value


def check_device(fn: str, name: str, t: Tensor, device: torch.device, where: str) -> None:
    """``t`` is on ``device`` (``where`` names the argument that fixed it, e.g. ``"q"``)."""
    if t.device != device:
        raise ValueError(f"{fn}: {name} is on {t.device}, expected {device} (where {where} is)")


def check_same_device(fn: str, where: str, device: torch.device, tensors: dict[str, Tensor | None]) -> None:
    """Every tensor of ``tensors`` (None entries skipped) is on ``device``, the device of argument ``where``. The fake
    kernels check this: a raw op called with meta tensors mixed with CPU ones reaches them (Meta outranks CPU in the
    dispatcher), and would otherwise return meta results for host inputs."""
    for name, t in tensors.items():
        if t is not None:
            check_device(fn, name, t, device, where)


def check_no_grad(fn: str, tensors: dict[str, object]) -> None:
    """An op without a backward refuses inputs that ask for one (grad mode on and ``requires_grad``): without this
    torch would run it and return results that silently carry no gradient."""
    if not torch.is_grad_enabled():
        return
    for name, t in tensors.items():
        seq = t if isinstance(t, (list, tuple)) else [t]
        for i, x in enumerate(seq):
            if isinstance(x, Tensor) and x.requires_grad:
                where = f"{name}[{i}]" if isinstance(t, (list, tuple)) else name
                raise NotImplementedError(
                    f"{fn}: {where} requires grad, but {fn} has no backward: call it under torch.no_grad() or on "
                    "detached tensors"
                )


def register_no_backward(qualname: str, names: tuple[str, ...]) -> None:
    """An Autograd kernel for a raw op that has no backward: an input that asks for a gradient is refused
    (:func:`check_no_grad`; torch's fallback would run the op and return results that silently carry no gradient,
    with a warning only at backward time); otherwise the op runs below autograd, unchanged."""
    fn = qualname.split("::")[1]
    op = getattr(torch.ops.mplus, fn)

    @torch.library.impl(qualname, "Autograd")
    def _no_backward(*args):
        check_no_grad(fn, dict(zip(names, args)))
        with torch._C._AutoDispatchBelowAutograd():
            return op(*args)


def host_values(t: Tensor) -> bool:
    """Whether a wrapper may read ``t``'s values to validate them: host tensors always, device tensors only under
    ``MPLUS_DEBUG_CHECKS=1`` (on CUDA each read is a device-to-host sync; meta tensors have no values), and nothing
    while ``torch.compile`` traces or a CUDA graph is captured. Unchecked values are still safe: the raw ops check
    what they index with (DESIGN.md §2.5)."""
    if torch.compiler.is_compiling() or t.device.type == "meta":
        return False
    if t.device.type == "cpu":
        return True
    if t.device.type == "cuda" and torch.cuda.is_current_stream_capturing():
        return False
    return _config.debug_checks()
