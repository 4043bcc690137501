"""``torch.ops.mplus.rotate_keys``: memory keys rotated by their RoPE positions, once, for the decode steps that
would otherwise rotate the same keys at every step (``mplus.segments.MemoryKV.rotated``).

Contract: ``k [B, N, H, D]`` (fp32 / bf16 / fp16, keys before RoPE), ``positions [N]`` integer rows of the fp32
tables ``rope_cos/rope_sin [P, D/2]`` → a contiguous ``[B, N, H, D]`` of ``k``'s dtype: dims ``d`` and ``d + D/2``
mixed as ``rotate_half`` does, in fp32 with each product rounded before the sum (no fused multiply-add), rounded once
to ``k``'s dtype. The C++ kernel (every ISA level), the Triton kernel and :func:`rotate_keys_reference` give the same
bits. Not differentiable (a generation's keys); an input that asks for a gradient is refused.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .. import _backend
from .._utils import (
    check_device,
    check_float,
    check_integer,
    check_no_grad,
    check_same_device,
    check_tensor,
    register_no_backward,
)
from .._utils import shape_str as _shape
from .op import _route, check_rope_tables
from .reference import rotate_keys_reference

OP_ROTATE = "mplus::rotate_keys"


def _validate(k: Tensor, positions: Tensor, rope_cos: Tensor, rope_sin: Tensor) -> None:
    """Every argument checked before anything runs; the positions' values where they can be read without a sync."""
    fn = "rotate_keys"
    k = check_tensor(fn, "k", k)
    if k.dim() != 4:
        raise ValueError(f"{fn}: k must be [B, N, H, D], got {_shape(k)}")
    check_float(fn, "k", k)
    n, d = k.shape[1], k.shape[3]
    if d == 0 or d % 2:
        raise ValueError(f"{fn}: head dim D = k.shape[3] must be even and > 0 (RoPE rotates two halves), got {d}")
    positions = check_tensor(fn, "positions", positions)
    check_integer(fn, "positions", positions)
    if positions.dim() != 1 or positions.shape[0] != n:
        raise ValueError(f"{fn}: positions must be [N={n}] (one position per key row of k), got {_shape(positions)}")
    check_device(fn, "positions", positions, k.device, "k")
    check_rope_tables(fn, "positions", positions, rope_cos, rope_sin, d, k.device, "k")
    check_no_grad(fn, {"k": k, "positions": positions, "rope_cos": rope_cos, "rope_sin": rope_sin})


def rotate_keys(
    k: Tensor, positions: Tensor, rope_cos: Tensor, rope_sin: Tensor, *, backend: str | None = None
) -> Tensor:
    """``k [B, N, H, D]`` rotated by the RoPE rows ``positions [N]`` of ``rope_cos/rope_sin [P, D/2]`` (module
    docstring: the contract). ``backend``: ``auto`` / ``cpp`` / ``triton`` / ``reference``.

    Raises ``TypeError``/``ValueError`` naming the argument before anything runs, ``NotImplementedError`` for an input
    that requires grad (under grad mode)."""
    _validate(k, positions, rope_cos, rope_sin)
    route = _route("rotate_keys", OP_ROTATE, k.device, backend)
    if route == "reference":
        return rotate_keys_reference(k, positions, rope_cos, rope_sin)
    pos = positions.to(torch.int32)
    if route == "triton":
        from . import triton_rotate  # lazily: import mplus_kernels never needs triton

        return triton_rotate.rotate_keys_fwd(k, pos, rope_cos, rope_sin)
    return torch.ops.mplus.rotate_keys(k, pos, rope_cos, rope_sin)


def _register() -> None:
    """The fake kernel (torch.compile / FakeTensor / meta), the CUDA → Triton kernel and the refusal of gradients,
    when the schema exists."""
    if not _backend.cpp_available():
        return
    register_no_backward(OP_ROTATE, ("k", "positions", "rope_cos", "rope_sin"))

    @torch.library.register_fake(OP_ROTATE)
    def _fake_rotate(k, positions, rope_cos, rope_sin):
        named = {"positions": positions, "rope_cos": rope_cos, "rope_sin": rope_sin}
        check_same_device("rotate_keys", "k", k.device, named)
        return k.new_empty(k.shape)

    @torch.library.impl(OP_ROTATE, "CUDA")
    def _cuda_rotate(k, positions, rope_cos, rope_sin):
        from . import triton_rotate

        return triton_rotate.rotate_keys_fwd(k, positions, rope_cos, rope_sin)


_register()
