"""Triton row gather from two sources (GPU, when the long-term rows live on the device)."""

from __future__ import annotations

import triton
import triton.language as tl
from torch import Tensor

from .._utils import BITS_TRITON, as_bits
from ..compile_check import KernelSpec

BLOCK = 1024
NUM_WARPS = 4


@triton.jit
def _gather_rows_kernel(out_ptr, a_ptr, b_ptr, index_ptr, N_A, F, stride_o, stride_a, stride_b, BLOCK: tl.constexpr):
    i_r = tl.program_id(0).to(tl.int64)
    o_f = tl.program_id(1).to(tl.int64) * BLOCK + tl.arange(0, BLOCK).to(tl.int64)
    m_f = o_f < F
    b_i = tl.load(index_ptr + i_r)
    m_a = b_i < N_A
    # one of the two loads is fully masked: rows come from exactly one source
    b_row = tl.load(a_ptr + b_i * stride_a + o_f, mask=m_f & m_a, other=0)
    b_row += tl.load(b_ptr + (b_i - N_A) * stride_b + o_f, mask=m_f & (~m_a), other=0)
    tl.store(out_ptr + i_r * stride_o + o_f, b_row, mask=m_f)


def gather_rows_fwd(out: Tensor, src_a: Tensor, src_b: Tensor, index: Tensor) -> None:
    rows, row = out.shape[0], out[0].numel() if out.shape[0] else 0
    if rows == 0 or row == 0:
        return
    o, a, b = as_bits(out), as_bits(src_a), as_bits(src_b)
    grid = (rows, triton.cdiv(row, BLOCK))
    _gather_rows_kernel[grid](
        o, a, b, index, src_a.shape[0], row, o.stride(0), a.stride(0), b.stride(0), BLOCK=BLOCK, num_warps=NUM_WARPS
    )


def compile_specs() -> list[KernelSpec]:
    return [
        KernelSpec(
            name=f"gather_rows[{width * 8}-bit]",
            fn=_gather_rows_kernel,
            signature={
                "out_ptr": ptr,
                "a_ptr": ptr,
                "b_ptr": ptr,
                "index_ptr": "*i64",
                "N_A": "i64",
                "F": "i32",
                "stride_o": "i64",
                "stride_a": "i64",
                "stride_b": "i64",
                "BLOCK": "constexpr",
            },
            constexprs={"BLOCK": BLOCK},
            num_warps=NUM_WARPS,
        )
        for width, ptr in BITS_TRITON.items()
    ]
