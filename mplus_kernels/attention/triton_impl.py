"""Triton kernels of M+ memory attention (GPU; CPU through ``TRITON_INTERPRET=1``).

One attention kernel serves prefill and decode, plus two small merge kernels:

``_memory_attention_fwd_kernel`` — FlashAttention-2 forward over the keys ``[memory ; chunk]``:
* **GQA packing.** A program owns one (batch, KV head) and a block of ``BLOCK_M`` *packed rows*; packed row
  ``r = t * G + g`` is query token ``t`` of query head ``h * G + g`` (``G = Hq / Hkv``). Every K/V tile is loaded once
  for the whole group, no ``repeat_kv``; a decode step (Tq = 1, G = 4) fills 4 rows of a 16-row tile instead of 1.
* **RoPE in the kernel.** Memory keys are stored before RoPE. Each memory tile is loaded as its two halves
  ``k1, k2 [BLOCK_N, D/2]``, the table rows ``cos/sin[mem_pos[n]] [BLOCK_N, D/2]`` (fp32) are gathered, and
  ``k1' = k1·cos − k2·sin``, ``k2' = k2·cos + k1·sin`` (Llama's ``rotate_half``) are formed in fp32 and rounded once to
  the input dtype. Queries are kept as halves too, so ``q·k'ᵀ = q1·k1'ᵀ + q2·k2'ᵀ`` needs no concatenation. Chunk
  keys (already rotated) go through the same two-half product.
* **Two key loops, no mask tensor.** The memory loop has only a key-bound mask. The chunk loop covers the batch row's
  valid keys ``[kv_start[b], kv_len[b])`` (loaded in the kernel; default ``[0, Tk)``) and is bottom-right causal
  aligned to the row's end (query t sees chunk key j iff ``j <= t + kv_len[b] − Tq``): it starts at ``kv_start[b]``
  and stops at the last row's limit, so blocks that no row of the tile can see are never loaded, and cache rows
  outside the valid range are never read. The per-row values (and ``mem_pos``) are clamped to the tensors' extents
  in the kernel, so even unchecked device values never index out of bounds.
* **Online softmax in fp32**, scores in log2 units (``exp2``), rows that see no key end with ``out = 0``,
  ``lse = −inf``. The natural-log LSE is written next to the output.
* **Split-KV.** Each batch row's key index space ``[0, M + kv_len[b] − kv_start[b])`` (memory, then the valid chunk
  keys) is cut into ranges of ``split_len`` keys (a multiple of ``BLOCK_N``), planned on the host from the shapes
  (``M + Tk``, the most a row can have) so that nothing in the launch depends on the values; grid axis 2 picks the
  range, and ranges past a row's keys are empty (partial lse −inf). (Cutting each row's own keys evenly would need
  the loaded values live across the memory loop, which spills the sm_90a decode tiles.) With one split the kernel
  writes the final output; with more it writes fp32 partials ``[S, B, Tq, Hq, D]`` / ``[S, B, Hq, Tq]`` that
  ``_combine_splits_kernel`` merges exactly. Used when (batch × KV heads × row blocks) would leave SMs idle and there
  are enough keys (``plan_splits``): every decode step over the M+ memory.
* **A memory shared by the batch** (an expand, batch stride 0: how the model serves one memory state to a batch) is
  read once: the launcher runs the memory keys for all B·Tq queries as the tokens of one row (their G·B·Tq packed
  rows fill the tensor-core tiles a single decode step leaves mostly empty), each row's chunk keys in a second
  launch, and merges the fp32 partials of both with the split combine.

``tl.dot`` takes 16-bit tiles on tensor cores with fp32 accumulation. fp32 inputs use ``input_precision="ieee"``
(no TF32), so fp32 results match the fp32 reference to fp32 rounding; that path is for checking, not speed.

Interpreter caveat: the Triton interpreter gets bf16 ``tl.dot`` and bf16 arithmetic wrong, so the kernels take an
``UPCAST`` constexpr that converts bf16 tiles to fp32 right after loading. It is set only under the interpreter;
compiled kernels never upcast.
"""

from __future__ import annotations

import dataclasses

import torch
import triton
import triton.language as tl
from torch import Tensor

from .. import _config
from ..compile_check import KernelSpec

LOG2E = 1.4426950408889634

HEAD_DIMS = (64, 128)  # head dims the attention kernel is compiled for (see compile_specs)
COMBINE_BLOCK_R = 16  # rows per program of the split-KV combine kernel (x HEAD_DIM columns)
MERGE_BLOCK_R = 16  # rows per program of merge_attention_states
MERGE_BLOCK_D = 32  # head-dim chunk of merge_attention_states (any D works)
MERGE_NUM_WARPS = 4
MERGE_NUM_STAGES = 1  # streaming loops over D chunks / splits: nothing worth pipelining
MIN_SPLIT_KEYS = 256  # fewer keys per split than this is not worth a partial write + merge
MAX_SPLITS = 64
DEFAULT_NUM_SMS = 132  # H100 SXM; A100 has 108. Only used when no CUDA device can be queried.

