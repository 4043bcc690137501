"""Triton kernels of the random-drop memory update (GPU; CPU through ``TRITON_INTERPRET=1``).

Two launches per update:
1. ``_memory_update_rows_kernel``, once per slot tensor: ``dropped[l, i] <- slot[l, vslot[l, i]]`` then
   ``slot[l, vslot[l, i]] <- new[l, i]``. Rows are moved as raw bits (int8/16/32/64 of the element width), so one
   kernel serves every dtype and the interpreter never does bf16 arithmetic.
2. ``_memory_update_renumber_kernel``: each slot finds its rank among the sorted victims by binary search and takes
   its new logical position (survivor: ``p - rank``; victim: ``N - K + rank``); ``order`` is scattered from it.
   Fully parallel: no sequential sweep, O(N log K) integer work.
The victims' slots (``order`` gathered at the victims) are read before launch 2 rewrites ``order``.
"""

from __future__ import annotations

import triton
import triton.language as tl
from torch import Tensor

from .._utils import BITS_TRITON, as_bits
from ..compile_check import KernelSpec

ROWS_BLOCK = 1024
RENUMBER_BLOCK = 1024
NUM_WARPS = 4



@triton.jit
def _memory_update_rows_kernel(
    slot_ptr,
    new_ptr,
    out_ptr,
    vslot_ptr,  # [L, K] int32, slot of the i-th victim
    K,
    F,  # elements per row
    stride_sl,
    stride_sn,
    stride_nl,
    stride_nk,
    stride_ol,
    stride_ok,
    BLOCK: tl.constexpr,
):
    i_l = tl.program_id(0).to(tl.int64)
    i_b = tl.program_id(1).to(tl.int64)
    o_e = i_b * BLOCK + tl.arange(0, BLOCK).to(tl.int64)  # flat element index over the layer's K rows
    m_e = o_e < K * F
    o_k = o_e // F
    o_f = o_e % F
    b_slot = tl.load(vslot_ptr + i_l * K + o_k, mask=m_e, other=0).to(tl.int64)
    p_slot = slot_ptr + i_l * stride_sl + b_slot * stride_sn + o_f
    b_old = tl.load(p_slot, mask=m_e)
    tl.store(out_ptr + i_l * stride_ol + o_k * stride_ok + o_f, b_old, mask=m_e)
    b_new = tl.load(new_ptr + i_l * stride_nl + o_k * stride_nk + o_f, mask=m_e)
    tl.store(p_slot, b_new, mask=m_e)


@triton.jit
def _memory_update_renumber_kernel(
    pos_ptr,  # [L, N] int32, contiguous
    order_ptr,  # [L, N] int32, contiguous
    victims_ptr,  # [L, K] int64, ascending per layer, contiguous
    N,
    K,
    NUM_STEPS,  # ceil(log2(K + 1)) binary-search steps
    BLOCK: tl.constexpr,
):
    i_l = tl.program_id(0).to(tl.int64)
    o_s = tl.program_id(1).to(tl.int64) * BLOCK + tl.arange(0, BLOCK).to(tl.int64)
    m_s = o_s < N
    b_p = tl.load(pos_ptr + i_l * N + o_s, mask=m_s, other=0).to(tl.int64)
    # rank = number of victims < p (lower bound in the sorted victim list)
    b_lo = tl.zeros([BLOCK], dtype=tl.int64)
    b_hi = tl.zeros([BLOCK], dtype=tl.int64) + K
    for _ in range(NUM_STEPS):
        m_active = b_lo < b_hi
        b_mid = (b_lo + b_hi) // 2
        b_v = tl.load(victims_ptr + i_l * K + b_mid, mask=m_s & m_active, other=0)
        m_right = b_v < b_p
        b_lo = tl.where(m_active & m_right, b_mid + 1, b_lo)
        b_hi = tl.where(m_active & (~m_right), b_mid, b_hi)
    b_at = tl.load(victims_ptr + i_l * K + b_lo, mask=m_s & (b_lo < K), other=-1)
    m_victim = b_at == b_p
    b_new = tl.where(m_victim, N - K + b_lo, b_p - b_lo)
    tl.store(pos_ptr + i_l * N + o_s, b_new.to(tl.int32), mask=m_s)
    tl.store(order_ptr + i_l * N + b_new, o_s.to(tl.int32), mask=m_s)


def memory_update_fwd(
    pos: Tensor, order: Tensor, victims: Tensor, slots: list[Tensor], new_rows: list[Tensor], dropped: list[Tensor]
) -> None:
    """Launch the update on validated inputs (see ``op.memory_update_`` for the contract)."""
    num_layers, n = pos.shape
    k = victims.shape[1]
    if num_layers == 0 or k == 0:
        return
    vslot = order.gather(1, victims).contiguous()  # read before the renumber launch rewrites `order`
    for slot, fresh, out in zip(slots, new_rows, dropped):
        row = slot[0, 0].numel()
        if row == 0:
            continue
        s, f, o = as_bits(slot), as_bits(fresh), as_bits(out)
        grid = (num_layers, triton.cdiv(k * row, ROWS_BLOCK))
        _memory_update_rows_kernel[grid](
            s,
            f,
            o,
            vslot,
            k,
            row,
            s.stride(0),
            s.stride(1),
            f.stride(0),
            f.stride(1),
            o.stride(0),
            o.stride(1),
            BLOCK=ROWS_BLOCK,
            num_warps=NUM_WARPS,
        )
    steps = max(1, int(k).bit_length())
    grid = (num_layers, triton.cdiv(n, RENUMBER_BLOCK))
    _memory_update_renumber_kernel[grid](pos, order, victims, n, k, steps, BLOCK=RENUMBER_BLOCK, num_warps=NUM_WARPS)


def compile_specs() -> list[KernelSpec]:
    """Every launch configuration :func:`memory_update_fwd` can use, for the ahead-of-time compile check."""
    specs = []
    for width, ptr in BITS_TRITON.items():
        specs.append(
            KernelSpec(
                name=f"memory_update_rows[{width * 8}-bit]",
                fn=_memory_update_rows_kernel,
                signature={
                    "slot_ptr": ptr,
                    "new_ptr": ptr,
                    "out_ptr": ptr,
                    "vslot_ptr": "*i32",
                    "K": "i32",
                    "F": "i32",
                    "stride_sl": "i64",
                    "stride_sn": "i64",
                    "stride_nl": "i64",
                    "stride_nk": "i64",
                    "stride_ol": "i64",
                    "stride_ok": "i64",
                    "BLOCK": "constexpr",
                },
                constexprs={"BLOCK": ROWS_BLOCK},
                num_warps=NUM_WARPS,
            )
        )
    specs.append(
        KernelSpec(
            name="memory_update_renumber",
            fn=_memory_update_renumber_kernel,
            signature={
                "pos_ptr": "*i32",
                "order_ptr": "*i32",
                "victims_ptr": "*i64",
                "N": "i32",
                "K": "i32",
                "NUM_STEPS": "i32",
                "BLOCK": "constexpr",
            },
            constexprs={"BLOCK": RENUMBER_BLOCK},
            num_warps=NUM_WARPS,
        )
    )
    return specs
