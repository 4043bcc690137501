"""Triton kernel of ``rotate_keys`` (GPU): memory keys rotated by their RoPE rows once, one program per key row (all
heads). Launched with ``enable_fp_fusion=False``: each product is rounded before the sum, as in the reference and the
C++ kernel, so the three agree bit for bit. As in the attention kernel (``triton_impl._rope_table``), the tables are
read contiguous and the positions are clamped to their rows in the kernel, so unchecked device values never index out
of bounds."""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from ..compile_check import KernelSpec

NUM_WARPS = 4


@triton.jit
def _rotate_keys_kernel(
    out_ptr, k_ptr, pos_ptr, cos_ptr, sin_ptr, N, H, HALF, P,
    s_kb, s_kn, s_kh, s_kd,
    BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    row = tl.program_id(0).to(tl.int64)  # b * N + n
    b, n = row // N, row % N
    p = tl.minimum(tl.maximum(tl.load(pos_ptr + n), 0), P - 1).to(tl.int64)  # checked on the host where it can be
    d = tl.arange(0, BLOCK_D)
    h = tl.arange(0, BLOCK_H)
    m_d = d < HALF
    mask = (h < H)[:, None] & m_d[None, :]
    c = tl.load(cos_ptr + p * HALF + d, mask=m_d, other=0.0)[None, :]  # [P, D/2] contiguous tables
    s = tl.load(sin_ptr + p * HALF + d, mask=m_d, other=0.0)[None, :]
    src = k_ptr + b * s_kb + n * s_kn + h[:, None] * s_kh + d[None, :] * s_kd
    a = tl.load(src, mask=mask, other=0.0).to(tl.float32)
    x = tl.load(src + HALF * s_kd, mask=mask, other=0.0).to(tl.float32)
    dst = out_ptr + row * H * 2 * HALF + h[:, None] * 2 * HALF + d[None, :]
    tl.store(dst, (a * c - x * s).to(out_ptr.dtype.element_ty), mask=mask)
    tl.store(dst + HALF, (x * c + a * s).to(out_ptr.dtype.element_ty), mask=mask)


def rotate_keys_fwd(k: Tensor, positions: Tensor, rope_cos: Tensor, rope_sin: Tensor) -> Tensor:
    """``k [B, N, H, D]`` rotated by the table rows ``positions [N]`` (int32): a contiguous tensor of k's dtype."""
    b, n, h, d = k.shape
    out = torch.empty((b, n, h, d), dtype=k.dtype, device=k.device)
    if out.numel() == 0:
        return out
    cos, sin = rope_cos.contiguous(), rope_sin.contiguous()
    _rotate_keys_kernel[(b * n,)](
        out, k, positions, cos, sin, n, h, d // 2, cos.shape[0], *k.stride(),
        BLOCK_H=triton.next_power_of_2(h), BLOCK_D=triton.next_power_of_2(d // 2), num_warps=NUM_WARPS,
        enable_fp_fusion=False,
    )  # fmt: skip
    return out


def compile_specs() -> list[KernelSpec]:
    """mplus-8b's keys (8 KV heads, D 128) in each float dtype."""
    specs = []
    for name in ("fp32", "bf16", "fp16"):
        signature = {"out_ptr": f"*{name}", "k_ptr": f"*{name}", "pos_ptr": "*i32", "cos_ptr": "*fp32",
                     "sin_ptr": "*fp32", "N": "i32", "H": "i32", "HALF": "i32", "P": "i32", "s_kb": "i64",
                     "s_kn": "i64", "s_kh": "i64", "s_kd": "i64", "BLOCK_H": "constexpr",
                     "BLOCK_D": "constexpr"}  # fmt: skip
        specs.append(KernelSpec(name=f"rotate_keys[{name}]", fn=_rotate_keys_kernel, signature=signature,
                                constexprs={"BLOCK_H": 8, "BLOCK_D": 64}, num_warps=NUM_WARPS))  # fmt: skip
    return specs