_TRITON_DTYPE = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32"}


@dataclasses.dataclass(frozen=True)
class AttnConfig:
    """One launch configuration of ``_memory_attention_fwd_kernel``."""

    block_m: int  # packed (token, head-in-group) rows per program
    block_n: int  # keys per inner-loop step
    num_warps: int
    num_stages: int


# Launch configurations for A100 (sm_80: 164 KiB smem, 64K regs/SM) and H100 (sm_90a: 227 KiB), by (mode, head_dim,
# fp32?). "decode": <= 16 packed rows per KV head (one token, G <= 16); "small": <= 64 rows (a few tokens: speculative
# decoding, short chunks); "prefill": more. The in-kernel RoPE of the memory keys keeps four fp32 [BLOCK_N, D/2] tiles
# (k1, k2, cos, sin) live, so the tiles are smaller than a plain FlashAttention kernel's at D = 128: 128×32 and 128×64
# tiles compile at 248-255 registers on sm_80, 64×64 with 8 warps at ~170 (chosen: no spill risk, same occupancy).
# fp32 inputs use the FMA path (no TF32); pipelining their fp32 tiles costs too many registers: num_stages=1.
# `python -m mplus_kernels.compile_check` compiles every entry for both targets and fails on spills.
_CONFIGS: dict[tuple[str, int, bool], AttnConfig] = {
    ("decode", 64, False): AttnConfig(16, 128, 4, 3),
    ("decode", 128, False): AttnConfig(16, 64, 4, 3),
    ("decode", 64, True): AttnConfig(16, 32, 4, 1),
    ("decode", 128, True): AttnConfig(16, 32, 4, 1),
    ("small", 64, False): AttnConfig(64, 64, 4, 3),
    ("small", 128, False): AttnConfig(32, 32, 4, 2),
    ("small", 64, True): AttnConfig(32, 32, 4, 1),  # 8 warps spill 4 bytes under triton 3.6 (64-register cap)
    ("small", 128, True): AttnConfig(32, 32, 8, 1),
    ("prefill", 64, False): AttnConfig(128, 64, 8, 3),
    ("prefill", 128, False): AttnConfig(64, 64, 8, 2),
    ("prefill", 64, True): AttnConfig(32, 32, 4, 1),  # likewise
    ("prefill", 128, True): AttnConfig(32, 32, 8, 1),
}


def _mode(rows: int) -> str:
    return "decode" if rows <= 16 else "small" if rows <= 64 else "prefill"


def select_config(head_dim: int, dtype: torch.dtype, rows: int) -> AttnConfig:
    """The launch configuration for ``rows = Tq · (Hq / Hkv)`` packed query rows per KV head."""
    if head_dim not in HEAD_DIMS:
        raise ValueError(f"the triton attention kernel supports head_dim in {HEAD_DIMS}, got {head_dim}")
    return _CONFIGS[(_mode(rows), head_dim, dtype == torch.float32)]


