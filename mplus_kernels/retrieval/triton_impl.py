"""Triton kernels of retriever scoring + top-K (GPU; CPU through ``TRITON_INTERPRET=1``).

Scores, one launch per key range (``keys``, then ``keys2`` writing after S1):
``_retrieve_scores_kernel`` gives each program BLOCK_S keys and loops over all queries inside the program, BLOCK_T
at a time: ``tl.dot`` of ``[BLOCK_T, ds] × [ds, BLOCK_S]`` (ds in BLOCK_D slices, fp32 accumulation), sigmoid, masked
column sums in fp32 — so the ``[T, S]`` matrix never exists and every key's sum is taken in the same order (no
atomics: deterministic). fp32 inputs use ``input_precision="ieee"`` (TF32 would cost ~1e-3 of accuracy).

Selection, all on the device, no host synchronisation (the output size ``min(k, S)`` is known from the shapes):
scores map to order-preserving int32 codes (the float order as unsigned integers); a radix select over four 8-bit
digits (``_radix_hist_kernel``: per-block ``tl.histogram`` + integer ``atomic_add``; ``_radix_find_kernel``: one
program picks the digit holding the k-th largest code) finds the threshold code ``tau`` and how many codes equal to
``tau`` to keep. Then ``_select_count_kernel`` counts per block the codes ``> tau`` and ``== tau``,
``_select_scan_kernel`` turns the counts into exclusive offsets, and ``_select_write_kernel`` writes each kept index
at its rank: the output comes out ascending by index, and among codes equal to ``tau`` the lowest indices win.

Under the interpreter bf16 ``tl.dot`` and bf16 math are wrong: ``UPCAST`` (set only when interpreting) converts the
loaded bf16 tiles to fp32 first.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from .. import _config
from ..compile_check import KernelSpec

# Score-kernel launch configurations (BLOCK_T, BLOCK_S, BLOCK_D, num_warps, num_stages) per (input dtype, aligned).
# Aligned: 16-byte aligned bases and row strides and ds % BLOCK_D == 0 (M+: ds = 256, contiguous keys), loads
# vectorise and pipeline through shared memory. Otherwise element-wise loads need smaller tiles to avoid spills.
SCORE_CONFIGS = {
    (torch.bfloat16, True): (64, 128, 64, 8, 3),
    (torch.float16, True): (64, 128, 64, 8, 3),
    (torch.float32, True): (64, 64, 16, 4, 2),
    (torch.bfloat16, False): (64, 64, 16, 4, 2),
    (torch.float16, False): (64, 64, 16, 4, 2),
    (torch.float32, False): (64, 64, 16, 8, 1),
}
SELECT_BLOCK = 1024  # elements per program in the selection kernels
SCAN_BLOCK = 1024  # blocks per step of the single-program scan
RADIX_BITS = 8
RADIX_SHIFTS = (24, 16, 8, 0)
NUM_WARPS = 4

_TRITON_DTYPE = {torch.bfloat16: "*bf16", torch.float16: "*fp16", torch.float32: "*fp32"}


@triton.jit
def _retrieve_scores_kernel(
    q_ptr,  # [T, DS], unit stride along DS
    k_ptr,  # [S, DS], unit stride along DS
    score_ptr,  # [S] fp32
    T,
    S,
    DS,
    stride_qt,
    stride_ks,
    BLOCK_T: tl.constexpr,
    BLOCK_S: tl.constexpr,
    BLOCK_D: tl.constexpr,
    UPCAST: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    ALIGNED: tl.constexpr,
):
    # Block bases in int64 (S·DS may exceed 2^31); offsets inside a tile in int32 (cheaper pointer tensors).
    i_s = tl.program_id(0)
    s0 = i_s.to(tl.int64) * BLOCK_S
    p_k_blk = k_ptr + s0 * stride_ks
    o_sl = tl.arange(0, BLOCK_S)
    m_s = s0 + o_sl < S
    o_tl = tl.arange(0, BLOCK_T)
    o_dl = tl.arange(0, BLOCK_D)
    b_sum = tl.zeros([BLOCK_S], dtype=tl.float32)
    p_q_blk = q_ptr  # queries t0 .. t0 + BLOCK_T, advanced as a pointer (64-bit) at the end of each step
    for t0 in range(0, T, BLOCK_T):
        m_t = t0 + o_tl < T
        b_acc = tl.zeros([BLOCK_T, BLOCK_S], dtype=tl.float32)
        for d0 in range(0, DS, BLOCK_D):
            p_q = p_q_blk + o_tl[:, None] * stride_qt + (d0 + o_dl)[None, :]
            p_k = p_k_blk + o_sl[None, :] * stride_ks + (d0 + o_dl)[:, None]
            if ALIGNED:
                # The launcher checked 16-byte aligned bases and rows and DS % BLOCK_D == 0: every contiguous run
                # of BLOCK_D elements starts 16-byte aligned, so loads vectorise (and pipeline through cp.async).
                p_q = tl.multiple_of(p_q, [1, 16])
                p_k = tl.multiple_of(p_k, [16, 1])
                b_q = tl.load(p_q, mask=m_t[:, None], other=0.0)
                b_k = tl.load(p_k, mask=m_s[None, :], other=0.0)
            else:
                m_d = d0 + o_dl < DS
                b_q = tl.load(p_q, mask=m_t[:, None] & m_d[None, :], other=0.0)
                b_k = tl.load(p_k, mask=m_d[:, None] & m_s[None, :], other=0.0)
            if UPCAST:
                b_q = b_q.to(tl.float32)
                b_k = b_k.to(tl.float32)
            # [BLOCK_T, BLOCK_D] @ [BLOCK_D, BLOCK_S] -> [BLOCK_T, BLOCK_S]
            b_acc = tl.dot(b_q, b_k, b_acc, input_precision=DOT_PRECISION)
        b_sig = tl.where(m_t[:, None], tl.sigmoid(b_acc), 0.0)
        b_sum += tl.sum(b_sig, axis=0)
        p_q_blk += BLOCK_T * stride_qt
    tl.store(score_ptr + s0 + o_sl, b_sum / T, mask=m_s)


@triton.jit
def _order_code(b_score):
    """fp32 -> int32 whose bits, read as unsigned, order like the floats (-0 < +0)."""
    b_i = b_score.to(tl.int32, bitcast=True)
    b_key = b_i ^ ((b_i >> 31) & 0x7FFFFFFF)  # signed order == float order
    return b_key ^ -2147483648  # flip the sign bit: unsigned order == float order


@triton.jit
def _radix_hist_kernel(
    score_ptr,  # [S] fp32
    S,
    state_ptr,  # [2] int32: code prefix found so far, codes still to take at or below it
    hist_ptr,  # [256] int32, zeroed, of this pass
    SHIFT: tl.constexpr,
    BLOCK: tl.constexpr,
):
    o_s = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK).to(tl.int64)
    m_s = o_s < S
    b_code = _order_code(tl.load(score_ptr + o_s, mask=m_s, other=0.0))
    if SHIFT < 24:  # only codes whose higher digits equal the prefix found so far
        b_prefix = tl.load(state_ptr)
        m_s = m_s & ((b_code >> (SHIFT + 8)) == (b_prefix >> (SHIFT + 8)))
    b_digit = (b_code >> SHIFT) & 0xFF
    b_hist = tl.histogram(b_digit, 256, mask=m_s)
    tl.atomic_add(hist_ptr + tl.arange(0, 256), b_hist)


@triton.jit
def _radix_find_kernel(hist_ptr, state_ptr, SHIFT: tl.constexpr):
    """The digit holding the k-th largest code: the largest d with count(digit >= d) >= remaining."""
    o_d = tl.arange(0, 256)
    b_hist = tl.load(hist_ptr + o_d)
    b_prefix = tl.load(state_ptr)
    b_remaining = tl.load(state_ptr + 1)
    b_at_or_above = tl.cumsum(b_hist, 0, reverse=True)
    b_digit = tl.sum((b_at_or_above >= b_remaining).to(tl.int32), 0) - 1
    b_above = tl.sum(tl.where(o_d > b_digit, b_hist, 0), 0)
    tl.store(state_ptr, b_prefix | (b_digit << SHIFT))
    tl.store(state_ptr + 1, b_remaining - b_above)


@triton.jit
def _select_count_kernel(score_ptr, S, state_ptr, count_ptr, BLOCK: tl.constexpr):
    """count[2i] = codes > tau, count[2i + 1] = codes == tau, in block i."""
    i_b = tl.program_id(0)
    o_s = i_b.to(tl.int64) * BLOCK + tl.arange(0, BLOCK).to(tl.int64)
    m_s = o_s < S
    b_key = _order_code(tl.load(score_ptr + o_s, mask=m_s, other=0.0)) ^ -2147483648  # signed-comparable
    b_tau = tl.load(state_ptr) ^ -2147483648
    tl.store(count_ptr + 2 * i_b, tl.sum((m_s & (b_key > b_tau)).to(tl.int32), 0))
    tl.store(count_ptr + 2 * i_b + 1, tl.sum((m_s & (b_key == b_tau)).to(tl.int32), 0))


@triton.jit
def _select_scan_kernel(count_ptr, NUM_BLOCKS, BLOCK: tl.constexpr):
    """Exclusive prefix sums of the per-block counts, in place, in one program."""
    b_carry_gt = tl.zeros([], dtype=tl.int32)
    b_carry_eq = tl.zeros([], dtype=tl.int32)
    for i0 in range(0, NUM_BLOCKS, BLOCK):
        o_b = i0 + tl.arange(0, BLOCK)
        m_b = o_b < NUM_BLOCKS
        b_gt = tl.load(count_ptr + 2 * o_b, mask=m_b, other=0)
        b_eq = tl.load(count_ptr + 2 * o_b + 1, mask=m_b, other=0)
        tl.store(count_ptr + 2 * o_b, b_carry_gt + tl.cumsum(b_gt, 0) - b_gt, mask=m_b)
        tl.store(count_ptr + 2 * o_b + 1, b_carry_eq + tl.cumsum(b_eq, 0) - b_eq, mask=m_b)
        b_carry_gt += tl.sum(b_gt, 0)
        b_carry_eq += tl.sum(b_eq, 0)


@triton.jit
def _select_write_kernel(score_ptr, S, state_ptr, offset_ptr, idx_ptr, out_score_ptr, BLOCK: tl.constexpr):
    """Write every kept index at its rank among the kept ones (= its output position: ascending by index)."""
    i_b = tl.program_id(0)
    o_s = i_b.to(tl.int64) * BLOCK + tl.arange(0, BLOCK).to(tl.int64)
    m_s = o_s < S
    b_score = tl.load(score_ptr + o_s, mask=m_s, other=0.0)
    b_key = _order_code(b_score) ^ -2147483648
    b_tau = tl.load(state_ptr) ^ -2147483648
    b_take_equal = tl.load(state_ptr + 1)
    m_gt = m_s & (b_key > b_tau)
    m_eq = m_s & (b_key == b_tau)
    b_gt = m_gt.to(tl.int32)
    b_eq = m_eq.to(tl.int32)
    b_gt_before = tl.load(offset_ptr + 2 * i_b) + tl.cumsum(b_gt, 0) - b_gt
    b_eq_before = tl.load(offset_ptr + 2 * i_b + 1) + tl.cumsum(b_eq, 0) - b_eq
    m_take = m_gt | (m_eq & (b_eq_before < b_take_equal))
    b_pos = b_gt_before + tl.minimum(b_eq_before, b_take_equal)
    tl.store(idx_ptr + b_pos, o_s, mask=m_take)
    tl.store(out_score_ptr + b_pos, b_score, mask=m_take)


def _aligned(t: Tensor) -> bool:
    return t.data_ptr() % 16 == 0 and (t.stride(0) * t.element_size()) % 16 == 0


def _launch_scores(queries: Tensor, keys: Tensor, out: Tensor) -> None:
    block_d_aligned = SCORE_CONFIGS[(queries.dtype, True)][2]
    aligned = queries.shape[1] % block_d_aligned == 0 and _aligned(queries) and _aligned(keys)
    block_t, block_s, block_d, num_warps, num_stages = SCORE_CONFIGS[(queries.dtype, aligned)]
    upcast = _config.triton_interpret() and queries.dtype == torch.bfloat16
    precision = "ieee" if (queries.dtype == torch.float32 or upcast) else "tf32"
    t, ds = queries.shape
    s = keys.shape[0]
    grid = (triton.cdiv(s, block_s),)
    _retrieve_scores_kernel[grid](
        queries,
        keys,
        out,
        t,
        s,
        ds,
        queries.stride(0),
        keys.stride(0),
        BLOCK_T=block_t,
        BLOCK_S=block_s,
        BLOCK_D=block_d,
        UPCAST=upcast,
        DOT_PRECISION=precision,
        ALIGNED=aligned,
        num_warps=num_warps,
        num_stages=num_stages,
    )


def retrieve_topk_fwd(queries: Tensor, keys: Tensor, keys2: Tensor | None, k: int) -> tuple[Tensor, Tensor]:
    """Scores + selection on validated inputs (see ``op.retrieve_topk`` for the contract)."""
    device = queries.device
    s1 = keys.shape[0]
    total = s1 + (keys2.shape[0] if keys2 is not None else 0)
    k0 = min(k, total)
    indices = torch.empty(k0, dtype=torch.int64, device=device)
    top_scores = torch.empty(k0, dtype=torch.float32, device=device)
    if k0 == 0:
        return indices, top_scores
    scores = torch.empty(total, dtype=torch.float32, device=device)
    if s1 > 0:
        _launch_scores(queries, keys, scores[:s1])
    if total > s1:
        _launch_scores(queries, keys2, scores[s1:])

    # state = [prefix code, codes still to take]; after the four passes: [tau, how many codes == tau to take]
    state = torch.tensor([0, k0], dtype=torch.int32, device=device)
    hist = torch.zeros(len(RADIX_SHIFTS), 1 << RADIX_BITS, dtype=torch.int32, device=device)
    num_blocks = triton.cdiv(total, SELECT_BLOCK)
    for i, shift in enumerate(RADIX_SHIFTS):
        _radix_hist_kernel[(num_blocks,)](
            scores, total, state, hist[i], SHIFT=shift, BLOCK=SELECT_BLOCK, num_warps=NUM_WARPS
        )
        _radix_find_kernel[(1,)](hist[i], state, SHIFT=shift, num_warps=NUM_WARPS)
    counts = torch.empty(num_blocks, 2, dtype=torch.int32, device=device)
    _select_count_kernel[(num_blocks,)](scores, total, state, counts, BLOCK=SELECT_BLOCK, num_warps=NUM_WARPS)
    _select_scan_kernel[(1,)](counts, num_blocks, BLOCK=SCAN_BLOCK, num_warps=NUM_WARPS)
    _select_write_kernel[(num_blocks,)](
        scores, total, state, counts, indices, top_scores, BLOCK=SELECT_BLOCK, num_warps=NUM_WARPS
    )
    return indices, top_scores


def compile_specs() -> list[KernelSpec]:
    """Every launch configuration :func:`retrieve_topk_fwd` can use, for the ahead-of-time compile check."""
    specs = []
    for (dtype, aligned), (block_t, block_s, block_d, num_warps, num_stages) in SCORE_CONFIGS.items():
        ptr = _TRITON_DTYPE[dtype]
        specs.append(
            KernelSpec(
                name=f"retrieve_scores[{ptr[1:]},{'aligned' if aligned else 'generic'}]",
                fn=_retrieve_scores_kernel,
                signature={
                    "q_ptr": ptr,
                    "k_ptr": ptr,
                    "score_ptr": "*fp32",
                    "T": "i32",
                    "S": "i32",
                    "DS": "i32",
                    "stride_qt": "i32",
                    "stride_ks": "i32",
                    "BLOCK_T": "constexpr",
                    "BLOCK_S": "constexpr",
                    "BLOCK_D": "constexpr",
                    "UPCAST": "constexpr",
                    "DOT_PRECISION": "constexpr",
                    "ALIGNED": "constexpr",
                },
                constexprs={
                    "BLOCK_T": block_t,
                    "BLOCK_S": block_s,
                    "BLOCK_D": block_d,
                    "UPCAST": False,
                    "DOT_PRECISION": "ieee" if dtype == torch.float32 else "tf32",
                    "ALIGNED": aligned,
                },
                num_warps=num_warps,
                num_stages=num_stages,
            )
        )
    for shift in RADIX_SHIFTS:
        specs.append(
            KernelSpec(
                name=f"retrieve_radix_hist[shift={shift}]",
                fn=_radix_hist_kernel,
                signature={
                    "score_ptr": "*fp32",
                    "S": "i32",
                    "state_ptr": "*i32",
                    "hist_ptr": "*i32",
                    "SHIFT": "constexpr",
                    "BLOCK": "constexpr",
                },
                constexprs={"SHIFT": shift, "BLOCK": SELECT_BLOCK},
                num_warps=NUM_WARPS,
            )
        )
        specs.append(
            KernelSpec(
                name=f"retrieve_radix_find[shift={shift}]",
                fn=_radix_find_kernel,
                signature={"hist_ptr": "*i32", "state_ptr": "*i32", "SHIFT": "constexpr"},
                constexprs={"SHIFT": shift},
                num_warps=NUM_WARPS,
            )
        )
    specs.append(
        KernelSpec(
            name="retrieve_select_count",
            fn=_select_count_kernel,
            signature={
                "score_ptr": "*fp32",
                "S": "i32",
                "state_ptr": "*i32",
                "count_ptr": "*i32",
                "BLOCK": "constexpr",
            },
            constexprs={"BLOCK": SELECT_BLOCK},
            num_warps=NUM_WARPS,
        )
    )
    specs.append(
        KernelSpec(
            name="retrieve_select_scan",
            fn=_select_scan_kernel,
            signature={"count_ptr": "*i32", "NUM_BLOCKS": "i32", "BLOCK": "constexpr"},
            constexprs={"BLOCK": SCAN_BLOCK},
            num_warps=NUM_WARPS,
        )
    )
    specs.append(
        KernelSpec(
            name="retrieve_select_write",
            fn=_select_write_kernel,
            signature={
                "score_ptr": "*fp32",
                "S": "i32",
                "state_ptr": "*i32",
                "offset_ptr": "*i32",
                "idx_ptr": "*i64",
                "out_score_ptr": "*fp32",
                "BLOCK": "constexpr",
            },
            constexprs={"BLOCK": SELECT_BLOCK},
            num_warps=NUM_WARPS,
        )
    )
    return specs
