"""Triton backward of M+ memory attention (issue 12): FlashAttention-2 recompute from the saved LSE.

Same recurrence as ``backward.memory_attention_backward`` (read its docstring): ``P = exp(scale·q·kᵀ − lse)``,
``dV = Pᵀ·dO``, ``dS = P ∘ (dO·Vᵀ − Δ + dlse)`` with ``Δ = rowsum(dO ∘ O)``, ``dQ = scale·dS·K``, ``dK = scale·dSᵀ·Q``;
no ``[Tq, M + Tk]`` matrix is ever materialised. Three kernels, in the forward's conventions (``triton_impl``):

``_attn_bwd_preprocess_kernel`` — per query row (b, t, h): ``Δ' = Δ − dlse`` and ``lse₂ = lse·log2(e)`` (``+inf``
  where ``lse = −inf``, so that ``exp2(s − lse₂) = 0``: a row that saw no key gets no gradient), both ``[B, Hq, Tq]``
  fp32. With them ``dS = P ∘ (dP − Δ')``.
``_attn_bwd_dkdv_kernel`` — grid ``(key blocks, B·Hkv)``: a program owns ``BLOCK_N`` keys of one (batch, KV head) and
  loops over the *packed* query rows ``r = t·G + g`` of its group (GQA: the sum over the query heads sharing a key
  head is the sum over packed rows, no atomics, no ``repeat_kv``). ``IS_MEM`` picks the key range: memory keys
  (always visible; stored before RoPE, rotated in the kernel from the ``[P, D/2]`` tables, and the gradient rotated
  back: ``dk1 = dk1'·cos + dk2'·sin``, ``dk2 = dk2'·cos − dk1'·sin``) or chunk keys (visible iff
  ``kv_start[b] ≤ j < kv_len[b]`` and, causal, ``j ≤ t + kv_len[b] − Tq``; the row loop starts at the first query
  that can see the block; keys outside the valid range are never read and get a zero gradient).
``_attn_bwd_dq_kernel`` — grid ``(row blocks, B·Hkv)``: a program owns ``BLOCK_M`` packed rows and runs the
  forward's two key loops (memory, then the valid chunk keys up to the last row's causal limit), accumulating dQ.

Queries and keys are handled as their two RoPE halves, as in the forward, so ``q·k'ᵀ = q1·k1'ᵀ + q2·k2'ᵀ`` and the
gradients of the halves need no concatenation. Accumulation is fp32; ``P`` and ``dS`` are rounded to the input dtype
for the tensor-core products (fp32 inputs: ``input_precision="ieee"``). The per-row ranges and ``mem_pos`` are
clamped in the kernels, as in the forward, so no value ever indexes out of bounds. bf16 under the interpreter goes
through the forward's ``UPCAST`` path.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from ..compile_check import KernelSpec
from .triton_impl import _TRITON_DTYPE, HEAD_DIMS, LOG2E, AttnConfig, _aligned, _signature, _upcast

PRE_BLOCK_R = 16  # rows (b, t, h) per program of the preprocess kernel (32 at D = 128: 168 registers)
PRE_NUM_WARPS = 4


BwdConfig = AttnConfig  # one launch configuration of the dK/dV kernel (block_m: packed query rows per step,
# block_n: keys per program) or of the dQ kernel (block_m: rows per program, block_n: keys per step)


# By (kernel, head_dim, fp32?). The dK/dV program keeps its K/V tile (and, for memory keys, the rotation tables) and
# three fp32 accumulators (dk1, dk2 [BLOCK_N, D/2], dv [BLOCK_N, D]) live across the row loop; the dQ program keeps
# q, dO and dq. Registers on sm_80 (triton 3.6, bf16, memory-key variant) decided the tiles: dK/dV at D = 64 with
# 32×64 tiles reaches 255 (32×32: 235), at D = 128 32×64 with 8 warps spills 288 bytes (32×32, 8 warps: 189); dQ at
# D = 128 64×32 spills (32×32, 8 warps: 179). fp32 inputs use the FMA path (no TF32): small tiles, no pipelining
# (dK/dV 16×32 with 4 warps spills 4 bytes on sm_80; 8 warps: 80 registers).
# `python -m mplus_kernels.compile_check` compiles every entry for both targets and fails on spills.
_CONFIGS: dict[tuple[str, int, bool], BwdConfig] = {
    ("dkdv", 64, False): BwdConfig(32, 32, 4, 2),
    ("dkdv", 128, False): BwdConfig(32, 32, 8, 2),
    ("dkdv", 64, True): BwdConfig(16, 32, 8, 1),
    ("dkdv", 128, True): BwdConfig(16, 16, 8, 1),
    ("dq", 64, False): BwdConfig(64, 32, 4, 2),
    ("dq", 128, False): BwdConfig(32, 32, 8, 2),
    ("dq", 64, True): BwdConfig(32, 16, 4, 1),
    ("dq", 128, True): BwdConfig(32, 16, 8, 1),
}


def select_config(kernel: str, head_dim: int, dtype: torch.dtype) -> BwdConfig:
    if head_dim not in HEAD_DIMS:
        raise ValueError(f"the triton attention backward supports head_dim in {HEAD_DIMS}, got {head_dim}")
    return _CONFIGS[(kernel, head_dim, dtype == torch.float32)]


@triton.jit
def _attn_bwd_preprocess_kernel(
    o_ptr,  # [B, Tq, Hq, D]
    do_ptr,  # [B, Tq, Hq, D]
    lse_ptr,  # [B, Hq, Tq] fp32
    dlse_ptr,  # [B, Hq, Tq] (read only when has_dlse)
    delta_ptr,  # [B, Hq, Tq] fp32, contiguous: Δ − dlse
    lse2_ptr,  # [B, Hq, Tq] fp32, contiguous: lse·log2(e), +inf where lse = -inf
    has_dlse,
    B,
    Tq,
    Hq,
    stride_ob, stride_ot, stride_oh,
    stride_dob, stride_dot, stride_doh,
    stride_lb, stride_lh, stride_lt,
    stride_dlb, stride_dlh, stride_dlt,
    HEAD_DIM: tl.constexpr,
    BLOCK_R: tl.constexpr,
):  # fmt: skip
    # row (b, h, t), t fastest (the layout of the outputs); B·Hq·Tq < 2^31 (launcher): int32 index math
    o_r = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    m_r = o_r < B * Hq * Tq
    o_b = (o_r // (Hq * Tq)).to(tl.int64)
    o_h = ((o_r // Tq) % Hq).to(tl.int64)
    o_t = (o_r % Tq).to(tl.int64)
    o_d = tl.arange(0, HEAD_DIM)
    p_o = o_ptr + (o_b * stride_ob + o_t * stride_ot + o_h * stride_oh)[:, None] + o_d[None, :]
    p_do = do_ptr + (o_b * stride_dob + o_t * stride_dot + o_h * stride_doh)[:, None] + o_d[None, :]
    b_o = tl.load(p_o, mask=m_r[:, None], other=0.0).to(tl.float32)
    b_do = tl.load(p_do, mask=m_r[:, None], other=0.0).to(tl.float32)
    b_delta = tl.sum(b_o * b_do, 1)
    b_dl = tl.load(dlse_ptr + o_b * stride_dlb + o_h * stride_dlh + o_t * stride_dlt, mask=m_r & (has_dlse != 0),
                   other=0.0).to(tl.float32)  # fmt: skip
    b_lse = tl.load(lse_ptr + o_b * stride_lb + o_h * stride_lh + o_t * stride_lt, mask=m_r, other=float("-inf"))
    b_lse2 = tl.where(b_lse == float("-inf"), float("inf"), b_lse * 1.4426950408889634)
    tl.store(delta_ptr + o_r, b_delta - b_dl, mask=m_r)
    tl.store(lse2_ptr + o_r, b_lse2, mask=m_r)


@triton.jit
def _attn_bwd_dkdv_kernel(
    q_ptr,  # [B, Tq, Hq, D]
    do_ptr,  # [B, Tq, Hq, D]
    k_ptr,  # [B, N, Hkv, D] the key range of this launch: memory keys (before RoPE) or chunk keys (rotated)
    v_ptr,  # [B, N, Hkv, D]
    dk_ptr,  # [B, N, Hkv, D], contiguous
    dv_ptr,  # [B, N, Hkv, D], contiguous
    delta_ptr,  # [B, Hq, Tq] fp32, contiguous (Δ − dlse)
    lse2_ptr,  # [B, Hq, Tq] fp32, contiguous
    pos_ptr,  # [N] int32 table rows of the memory keys (IS_MEM; stride_pos 0: the single identity row)
    cos_ptr,  # [P, D/2] fp32, contiguous
    sin_ptr,  # [P, D/2] fp32, contiguous
    kv_len_ptr,  # [B] int32 (chunk, when has_kv_len; else N)
    kv_start_ptr,  # [B] int32 (chunk, when has_kv_start; else 0)
    has_kv_len,
    has_kv_start,
    Tq,
    N,  # keys in this range (M or Tk)
    P,
    HQ,
    HKV,
    G,
    causal_off,  # -Tq when causal, else 0 (chunk key j visible to query t iff j <= t + kv_len + causal_off)
    sm_scale,
    qk_scale,  # sm_scale · log2(e)
    stride_qb, stride_qt, stride_qh,
    stride_dob, stride_dot, stride_doh,
    stride_kb, stride_kt, stride_kh,
    stride_vb, stride_vt, stride_vh,
    stride_pos,
    HEAD_DIM: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    IS_MEM: tl.constexpr,
    UPCAST: tl.constexpr,
):  # fmt: skip
    # alignment contract of the forward (launcher: _aligned): every [rows, D] tile starts 16-byte aligned
    HALF: tl.constexpr = HEAD_DIM // 2
    i_n = tl.program_id(0)
    i_bh = tl.program_id(1)
    i_b = (i_bh // HKV).to(tl.int64)
    i_h = (i_bh % HKV).to(tl.int64)
    num_rows = Tq * G
    o_n = i_n * BLOCK_N + tl.arange(0, BLOCK_N)
    o_n64 = o_n.to(tl.int64)
    o_dh = tl.arange(0, HALF)
    o_d = tl.arange(0, HEAD_DIM)
    o_ml = tl.arange(0, BLOCK_M)

    if IS_MEM:
        m_n = o_n < N
        causal_shift = N  # memory: every row sees every key (the row loop below starts at 0)
        row_lo = 0
        row_hi = num_rows
    else:
        # the row's valid keys [c_start, c_end), clamped to [0, N] (never an out-of-bounds row, whatever the values)
        c_end = tl.load(kv_len_ptr + i_b, mask=has_kv_len != 0, other=N)
        c_end = tl.minimum(tl.maximum(c_end, 0), N)
        c_start = tl.load(kv_start_ptr + i_b, mask=has_kv_start != 0, other=0)
        c_start = tl.minimum(tl.maximum(c_start, 0), c_end)
        m_n = (o_n >= c_start) & (o_n < c_end)
        causal_shift = c_end + causal_off
        # the first query that sees this block's first key; no row at all when the block holds no valid key
        t_first = tl.maximum(i_n * BLOCK_N - causal_shift, 0)
        row_lo = (t_first * G) // BLOCK_M * BLOCK_M
        row_hi = tl.where((i_n * BLOCK_N < c_end) & (i_n * BLOCK_N + BLOCK_N > c_start), num_rows, 0)

    p_k = k_ptr + i_b * stride_kb + i_h * stride_kh + o_n64[:, None] * stride_kt + o_dh[None, :]
    p_v = v_ptr + i_b * stride_vb + i_h * stride_vh + o_n64[:, None] * stride_vt + o_d[None, :]
    b_k1 = tl.load(tl.multiple_of(p_k, [16, 16]), mask=m_n[:, None], other=0.0)
    b_k2 = tl.load(tl.multiple_of(p_k + HALF, [16, 16]), mask=m_n[:, None], other=0.0)
    b_v = tl.load(tl.multiple_of(p_v, [16, 16]), mask=m_n[:, None], other=0.0)
    if UPCAST:
        b_k1 = b_k1.to(tl.float32)
        b_k2 = b_k2.to(tl.float32)
        b_v = b_v.to(tl.float32)
    if IS_MEM:  # rotate: k1' = k1·cos − k2·sin, k2' = k2·cos + k1·sin (fp32, rounded once, as the forward)
        b_pos = tl.load(pos_ptr + o_n64 * stride_pos, mask=m_n, other=0)
        b_pos = tl.minimum(tl.maximum(b_pos, 0), P - 1).to(tl.int64)
        p_cs = b_pos[:, None] * HALF + o_dh[None, :]
        b_cos = tl.load(tl.multiple_of(cos_ptr + p_cs, [16, 16]), mask=m_n[:, None], other=0.0)
        b_sin = tl.load(tl.multiple_of(sin_ptr + p_cs, [16, 16]), mask=m_n[:, None], other=0.0)
        b_k1f = b_k1.to(tl.float32)
        b_k2f = b_k2.to(tl.float32)
        b_k1 = (b_k1f * b_cos - b_k2f * b_sin).to(b_v.dtype)
        b_k2 = (b_k2f * b_cos + b_k1f * b_sin).to(b_v.dtype)

    b_dk1 = tl.zeros([BLOCK_N, HALF], dtype=tl.float32)
    b_dk2 = tl.zeros([BLOCK_N, HALF], dtype=tl.float32)
    b_dv = tl.zeros([BLOCK_N, HEAD_DIM], dtype=tl.float32)
    p_qb = q_ptr + i_b * stride_qb
    p_dob = do_ptr + i_b * stride_dob
    for start in range(row_lo, row_hi, BLOCK_M):
        o_r = start + o_ml  # packed row r = t * G + g
        m_r = o_r < num_rows
        o_t = o_r // G
        o_t64 = o_t.to(tl.int64)
        o_hq = i_h * G + (o_r % G).to(tl.int64)
        p_q = p_qb + o_t64[:, None] * stride_qt + o_hq[:, None] * stride_qh + o_dh[None, :]
        b_q1 = tl.load(tl.multiple_of(p_q, [16, 16]), mask=m_r[:, None], other=0.0)
        b_q2 = tl.load(tl.multiple_of(p_q + HALF, [16, 16]), mask=m_r[:, None], other=0.0)
        p_do = p_dob + o_t64[:, None] * stride_dot + o_hq[:, None] * stride_doh + o_d[None, :]
        b_do = tl.load(tl.multiple_of(p_do, [16, 16]), mask=m_r[:, None], other=0.0)
        if UPCAST:
            b_q1 = b_q1.to(tl.float32)
            b_q2 = b_q2.to(tl.float32)
            b_do = b_do.to(tl.float32)
        o_stat = (i_b * HQ + o_hq) * Tq + o_t64
        b_lse2 = tl.load(lse2_ptr + o_stat, mask=m_r, other=float("inf"))
        b_delta = tl.load(delta_ptr + o_stat, mask=m_r, other=0.0)
        # [BLOCK_M, D/2] @ [D/2, BLOCK_N] -> [BLOCK_M, BLOCK_N], twice (the two RoPE halves)
        b_s = tl.dot(b_q1, tl.trans(b_k1), input_precision="ieee")
        b_s = tl.dot(b_q2, tl.trans(b_k2), acc=b_s, input_precision="ieee")
        m_vis = m_r[:, None] & m_n[None, :] & (o_n[None, :] <= o_t[:, None] + causal_shift)
        b_p = tl.where(m_vis, tl.exp2(b_s * qk_scale - b_lse2[:, None]), 0.0)
        # [BLOCK_N, BLOCK_M] @ [BLOCK_M, D] -> [BLOCK_N, D]
        b_dv = tl.dot(tl.trans(b_p.to(b_do.dtype)), b_do, acc=b_dv, input_precision="ieee")
        # [BLOCK_M, D] @ [D, BLOCK_N] -> [BLOCK_M, BLOCK_N]
        b_dp = tl.dot(b_do, tl.trans(b_v), input_precision="ieee")
        b_ds = (b_p * (b_dp - b_delta[:, None])).to(b_q1.dtype)
        # [BLOCK_N, BLOCK_M] @ [BLOCK_M, D/2] -> [BLOCK_N, D/2], twice
        b_dk1 = tl.dot(tl.trans(b_ds), b_q1, acc=b_dk1, input_precision="ieee")
        b_dk2 = tl.dot(tl.trans(b_ds), b_q2, acc=b_dk2, input_precision="ieee")

    b_dk1 = b_dk1 * sm_scale
    b_dk2 = b_dk2 * sm_scale
    if IS_MEM:  # back through the rotation: dk1 = dk1'·cos + dk2'·sin, dk2 = dk2'·cos − dk1'·sin
        b_t1 = b_dk1 * b_cos + b_dk2 * b_sin
        b_dk2 = b_dk2 * b_cos - b_dk1 * b_sin
        b_dk1 = b_t1
    # keys outside the valid range: zero (their accumulators never saw a visible row)
    o_out = ((i_b * N + o_n64) * HKV + i_h)[:, None] * HEAD_DIM
    m_out = (o_n < N)[:, None]
    p_dk = dk_ptr + o_out + o_dh[None, :]
    tl.store(tl.multiple_of(p_dk, [16, 16]), b_dk1.to(dk_ptr.dtype.element_ty), mask=m_out)
    tl.store(tl.multiple_of(p_dk + HALF, [16, 16]), b_dk2.to(dk_ptr.dtype.element_ty), mask=m_out)
    tl.store(tl.multiple_of(dv_ptr + o_out + o_d[None, :], [16, 16]), b_dv.to(dv_ptr.dtype.element_ty), mask=m_out)


@triton.jit
def _attn_bwd_dq_kernel(
    q_ptr,  # [B, Tq, Hq, D]
    do_ptr,  # [B, Tq, Hq, D]
    k_ptr,  # [B, Tk, Hkv, D] chunk keys, rotated
    v_ptr,  # [B, Tk, Hkv, D]
    mk_ptr,  # [B, M, Hkv, D] memory keys, before RoPE
    mv_ptr,  # [B, M, Hkv, D]
    dq_ptr,  # [B, Tq, Hq, D], contiguous
    delta_ptr,  # [B, Hq, Tq] fp32, contiguous (Δ − dlse)
    lse2_ptr,  # [B, Hq, Tq] fp32, contiguous
    pos_ptr,  # [M] int32
    cos_ptr,  # [P, D/2] fp32, contiguous
    sin_ptr,  # [P, D/2] fp32, contiguous
    kv_len_ptr,
    kv_start_ptr,
    has_kv_len,
    has_kv_start,
    Tq,
    Tk,
    M,
    P,
    HQ,
    HKV,
    G,
    causal_off,
    sm_scale,
    qk_scale,
    stride_qb, stride_qt, stride_qh,
    stride_dob, stride_dot, stride_doh,
    stride_kb, stride_kt, stride_kh,
    stride_vb, stride_vt, stride_vh,
    stride_mkb, stride_mkt, stride_mkh,
    stride_mvb, stride_mvt, stride_mvh,
    stride_pos,
    HEAD_DIM: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    UPCAST: tl.constexpr,
):  # fmt: skip
    HALF: tl.constexpr = HEAD_DIM // 2
    i_m = tl.program_id(0)
    i_bh = tl.program_id(1)
    i_b = (i_bh // HKV).to(tl.int64)
    i_h = (i_bh % HKV).to(tl.int64)
    num_rows = Tq * G
    o_r = i_m * BLOCK_M + tl.arange(0, BLOCK_M)  # packed row r = t * G + g
    m_r = o_r < num_rows
    o_t = o_r // G
    o_t64 = o_t.to(tl.int64)
    o_hq = i_h * G + (o_r % G).to(tl.int64)
    o_dh = tl.arange(0, HALF)
    o_d = tl.arange(0, HEAD_DIM)
    o_nl = tl.arange(0, BLOCK_N)

    p_q = q_ptr + i_b * stride_qb + o_t64[:, None] * stride_qt + o_hq[:, None] * stride_qh + o_dh[None, :]
    b_q1 = tl.load(tl.multiple_of(p_q, [16, 16]), mask=m_r[:, None], other=0.0)
    b_q2 = tl.load(tl.multiple_of(p_q + HALF, [16, 16]), mask=m_r[:, None], other=0.0)
    p_do = do_ptr + i_b * stride_dob + o_t64[:, None] * stride_dot + o_hq[:, None] * stride_doh + o_d[None, :]
    b_do = tl.load(tl.multiple_of(p_do, [16, 16]), mask=m_r[:, None], other=0.0)
    if UPCAST:
        b_q1 = b_q1.to(tl.float32)
        b_q2 = b_q2.to(tl.float32)
        b_do = b_do.to(tl.float32)
    o_stat = (i_b * HQ + o_hq) * Tq + o_t64
    b_lse2 = tl.load(lse2_ptr + o_stat, mask=m_r, other=float("inf"))
    b_delta = tl.load(delta_ptr + o_stat, mask=m_r, other=0.0)
    b_dq1 = tl.zeros([BLOCK_M, HALF], dtype=tl.float32)
    b_dq2 = tl.zeros([BLOCK_M, HALF], dtype=tl.float32)

    # ---- memory: every query sees every row; keys rotated here by their position ----
    p_mk = mk_ptr + i_b * stride_mkb + i_h * stride_mkh
    p_mv = mv_ptr + i_b * stride_mvb + i_h * stride_mvh
    for start in range(0, M, BLOCK_N):
        o_n = start + o_nl
        m_n = o_n < M
        o_n64 = o_n.to(tl.int64)
        b_pos = tl.load(pos_ptr + o_n64 * stride_pos, mask=m_n, other=0)
        b_pos = tl.minimum(tl.maximum(b_pos, 0), P - 1).to(tl.int64)
        p_cs = b_pos[:, None] * HALF + o_dh[None, :]
        b_cos = tl.load(tl.multiple_of(cos_ptr + p_cs, [16, 16]), mask=m_n[:, None], other=0.0)
        b_sin = tl.load(tl.multiple_of(sin_ptr + p_cs, [16, 16]), mask=m_n[:, None], other=0.0)
        p_k = p_mk + o_n64[:, None] * stride_mkt + o_dh[None, :]
        b_k1 = tl.load(tl.multiple_of(p_k, [16, 16]), mask=m_n[:, None], other=0.0).to(tl.float32)
        b_k2 = tl.load(tl.multiple_of(p_k + HALF, [16, 16]), mask=m_n[:, None], other=0.0).to(tl.float32)
        b_k1r = (b_k1 * b_cos - b_k2 * b_sin).to(b_q1.dtype)
        b_k2r = (b_k2 * b_cos + b_k1 * b_sin).to(b_q1.dtype)
        p_v = p_mv + o_n64[:, None] * stride_mvt + o_d[None, :]
        b_v = tl.load(tl.multiple_of(p_v, [16, 16]), mask=m_n[:, None], other=0.0)
        if UPCAST:
            b_v = b_v.to(tl.float32)
        # [BLOCK_M, D/2] @ [D/2, BLOCK_N] -> [BLOCK_M, BLOCK_N], twice
        b_s = tl.dot(b_q1, tl.trans(b_k1r), input_precision="ieee")
        b_s = tl.dot(b_q2, tl.trans(b_k2r), acc=b_s, input_precision="ieee")
        b_p = tl.where(m_n[None, :], tl.exp2(b_s * qk_scale - b_lse2[:, None]), 0.0)
        # [BLOCK_M, D] @ [D, BLOCK_N] -> [BLOCK_M, BLOCK_N]
        b_dp = tl.dot(b_do, tl.trans(b_v), input_precision="ieee")
        b_ds = (b_p * (b_dp - b_delta[:, None])).to(b_q1.dtype)
        # [BLOCK_M, BLOCK_N] @ [BLOCK_N, D/2] -> [BLOCK_M, D/2], twice
        b_dq1 = tl.dot(b_ds, b_k1r, acc=b_dq1, input_precision="ieee")
        b_dq2 = tl.dot(b_ds, b_k2r, acc=b_dq2, input_precision="ieee")

    # ---- chunk: keys [c_start, c_end), bottom-right causal; stop at the last row's limit ----
    c_end = tl.load(kv_len_ptr + i_b, mask=has_kv_len != 0, other=Tk)
    c_end = tl.minimum(tl.maximum(c_end, 0), Tk)
    c_start = tl.load(kv_start_ptr + i_b, mask=has_kv_start != 0, other=0)
    c_start = tl.minimum(tl.maximum(c_start, 0), c_end)
    causal_shift = c_end + causal_off
    t_last = (tl.minimum(i_m * BLOCK_M + BLOCK_M, num_rows) - 1) // G
    c_hi = tl.minimum(c_end, t_last + causal_shift + 1)
    p_ck = k_ptr + i_b * stride_kb + i_h * stride_kh
    p_cv = v_ptr + i_b * stride_vb + i_h * stride_vh
    for start in range(c_start, c_hi, BLOCK_N):
        o_j = start + o_nl
        m_j = o_j < c_hi
        o_j64 = o_j.to(tl.int64)
        p_k = p_ck + o_j64[:, None] * stride_kt + o_dh[None, :]
        b_k1 = tl.load(tl.multiple_of(p_k, [16, 16]), mask=m_j[:, None], other=0.0)
        b_k2 = tl.load(tl.multiple_of(p_k + HALF, [16, 16]), mask=m_j[:, None], other=0.0)
        p_v = p_cv + o_j64[:, None] * stride_vt + o_d[None, :]
        b_v = tl.load(tl.multiple_of(p_v, [16, 16]), mask=m_j[:, None], other=0.0)
        if UPCAST:
            b_k1 = b_k1.to(tl.float32)
            b_k2 = b_k2.to(tl.float32)
            b_v = b_v.to(tl.float32)
        # [BLOCK_M, D/2] @ [D/2, BLOCK_N] -> [BLOCK_M, BLOCK_N], twice
        b_s = tl.dot(b_q1, tl.trans(b_k1), input_precision="ieee")
        b_s = tl.dot(b_q2, tl.trans(b_k2), acc=b_s, input_precision="ieee")
        m_vis = m_j[None, :] & (o_j[None, :] <= o_t[:, None] + causal_shift)
        b_p = tl.where(m_vis, tl.exp2(b_s * qk_scale - b_lse2[:, None]), 0.0)
        # [BLOCK_M, D] @ [D, BLOCK_N] -> [BLOCK_M, BLOCK_N]
        b_dp = tl.dot(b_do, tl.trans(b_v), input_precision="ieee")
        b_ds = (b_p * (b_dp - b_delta[:, None])).to(b_q1.dtype)
        # [BLOCK_M, BLOCK_N] @ [BLOCK_N, D/2] -> [BLOCK_M, D/2], twice
        b_dq1 = tl.dot(b_ds, b_k1, acc=b_dq1, input_precision="ieee")
        b_dq2 = tl.dot(b_ds, b_k2, acc=b_dq2, input_precision="ieee")

    p_dq = dq_ptr + ((i_b * Tq + o_t64) * HQ + o_hq)[:, None] * HEAD_DIM + o_dh[None, :]
    tl.store(tl.multiple_of(p_dq, [16, 16]), (b_dq1 * sm_scale).to(dq_ptr.dtype.element_ty), mask=m_r[:, None])
    tl.store(tl.multiple_of(p_dq + HALF, [16, 16]), (b_dq2 * sm_scale).to(dq_ptr.dtype.element_ty),
             mask=m_r[:, None])  # fmt: skip


# --------------------------------------------------------------------------------------------------------------------
# Launcher (inputs as the forward's: validated by op.py)
# --------------------------------------------------------------------------------------------------------------------
_empty = torch.empty  # gradient allocator; tests swap in a NaN-filling one to catch elements a kernel never writes


def memory_attention_bwd(
    grad_out: Tensor | None,
    grad_lse: Tensor | None,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    mem_k: Tensor | None,
    mem_v: Tensor | None,
    mem_pos: Tensor | None,
    rope_cos: Tensor | None,
    rope_sin: Tensor | None,
    out: Tensor,
    lse: Tensor,
    scale: float,
    causal: bool,
    kv_len: Tensor | None,
    kv_start: Tensor | None,
    *,
    config: BwdConfig | None = None,
) -> tuple[Tensor, Tensor, Tensor, Tensor | None, Tensor | None]:
    """Gradients ``(dq, dk, dv, dmem_k, dmem_v)`` of ``memory_attention``, each in its input's dtype (None for an
    absent memory), from ``grad_out [B, Tq, Hq, D]`` and ``grad_lse [B, Hq, Tq]`` (either may be None: zero) and the
    forward's ``out [B, Tq, Hq, D]`` and ``lse [B, Hq, Tq]``. Same contract as ``backward.memory_attention_backward``.

    ``kv_len`` / ``kv_start`` (``[B]`` int32, on q's device) are read by the kernels only. ``config`` forces one launch
    configuration on both the dK/dV and the dQ kernel (tests: many blocks through tiny shapes).
    """
    b, tq, hq, d = q.shape
    tk, hkv = k.shape[1], k.shape[2]
    group = hq // hkv
    dev = q.device
    m = 0 if mem_k is None else mem_k.shape[1]
    dq = _empty((b, tq, hq, d), dtype=q.dtype, device=dev)
    dk = _empty((b, tk, hkv, d), dtype=k.dtype, device=dev)
    dv = _empty((b, tk, hkv, d), dtype=v.dtype, device=dev)
    dmem_k = None if mem_k is None else _empty(mem_k.shape, dtype=mem_k.dtype, device=dev)
    dmem_v = None if mem_v is None else _empty(mem_v.shape, dtype=mem_v.dtype, device=dev)
    if b * hkv == 0 or tq == 0:  # no query: every gradient is zero
        return tuple(None if t is None else t.zero_() for t in (dq, dk, dv, dmem_k, dmem_v))  # type: ignore[return-value]
    if b * tq * hq >= 2**31:
        raise ValueError(f"memory_attention backward: B·Tq·Hq = {b * tq * hq} rows; the kernels index rows with int32")
    if grad_out is None:
        grad_out = torch.zeros_like(q)
    q, k, v, do, out = _aligned(q), _aligned(k), _aligned(v), _aligned(grad_out), _aligned(out)

    # ---- Δ − dlse and lse·log2(e) per query row ----
    delta = torch.empty((b, hq, tq), dtype=torch.float32, device=dev)
    lse2 = torch.empty((b, hq, tq), dtype=torch.float32, device=dev)
    dl = lse if grad_lse is None else grad_lse.float()  # any [B, Hq, Tq] tensor: not read without grad_lse
    _attn_bwd_preprocess_kernel[(triton.cdiv(b * hq * tq, PRE_BLOCK_R),)](
        out, do, lse, dl, delta, lse2, int(grad_lse is not None), b, tq, hq,
        out.stride(0), out.stride(1), out.stride(2),
        do.stride(0), do.stride(1), do.stride(2),
        lse.stride(0), lse.stride(1), lse.stride(2),
        dl.stride(0), dl.stride(1), dl.stride(2),
        HEAD_DIM=d, BLOCK_R=PRE_BLOCK_R, num_warps=PRE_NUM_WARPS, num_stages=1,
    )  # fmt: skip

    if m > 0:
        mem_k, mem_v = _aligned(mem_k), _aligned(mem_v)
    else:
        mem_k, mem_v = k, v  # never read (the memory loop of the dQ kernel is empty)
    if m > 0 and mem_pos is not None:
        pos, num_pos = mem_pos.to(torch.int32), rope_cos.shape[0]
        stride_pos = pos.stride(0)
        cos, sin = _aligned(rope_cos.float().contiguous()), _aligned(rope_sin.float().contiguous())
    else:  # no rotation: every row reads table row 0 = (cos 1, sin 0), the identity, exactly
        pos, num_pos, stride_pos = torch.zeros(1, dtype=torch.int32, device=dev), 1, 0
        cos = torch.ones((1, d // 2), dtype=torch.float32, device=dev)
        sin = torch.zeros((1, d // 2), dtype=torch.float32, device=dev)
    has_kv_len, has_kv_start = int(kv_len is not None), int(kv_start is not None)
    kv_len = pos if kv_len is None else kv_len.contiguous()
    kv_start = pos if kv_start is None else kv_start.contiguous()
    causal_off = -tq if causal else 0
    upcast = _upcast(q.dtype)

    # ---- dK, dV: memory keys, then chunk keys ----
    cfg = config or select_config("dkdv", d, q.dtype)
    for keys, values, dkeys, dvalues, n, is_mem in ((mem_k, mem_v, dmem_k, dmem_v, m, True),
                                                    (k, v, dk, dv, tk, False)):  # fmt: skip
        if n == 0:
            continue
        _attn_bwd_dkdv_kernel[(triton.cdiv(n, cfg.block_n), b * hkv)](
            q, do, keys, values, dkeys, dvalues, delta, lse2, pos, cos, sin, kv_len, kv_start, has_kv_len,
            has_kv_start, tq, n, num_pos, hq, hkv, group, causal_off, scale, scale * LOG2E,
            q.stride(0), q.stride(1), q.stride(2),
            do.stride(0), do.stride(1), do.stride(2),
            keys.stride(0), keys.stride(1), keys.stride(2),
            values.stride(0), values.stride(1), values.stride(2),
            stride_pos,
            HEAD_DIM=d, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, IS_MEM=is_mem, UPCAST=upcast,
            num_warps=cfg.num_warps, num_stages=cfg.num_stages,
        )  # fmt: skip

    # ---- dQ ----
    cfg = config or select_config("dq", d, q.dtype)
    _attn_bwd_dq_kernel[(triton.cdiv(tq * group, cfg.block_m), b * hkv)](
        q, do, k, v, mem_k, mem_v, dq, delta, lse2, pos, cos, sin, kv_len, kv_start, has_kv_len, has_kv_start,
        tq, tk, m, num_pos, hq, hkv, group, causal_off, scale, scale * LOG2E,
        q.stride(0), q.stride(1), q.stride(2),
        do.stride(0), do.stride(1), do.stride(2),
        k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2),
        mem_k.stride(0), mem_k.stride(1), mem_k.stride(2),
        mem_v.stride(0), mem_v.stride(1), mem_v.stride(2),
        stride_pos,
        HEAD_DIM=d, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, UPCAST=upcast,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )  # fmt: skip
    return dq, dk, dv, dmem_k, dmem_v


# --------------------------------------------------------------------------------------------------------------------
# Ahead-of-time compile check
# --------------------------------------------------------------------------------------------------------------------
def compile_specs() -> list[KernelSpec]:
    """Every launch configuration ``memory_attention_bwd`` can use, for ``python -m mplus_kernels.compile_check``."""
    specs = []
    for ty in _TRITON_DTYPE.values():
        for d in HEAD_DIMS:
            constexprs = {"HEAD_DIM": d, "BLOCK_R": PRE_BLOCK_R}
            signature = _signature(
                _attn_bwd_preprocess_kernel, constexprs, o_ptr=f"*{ty}", do_ptr=f"*{ty}", lse_ptr="*fp32",
                dlse_ptr="*fp32", delta_ptr="*fp32", lse2_ptr="*fp32",
            )  # fmt: skip
            specs.append(KernelSpec(f"mem_attn_bwd_preprocess[D{d},{ty}]", _attn_bwd_preprocess_kernel, signature,
                                    constexprs, num_warps=PRE_NUM_WARPS, num_stages=1))  # fmt: skip
    for (kernel, d, is_fp32), cfg in _CONFIGS.items():
        for ty in ("fp32",) if is_fp32 else ("bf16", "fp16"):
            common = {"HEAD_DIM": d, "BLOCK_M": cfg.block_m, "BLOCK_N": cfg.block_n, "UPCAST": False}
            ptrs = dict(delta_ptr="*fp32", lse2_ptr="*fp32", pos_ptr="*i32", cos_ptr="*fp32", sin_ptr="*fp32",
                        kv_len_ptr="*i32", kv_start_ptr="*i32", sm_scale="fp32", qk_scale="fp32")  # fmt: skip
            if kernel == "dkdv":
                fn = _attn_bwd_dkdv_kernel
                tensors = ("q_ptr", "do_ptr", "k_ptr", "v_ptr", "dk_ptr", "dv_ptr")
                variants = [(f"mem_attn_bwd_dkdv[{r},D{d},{ty}]", common | {"IS_MEM": r == "mem"}) for r in
                            ("mem", "chunk")]  # fmt: skip
            else:
                fn = _attn_bwd_dq_kernel
                tensors = ("q_ptr", "do_ptr", "k_ptr", "v_ptr", "mk_ptr", "mv_ptr", "dq_ptr")
                variants = [(f"mem_attn_bwd_dq[D{d},{ty}]", common)]
            for name, constexprs in variants:
                signature = _signature(fn, constexprs, **{t: f"*{ty}" for t in tensors}, **ptrs)
                specs.append(KernelSpec(name, fn, signature, constexprs, num_warps=cfg.num_warps,
                                        num_stages=cfg.num_stages))  # fmt: skip
    return specs


__all__ = ["BwdConfig", "compile_specs", "memory_attention_bwd", "select_config"]