def _num_sms(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return DEFAULT_NUM_SMS


def plan_splits(programs: int, num_keys: int, block_n: int, num_sms: int) -> tuple[int, int]:
    """``(num_splits, split_len)`` for ``programs`` (batch × KV heads × row blocks) over ``num_keys`` keys.

    One split when the programs already cover the SMs or there are few keys; otherwise enough splits to give
    about two programs per SM, each with at least ``MIN_SPLIT_KEYS`` keys. ``split_len`` is a multiple of ``block_n``.
    """
    if num_keys <= 0 or programs >= num_sms or num_keys < 2 * MIN_SPLIT_KEYS:
        splits = 1
    else:
        splits = min(triton.cdiv(2 * num_sms, programs), num_keys // MIN_SPLIT_KEYS, MAX_SPLITS)
    split_len = triton.cdiv(triton.cdiv(max(num_keys, 1), splits), block_n) * block_n
    return triton.cdiv(max(num_keys, 1), split_len), split_len


@triton.jit
def _online_softmax_step(b_s, b_v, b_m, b_l, b_acc):
    """One key block of the online softmax (log2 units): returns the new row max, denominator and accumulator.
    A row with nothing visible yet keeps m = -inf, l = 0, acc = 0."""
    b_m_new = tl.maximum(b_m, tl.max(b_s, 1))
    b_m_safe = tl.where(b_m_new == float("-inf"), 0.0, b_m_new)
    b_alpha = tl.exp2(b_m - b_m_safe)
    b_p = tl.exp2(b_s - b_m_safe[:, None])
    b_l = b_l * b_alpha + tl.sum(b_p, 1)
    # [BLOCK_M, BLOCK_N] @ [BLOCK_N, HEAD_DIM] -> [BLOCK_M, HEAD_DIM]
    b_acc = tl.dot(b_p.to(b_v.dtype), b_v, acc=b_acc * b_alpha[:, None], input_precision="ieee")
    return b_m_new, b_l, b_acc


@triton.jit
def _memory_attention_fwd_kernel(
    q_ptr,  # [B, Tq, Hq, D]
    k_ptr,  # [B, Tk, Hkv, D] chunk keys, rotated
    v_ptr,  # [B, Tk, Hkv, D]
    mk_ptr,  # [B, M, Hkv, D] memory keys, before RoPE
    mv_ptr,  # [B, M, Hkv, D]
    pos_ptr,  # [M] int32 rows of the tables (read with stride_pos; 0 = a single identity row)
    cos_ptr,  # [P, D/2] fp32, contiguous
    sin_ptr,  # [P, D/2] fp32, contiguous
    o_ptr,  # [S, B, Tq, Hq, D] (S = 1: the output itself, else fp32 partials)
    lse_ptr,  # [S, B, Hq, Tq] fp32, last dim contiguous
    kv_len_ptr,  # [B] int32 end of each row's valid chunk keys (read only when has_kv_len; else Tk)
    kv_start_ptr,  # [B] int32 first valid chunk key of each row (read only when has_kv_start; else 0)
    has_kv_len,
    has_kv_start,
    Tq,
    Tk,
    M,
    P,  # rows of the RoPE tables
    HKV,
    G,  # Hq // Hkv
    causal_off,  # -Tq when causal (chunk key j is visible to query t iff j <= t + kv_len - Tq), else 0
    split_len,  # positions of [memory ; valid chunk keys] per split, a multiple of BLOCK_N
    qk_scale,  # softmax_scale · log2(e)
    stride_qb, stride_qt, stride_qh,
    stride_kb, stride_kt, stride_kh,
    stride_vb, stride_vt, stride_vh,
    stride_mkb, stride_mkt, stride_mkh,
    stride_mvb, stride_mvt, stride_mvh,
    stride_pos,
    stride_os, stride_ob, stride_ot, stride_oh,
    stride_ls, stride_lb, stride_lh,
    HEAD_DIM: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    UPCAST: tl.constexpr,  # interpreter only: compute bf16 tiles in fp32
):  # fmt: skip
    # Alignment contract (the launcher guarantees it, copying inputs that break it): every tensor starts on a 16-byte
    # boundary and every row (a fixed (b, t, h)) starts 16-byte aligned, so `tl.multiple_of(p, [16, 16])` holds for
    # each [rows, D] pointer tile and the loads are vectorised (and pipelined with cp.async) as at run time.
    HALF: tl.constexpr = HEAD_DIM // 2
    i_m = tl.program_id(0)
    i_bh = tl.program_id(1)
    i_s = tl.program_id(2)
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
    if UPCAST:
        b_q1 = b_q1.to(tl.float32)
        b_q2 = b_q2.to(tl.float32)

    b_m = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    b_l = tl.zeros([BLOCK_M], dtype=tl.float32)
    b_acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)

    # this split's positions [lo, hi) of [memory (M keys) ; the row's valid chunk keys] (the end is cut below)
    lo = i_s * split_len
    hi = lo + split_len

    # ---- memory: every query sees every row; keys rotated here by their position ----
    p_mk = mk_ptr + i_b * stride_mkb + i_h * stride_mkh
    p_mv = mv_ptr + i_b * stride_mvb + i_h * stride_mvh
    mem_hi = tl.minimum(hi, M)
    for start in range(lo, mem_hi, BLOCK_N):
        o_n = start + o_nl
        m_n = o_n < mem_hi
        o_n64 = o_n.to(tl.int64)
        b_pos = tl.load(pos_ptr + o_n64 * stride_pos, mask=m_n, other=0)
        b_pos = tl.minimum(tl.maximum(b_pos, 0), P - 1).to(tl.int64)  # checked on the host where it can be
        p_cs = b_pos[:, None] * HALF + o_dh[None, :]  # [BLOCK_N, D/2] into the [P, D/2] tables
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
        # [BLOCK_M, D/2] @ [D/2, BLOCK_N] -> [BLOCK_M, BLOCK_N], twice (the two RoPE halves)
        b_s = tl.dot(b_q1, tl.trans(b_k1r), input_precision="ieee")
        b_s = tl.dot(b_q2, tl.trans(b_k2r), acc=b_s, input_precision="ieee")
        b_s = tl.where(m_n[None, :], b_s * qk_scale, float("-inf"))
        b_m, b_l, b_acc = _online_softmax_step(b_s, b_v, b_m, b_l, b_acc)

    # ---- chunk: keys [c_start, c_end), bottom-right causal aligned to c_end; split position p is key c_start + p - M;
    # stop at the last row's limit (later blocks are invisible to every row) ----
    # The row's range, loaded only now (kept live across the memory loop it spills the sm_90a decode tiles) and
    # clamped to [0, Tk]: never an out-of-bounds row, whatever the values.
    c_end = tl.load(kv_len_ptr + i_b, mask=has_kv_len != 0, other=Tk)
    c_end = tl.minimum(tl.maximum(c_end, 0), Tk)
    c_start = tl.load(kv_start_ptr + i_b, mask=has_kv_start != 0, other=0)
    c_start = tl.minimum(tl.maximum(c_start, 0), c_end)
    hi = tl.minimum(hi, M + c_end - c_start)
    p_ck = k_ptr + i_b * stride_kb + i_h * stride_kh
    p_cv = v_ptr + i_b * stride_vb + i_h * stride_vh
    causal_shift = c_end + causal_off  # chunk key j is visible to query t iff j <= t + causal_shift
    c_lo = c_start + tl.maximum(lo - M, 0)
    t_last = (tl.minimum(i_m * BLOCK_M + BLOCK_M, num_rows) - 1) // G
    c_hi = tl.minimum(c_start + hi - M, t_last + causal_shift + 1)
    for start in range(c_lo, c_hi, BLOCK_N):
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
        b_s = tl.where(m_vis, b_s * qk_scale, float("-inf"))
        b_m, b_l, b_acc = _online_softmax_step(b_s, b_v, b_m, b_l, b_acc)

    # ---- epilogue: normalise; rows that saw nothing get out 0, lse -inf ----
    m_seen = b_l > 0.0
    b_l_safe = tl.where(m_seen, b_l, 1.0)
    b_o = b_acc / b_l_safe[:, None]
    b_lse = tl.where(m_seen, (b_m + tl.log2(b_l_safe)) / 1.4426950408889634, float("-inf"))
    i_s64 = i_s.to(tl.int64)
    p_o = o_ptr + i_s64 * stride_os + i_b * stride_ob + o_t64[:, None] * stride_ot + o_hq[:, None] * stride_oh
    tl.store(tl.multiple_of(p_o + o_d[None, :], [16, 16]), b_o.to(o_ptr.dtype.element_ty), mask=m_r[:, None])
    p_lse = lse_ptr + i_s64 * stride_ls + i_b * stride_lb + o_hq * stride_lh + o_t64
    tl.store(p_lse, b_lse, mask=m_r)


@triton.jit
def _combine_splits_kernel(
    po_ptr,  # [S, B, Tq, Hq, D] fp32 partial outputs, contiguous (allocated by the launcher)
    pl_ptr,  # [S, B, Hq, Tq] fp32 partial LSEs, contiguous
    o_ptr,  # [B, Tq, Hq, D], contiguous (allocated by the launcher)
    lse_ptr,  # [B, Hq, Tq] fp32, contiguous
    S,
    B,
    Tq,
    Hq,
    HEAD_DIM: tl.constexpr,
    BLOCK_R: tl.constexpr,
):  # fmt: skip
    # row r = (b, t, h) of [B, Tq, Hq], h fastest; B·Tq·Hq < 2^31 (launcher), so the index math is int32 (a 64-bit
    # division is a slow subroutine on the GPU) and only the element offsets are int64
    o_r = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    num_rows = B * Tq * Hq  # rows per split
    m_r = o_r < num_rows
    o_b = o_r // (Tq * Hq)
    o_t = (o_r // Hq) % Tq
    o_h = o_r % Hq
    o_lse = (o_b * Hq + o_h) * Tq + o_t  # offset in one split's [B, Hq, Tq]
    o_r = o_r.to(tl.int64)
    split_stride = num_rows.to(tl.int64)  # elements per split of the LSE partials (x HEAD_DIM for the outputs)
    o_d = tl.arange(0, HEAD_DIM)
    b_max = tl.full([BLOCK_R], float("-inf"), dtype=tl.float32)
    for s in range(0, S):
        b_max = tl.maximum(b_max, tl.load(pl_ptr + s * split_stride + o_lse, mask=m_r, other=float("-inf")))
    b_max_safe = tl.where(b_max == float("-inf"), 0.0, b_max)  # no split saw a key: weights 0, out 0, lse -inf
    b_sum = tl.zeros([BLOCK_R], dtype=tl.float32)
    b_acc = tl.zeros([BLOCK_R, HEAD_DIM], dtype=tl.float32)
    for s in range(0, S):
        b_w = tl.exp(tl.load(pl_ptr + s * split_stride + o_lse, mask=m_r, other=float("-inf")) - b_max_safe)
        b_sum += b_w
        p_po = po_ptr + (s * split_stride + o_r)[:, None] * HEAD_DIM + o_d[None, :]
        b_acc += b_w[:, None] * tl.load(tl.multiple_of(p_po, [16, 16]), mask=m_r[:, None], other=0.0)
    m_seen = b_sum > 0.0
    b_sum_safe = tl.where(m_seen, b_sum, 1.0)
    tl.store(lse_ptr + o_lse, tl.where(m_seen, b_max_safe + tl.log(b_sum_safe), float("-inf")), mask=m_r)
    p_o = o_ptr + o_r[:, None] * HEAD_DIM + o_d[None, :]
    tl.store(tl.multiple_of(p_o, [16, 16]), (b_acc / b_sum_safe[:, None]).to(o_ptr.dtype.element_ty), mask=m_r[:, None])


@triton.jit
def _merge_attention_states_kernel(
    oa_ptr,  # [B, T, H, D], last dim contiguous
    la_ptr,  # [B, H, T] fp32
    ob_ptr,  # [B, T, H, D], last dim contiguous
    lb_ptr,  # [B, H, T] fp32
    o_ptr,  # [B, T, H, D], last dim contiguous
    lse_ptr,  # [B, H, T] fp32, contiguous
    B,
    T,
    H,
    D,
    stride_oab, stride_oat, stride_oah,
    stride_lab, stride_lah, stride_lat,
    stride_obb, stride_obt, stride_obh,
    stride_lbb, stride_lbh, stride_lbt,
    stride_ob, stride_ot, stride_oh,
    BLOCK_R: tl.constexpr,
    BLOCK_D: tl.constexpr,
):  # fmt: skip
    # row (b, t, h), h fastest; int32 index math (B·T·H < 2^31, checked by the launcher), int64 offsets
    o_r = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    m_r = o_r < B * T * H
    o_b = (o_r // (T * H)).to(tl.int64)
    o_t = ((o_r // H) % T).to(tl.int64)
    o_h = (o_r % H).to(tl.int64)
    b_la = tl.load(la_ptr + o_b * stride_lab + o_h * stride_lah + o_t * stride_lat, mask=m_r, other=float("-inf"))
    b_lb = tl.load(lb_ptr + o_b * stride_lbb + o_h * stride_lbh + o_t * stride_lbt, mask=m_r, other=float("-inf"))
    b_max = tl.maximum(b_la, b_lb)
    b_max_safe = tl.where(b_max == float("-inf"), 0.0, b_max)  # both empty: weights 0, out 0, lse -inf
    b_wa = tl.exp(b_la - b_max_safe)
    b_wb = tl.exp(b_lb - b_max_safe)
    b_sum = b_wa + b_wb
    m_seen = b_sum > 0.0
    b_sum_safe = tl.where(m_seen, b_sum, 1.0)
    tl.store(lse_ptr + (o_b * H + o_h) * T + o_t, tl.where(m_seen, b_max_safe + tl.log(b_sum_safe), b_max), mask=m_r)
    b_wa = b_wa / b_sum_safe
    b_wb = b_wb / b_sum_safe
    p_a = oa_ptr + o_b * stride_oab + o_t * stride_oat + o_h * stride_oah
    p_b = ob_ptr + o_b * stride_obb + o_t * stride_obt + o_h * stride_obh
    p_o = o_ptr + o_b * stride_ob + o_t * stride_ot + o_h * stride_oh
    for d0 in range(0, D, BLOCK_D):
        o_d = d0 + tl.arange(0, BLOCK_D)
        m_rd = m_r[:, None] & (o_d < D)[None, :]
        b_a = tl.load(p_a[:, None] + o_d[None, :], mask=m_rd, other=0.0).to(tl.float32)
        b_b = tl.load(p_b[:, None] + o_d[None, :], mask=m_rd, other=0.0).to(tl.float32)
        b_o = b_a * b_wa[:, None] + b_b * b_wb[:, None]
        tl.store(p_o[:, None] + o_d[None, :], b_o.to(o_ptr.dtype.element_ty), mask=m_rd)


# --------------------------------------------------------------------------------------------------------------------
# Launchers (inputs validated by op.py; last dims contiguous)
# --------------------------------------------------------------------------------------------------------------------
_empty = torch.empty  # output allocator; tests swap in a NaN-filling one to catch elements a kernel never writes


def _upcast(dtype: torch.dtype) -> bool:
    return dtype == torch.bfloat16 and _config.triton_interpret()


def _aligned(t: Tensor) -> Tensor:
    """``t`` itself when it meets the attention kernel's alignment contract, else an aligned contiguous copy.

    Contract (relied on by ``tl.multiple_of`` hints): unit stride on the last dim, a 16-byte aligned start, and every
    other stride (of a dim longer than 1) a multiple of 16 bytes. Contiguous tensors with D in HEAD_DIMS satisfy it.
    """
    size = t.element_size()
    if (
        t.stride(-1) == 1
        and t.data_ptr() % 16 == 0
        and all(st * size % 16 == 0 for st, n in zip(t.stride()[:-1], t.shape[:-1]) if n > 1)
    ):
        return t
    t = t.contiguous()
    return t if t.data_ptr() % 16 == 0 else t.clone()


def _unit_last(t: Tensor) -> Tensor:
    return t if t.stride(-1) == 1 or t.shape[-1] <= 1 else t.contiguous()


@dataclasses.dataclass
class _Table:
    """The RoPE of the memory keys as the kernel reads it: positions, their stride, the tables and their rows."""

    pos: Tensor
    stride_pos: int
    cos: Tensor
    sin: Tensor
    num_pos: int


def _rope_table(m: int, mem_pos, rope_cos, rope_sin, d: int, device) -> _Table:
    if m > 0 and mem_pos is not None:
        pos = mem_pos.to(torch.int32)
        cos = _aligned(rope_cos.float().contiguous())
        sin = _aligned(rope_sin.float().contiguous())
        return _Table(pos, pos.stride(0), cos, sin, rope_cos.shape[0])
    # no rotation: every row reads table row 0 = (cos 1, sin 0), the identity, exactly
    pos = torch.zeros(1, dtype=torch.int32, device=device)
    cos = torch.ones((1, d // 2), dtype=torch.float32, device=device)
    sin = torch.zeros((1, d // 2), dtype=torch.float32, device=device)
    return _Table(pos, 0, cos, sin, 1)


def _split_plan(programs: int, num_keys: int, cfg: AttnConfig, device, num_splits: int | None) -> tuple[int, int]:
    if num_splits is None:
        return plan_splits(programs, num_keys, cfg.block_n, _num_sms(device))
    split_len = triton.cdiv(triton.cdiv(max(num_keys, 1), num_splits), cfg.block_n) * cfg.block_n
    return triton.cdiv(max(num_keys, 1), split_len), split_len


def _launch(q, k, v, mem_k, mem_v, m, table: _Table, o_buf, l_buf, kv_len, kv_start, causal, softmax_scale,
            split_len, cfg: AttnConfig) -> None:  # fmt: skip
    """One ``_memory_attention_fwd_kernel`` launch writing ``o_buf [S, B, Tq, Hq, D]`` / ``l_buf [S, B, Hq, Tq]``
    (S = the splits of ``split_len`` keys: the final output when S is 1, else fp32 partials)."""
    b, tq, hq, d = q.shape
    tk, hkv = k.shape[1], k.shape[2]
    group = hq // hkv
    if m == 0:
        mem_k, mem_v = k, v  # never read (the memory loop is empty); any valid pointers do
    # absent per-row ranges: the kernel does not load them (masked loads), any int32 pointer will do
    has_kv_len, has_kv_start = int(kv_len is not None), int(kv_start is not None)
    kv_len = table.pos if kv_len is None else kv_len.contiguous()
    kv_start = table.pos if kv_start is None else kv_start.contiguous()
    grid = (triton.cdiv(tq * group, cfg.block_m), b * hkv, o_buf.shape[0])
    _memory_attention_fwd_kernel[grid](
        q, k, v, mem_k, mem_v, table.pos, table.cos, table.sin, o_buf, l_buf, kv_len, kv_start, has_kv_len,
        has_kv_start, tq, tk, m, table.num_pos, hkv, group, -tq if causal else 0, split_len, softmax_scale * LOG2E,
        q.stride(0), q.stride(1), q.stride(2),
        k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2),
        mem_k.stride(0), mem_k.stride(1), mem_k.stride(2),
        mem_v.stride(0), mem_v.stride(1), mem_v.stride(2),
        table.stride_pos,
        o_buf.stride(0), o_buf.stride(1), o_buf.stride(2), o_buf.stride(3),
        l_buf.stride(0), l_buf.stride(1), l_buf.stride(2),
        HEAD_DIM=d, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, UPCAST=_upcast(q.dtype),
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )  # fmt: skip


def _check_combine_rows(rows: int) -> None:
    if rows >= 2**31:
        raise ValueError(f"memory_attention: B·Tq·Hq = {rows} rows; the split-KV combine indexes rows with int32")


def _combine(o_buf: Tensor, l_buf: Tensor, out: Tensor, lse: Tensor) -> None:
    splits, b, tq, hq, d = o_buf.shape
    grid = (triton.cdiv(b * tq * hq, COMBINE_BLOCK_R),)
    _combine_splits_kernel[grid](
        o_buf, l_buf, out, lse, splits, b, tq, hq, HEAD_DIM=d, BLOCK_R=COMBINE_BLOCK_R,
        num_warps=MERGE_NUM_WARPS, num_stages=MERGE_NUM_STAGES,
    )  # fmt: skip


def shares_memory(q: Tensor, mem_k: Tensor | None, mem_v: Tensor | None) -> bool:
    """Whether the batch rows share one memory (an expand, batch stride 0: how the model serves a memory state to a
    batch), which the launcher then reads once for all of them."""
    return (
        q.shape[0] > 1
        and mem_k is not None
        and mem_v is not None
        and mem_k.shape[1] > 0
        and mem_k.stride(0) == 0
        and mem_v.stride(0) == 0
    )


def memory_attention_fwd(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    mem_k: Tensor | None,
    mem_v: Tensor | None,
    mem_pos: Tensor | None,
    rope_cos: Tensor | None,
    rope_sin: Tensor | None,
    softmax_scale: float,
    causal: bool,
    kv_len: Tensor | None = None,
    kv_start: Tensor | None = None,
    *,
    config: AttnConfig | None = None,
    num_splits: int | None = None,
) -> tuple[Tensor, Tensor]:
    """Launch memory attention on validated inputs (contract: ``op.memory_attention``).

    ``kv_len`` / ``kv_start`` (``[B]`` int32, on q's device) are read by the kernel, never here: nothing in the launch
    depends on their values, so a CUDA graph of a decode step over a static cache stays valid as they change.

    A memory the batch rows share (``shares_memory``) is read once: one launch over the memory keys for all B·Tq
    queries (the batch as the tokens of one row: its K/V tiles are loaded once for B·Tq·G packed rows), one over each
    row's chunk keys, and their fp32 partials merged exactly by the split combine. (Its bits may differ from those of
    a dense copy of the memory, which is split differently.)

    ``config`` and ``num_splits`` override the automatic choices (``select_config``, ``plan_splits``; with a shared
    memory, for each of the two launches); tests use them to drive many blocks and splits through tiny shapes.
    """
    b, tq, hq, d = q.shape
    tk, hkv = k.shape[1], k.shape[2]
    group = hq // hkv
    out = _empty((b, tq, hq, d), dtype=q.dtype, device=q.device)
    lse = _empty((b, hq, tq), dtype=torch.float32, device=q.device)
    if out.numel() == 0:
        return out, lse
    shared = shares_memory(q, mem_k, mem_v)
    q, k, v = _aligned(q), _aligned(k), _aligned(v)
    m = 0 if mem_k is None else mem_k.shape[1]
    if m > 0:  # a shared memory as its one copy ([1, M, Hkv, D]: aligning never materialises the expand)
        mem_k, mem_v = (_aligned(mem_k[:1]), _aligned(mem_v[:1])) if shared else (_aligned(mem_k), _aligned(mem_v))
    table = _rope_table(m, mem_pos, rope_cos, rope_sin, d, q.device)
    if shared:
        return _shared_memory_fwd(q, k, v, mem_k, mem_v, table, softmax_scale, causal, kv_len, kv_start, config,
                                  num_splits, out, lse)  # fmt: skip

    cfg = config or select_config(d, q.dtype, tq * group)
    programs = b * hkv * triton.cdiv(tq * group, cfg.block_m)
    # the most keys a row can have (shapes only: the split plan never depends on kv_len)
    splits, split_len = _split_plan(programs, m + tk, cfg, q.device, num_splits)
    if splits > 1:
        _check_combine_rows(b * tq * hq)
    if splits == 1:
        o_buf, l_buf = out.unsqueeze(0), lse.unsqueeze(0)
    else:
        o_buf = _empty((splits, b, tq, hq, d), dtype=torch.float32, device=q.device)
        l_buf = _empty((splits, b, hq, tq), dtype=torch.float32, device=q.device)
    _launch(q, k, v, mem_k, mem_v, m, table, o_buf, l_buf, kv_len, kv_start, causal, softmax_scale, split_len, cfg)
    if splits > 1:
        _combine(o_buf, l_buf, out, lse)
    return out, lse


def _shared_memory_fwd(q, k, v, mem_k, mem_v, table, softmax_scale, causal, kv_len, kv_start, config, num_splits,
                       out, lse) -> tuple[Tensor, Tensor]:  # fmt: skip
    """``memory_attention_fwd`` over a memory ``mem_k/mem_v [1, M, Hkv, D]`` shared by the B rows of q."""
    b, tq, hq, d = q.shape
    tk, hkv = k.shape[1], k.shape[2]
    group, m = hq // hkv, mem_k.shape[1]
    qm = _aligned(q.reshape(1, b * tq, hq, d))  # the batch as one row's tokens (a view of a contiguous q)
    cfg_m = config or select_config(d, q.dtype, b * tq * group)
    s_m, len_m = _split_plan(hkv * triton.cdiv(b * tq * group, cfg_m.block_m), m, cfg_m, q.device, num_splits)
    cfg_c = config or select_config(d, q.dtype, tq * group)
    s_c, len_c = (0, 0) if tk == 0 else _split_plan(
        b * hkv * triton.cdiv(tq * group, cfg_c.block_m), tk, cfg_c, q.device, num_splits
    )  # fmt: skip
    _check_combine_rows(b * tq * hq)
    o_buf = _empty((s_m + s_c, b, tq, hq, d), dtype=torch.float32, device=q.device)
    l_buf = _empty((s_m + s_c, b, hq, tq), dtype=torch.float32, device=q.device)
    # memory: partials [S_m, 1, B·Tq, Hq, D] are o_buf's first S_m as they are; their lse [S_m, 1, Hq, B·Tq] is laid
    # out for (B, Hq, Tq) after the launch
    l_m = _empty((s_m, 1, hq, b * tq), dtype=torch.float32, device=q.device)
    _launch(qm, k[:1, :0], v[:1, :0], mem_k, mem_v, m, table, o_buf[:s_m].view(s_m, 1, b * tq, hq, d), l_m, None,
            None, False, softmax_scale, len_m, cfg_m)  # fmt: skip
    l_buf[:s_m].copy_(l_m.view(s_m, hq, b, tq).transpose(1, 2))
    if s_c > 0:  # each row's chunk keys alone (no memory: m = 0)
        _launch(q, k, v, None, None, 0, table, o_buf[s_m:], l_buf[s_m:], kv_len, kv_start, causal, softmax_scale,
                len_c, cfg_c)  # fmt: skip
    _combine(o_buf, l_buf, out, lse)
    return out, lse


def merge_attention_states_fwd(out_a: Tensor, lse_a: Tensor, out_b: Tensor, lse_b: Tensor) -> tuple[Tensor, Tensor]:
    """Launch the exact two-state merge on validated inputs (contract: ``op.merge_attention_states``)."""
    b, t, h, d = out_a.shape
    out = _empty((b, t, h, d), dtype=out_a.dtype, device=out_a.device)
    lse = _empty((b, h, t), dtype=torch.float32, device=out_a.device)
    if b * t * h == 0:
        return out, lse
    if b * t * h >= 2**31:
        raise ValueError(f"merge_attention_states: B·T·H = {b * t * h} rows; the kernel indexes rows with int32")
    out_a, out_b = _unit_last(out_a), _unit_last(out_b)
    grid = (triton.cdiv(b * t * h, MERGE_BLOCK_R),)
    _merge_attention_states_kernel[grid](
        out_a, lse_a, out_b, lse_b, out, lse, b, t, h, d,
        out_a.stride(0), out_a.stride(1), out_a.stride(2),
        lse_a.stride(0), lse_a.stride(1), lse_a.stride(2),
        out_b.stride(0), out_b.stride(1), out_b.stride(2),
        lse_b.stride(0), lse_b.stride(1), lse_b.stride(2),
        out.stride(0), out.stride(1), out.stride(2),
        BLOCK_R=MERGE_BLOCK_R, BLOCK_D=MERGE_BLOCK_D, num_warps=MERGE_NUM_WARPS,
        num_stages=MERGE_NUM_STAGES,
    )  # fmt: skip
    return out, lse


# --------------------------------------------------------------------------------------------------------------------
# Ahead-of-time compile check
# --------------------------------------------------------------------------------------------------------------------
def _signature(fn, constexprs: dict, **types: str) -> dict[str, str]:
    """Triton types of ``fn``'s arguments, in order: ``types`` (pointers, float scalars), ``constexpr`` for the
    ``constexprs``, and ``i32`` for everything else (sizes and strides: what the runtime passes below 2^31)."""
    return {name: "constexpr" if name in constexprs else types.get(name, "i32") for name in fn.arg_names}


def compile_specs() -> list[KernelSpec]:
    """Every launch configuration the launchers can use, for ``python -m mplus_kernels.compile_check``."""
    specs = []
    for (mode, d, is_fp32), cfg in _CONFIGS.items():
        for ty in ("fp32",) if is_fp32 else ("bf16", "fp16"):
            # split: fp32 partial outputs instead of the final dtype (the same kernel when the inputs are fp32)
            for split in (False,) if is_fp32 else (False, True):
                constexprs = {"HEAD_DIM": d, "BLOCK_M": cfg.block_m, "BLOCK_N": cfg.block_n, "UPCAST": False}
                tensors = {name: f"*{ty}" for name in ("q_ptr", "k_ptr", "v_ptr", "mk_ptr", "mv_ptr")}
                signature = _signature(
                    _memory_attention_fwd_kernel, constexprs, **tensors, pos_ptr="*i32", cos_ptr="*fp32",
                    sin_ptr="*fp32", o_ptr="*fp32" if split else f"*{ty}", lse_ptr="*fp32", kv_len_ptr="*i32",
                    kv_start_ptr="*i32", qk_scale="fp32",
                )  # fmt: skip
                specs.append(
                    KernelSpec(
                        name=f"mem_attn[{mode},D{d},{ty}{',split' if split else ''}]",
                        fn=_memory_attention_fwd_kernel,
                        signature=signature,
                        constexprs=constexprs,
                        num_warps=cfg.num_warps,
                        num_stages=cfg.num_stages,
                    )
                )
    for ty in _TRITON_DTYPE.values():
        for d in HEAD_DIMS:
            constexprs = {"HEAD_DIM": d, "BLOCK_R": COMBINE_BLOCK_R}
            signature = _signature(
                _combine_splits_kernel, constexprs, po_ptr="*fp32", pl_ptr="*fp32", o_ptr=f"*{ty}", lse_ptr="*fp32"
            )
            specs.append(
                KernelSpec(
                    name=f"mem_attn_combine_splits[D{d},{ty}]",
                    fn=_combine_splits_kernel,
                    signature=signature,
                    constexprs=constexprs,
                    num_warps=MERGE_NUM_WARPS,
                    num_stages=MERGE_NUM_STAGES,
                )
            )
        constexprs = {"BLOCK_R": MERGE_BLOCK_R, "BLOCK_D": MERGE_BLOCK_D}
        signature = _signature(
            _merge_attention_states_kernel, constexprs, oa_ptr=f"*{ty}", la_ptr="*fp32", ob_ptr=f"*{ty}",
            lb_ptr="*fp32", o_ptr=f"*{ty}", lse_ptr="*fp32",
        )  # fmt: skip
        specs.append(
            KernelSpec(
                name=f"merge_attention_states[{ty}]",
                fn=_merge_attention_states_kernel,
                signature=signature,
                constexprs=constexprs,
                num_warps=MERGE_NUM_WARPS,
                num_stages=MERGE_NUM_STAGES,
            )
        )
    return specs
