"""Triton kernels of the retriever scores for training (GPU; CPU through ``TRITON_INTERPRET=1``).

``w[l, n] = (1/T) Σ_t σ(q_t·k_n)`` and its backward (``scores.py`` has the contract), with ``σ' = σ(1 − σ)``:
``dq_t = (1/T) Σ_n g_n σ'(q_t·k_n) k_n`` and ``dk_n = (g_n/T) Σ_t σ'(q_t·k_n) q_t``. Three kernels; none builds the
``[L, T, N]`` matrix, each output element is written by one program that sums in a fixed order (no atomics, so two
runs give the same bits):

``_scores_fwd_kernel`` — grid ``(key blocks, L)``: a program owns ``BLOCK_M`` keys and loops over the queries,
  ``BLOCK_K`` at a time: ``S = Q·Kᵀ`` (ds in ``BLOCK_D`` slices), σ, masked column sums; ``w = sum / T``.
``_scores_bwd_dk_kernel`` — grid ``(key blocks, ds slices, L)``: the same loop, then ``dk += σ'(S)ᵀ·Q[:, slice]``
  into a ``[BLOCK_M, BLOCK_DS]`` fp32 accumulator; ``g_n / T`` scales each key's row at the end (it factors out of
  the sum over queries, so ``σ' ∈ [0, 1/4]`` is what meets the tensor cores).
``_scores_bwd_dq_kernel`` — grid ``(query blocks, ds slices, L)``: a program owns ``BLOCK_M`` queries and loops over
  the keys, ``dq += (σ'(S) ∘ g_n/ĝ)·K[:, slice]``, times ``ĝ/T`` at the end. ``ĝ = max_n |g_n|`` of the layer (1 where
  the layer's gradient is 0) keeps the fp16 operand in ``[−1/4, 1/4]``: a training loss's ``g`` is ~1/(rows counted),
  often below fp16's normal range.

ds larger than one slice (``BLOCK_DS``: 64, 128 or 256 by ds) is split across programs, each recomputing ``S``: at
the M+ ds = 256 one slice. Accumulation is fp32; the second product's operand is rounded to the input dtype for the
tensor cores (fp32 inputs: ``input_precision="ieee"``, no TF32). Layer bases and block bases are int64 (``L·N·ds``
may exceed 2^31), offsets inside a tile int32. Under the interpreter bf16 ``tl.dot`` and bf16 math are wrong:
``UPCAST`` (set only when interpreting) converts the loaded bf16 tiles to fp32 first.
"""

from __future__ import annotations

import dataclasses

import torch
import triton
import triton.language as tl
from torch import Tensor

from .. import _config
from ..compile_check import KernelSpec


@dataclasses.dataclass(frozen=True)
class ScoresConfig:
    """One launch configuration: ``block_m`` rows a program owns (keys for fwd/dk, queries for dq), ``block_k`` rows
    per step of its loop (queries for fwd/dk, keys for dq), ``block_d`` features per step of the dot products,
    ``block_ds`` features of the gradient slice a program writes (dk, dq)."""

    block_m: int
    block_k: int
    block_d: int
    block_ds: int
    num_warps: int
    num_stages: int


DS_SLICES = (64, 128, 256)  # gradient slices: the smallest that holds ds, else 256 (several programs per row)

# By (kernel, fp32?, block_ds); the forward has no slice (block_ds 0). fp32 inputs run on the FMA units (ieee dots):
# smaller tiles. Registers and spills on sm_80 / sm_90a (triton 3.8) decided the tiles: with 4 warps the fp32
# forward spilled 16 bytes on sm_90a and the 16-bit DS64 dk/dq kernels 256 (8 warps: 175 / 219-222 registers, no
# spill); the 16-bit DS256 kernels take 32 queries or keys per step (202-226 registers). `python -m
# mplus_kernels.compile_check` compiles every entry for both targets and fails on spills.
_CONFIGS: dict[tuple[str, bool, int], ScoresConfig] = {
    ("fwd", False, 0): ScoresConfig(128, 64, 64, 0, 8, 3),
    ("fwd", True, 0): ScoresConfig(64, 64, 16, 0, 8, 2),
    ("dk", False, 64): ScoresConfig(64, 64, 64, 64, 8, 2),
    ("dk", False, 128): ScoresConfig(64, 64, 64, 128, 8, 2),
    ("dk", False, 256): ScoresConfig(64, 32, 64, 256, 8, 2),
    ("dk", True, 64): ScoresConfig(32, 32, 16, 64, 4, 1),
    ("dk", True, 128): ScoresConfig(32, 32, 16, 128, 8, 1),
    ("dk", True, 256): ScoresConfig(32, 32, 16, 256, 8, 1),
    ("dq", False, 64): ScoresConfig(64, 64, 64, 64, 8, 2),
    ("dq", False, 128): ScoresConfig(64, 64, 64, 128, 8, 2),
    ("dq", False, 256): ScoresConfig(64, 32, 64, 256, 8, 2),
    ("dq", True, 64): ScoresConfig(32, 32, 16, 64, 4, 1),
    ("dq", True, 128): ScoresConfig(32, 32, 16, 128, 8, 1),
    ("dq", True, 256): ScoresConfig(32, 32, 16, 256, 8, 1),
}
DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_TRITON_DTYPE = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}


def select_config(kernel: str, ds: int, dtype: torch.dtype) -> ScoresConfig:
    """The launch configuration of ``kernel`` (``fwd``, ``dk`` or ``dq``) for features ``ds`` and inputs ``dtype``."""
    if dtype not in DTYPES:
        raise TypeError(f"the triton retriever-scores kernels take float16, bfloat16 or float32 inputs, got {dtype}")
    block_ds = 0 if kernel == "fwd" else next((s for s in DS_SLICES if ds <= s), DS_SLICES[-1])
    return _CONFIGS[(kernel, dtype == torch.float32, block_ds)]


@triton.jit
def _sigmoid_grad(b_x):
    """σ'(x) = e / (1 + e)² with e = exp(−|x|): exact in both tails (1 − σ would cancel for x ≫ 0)."""
    b_e = tl.exp(-tl.abs(b_x))
    b_1e = 1.0 + b_e
    return b_e / (b_1e * b_1e)


@triton.jit
def _scores_tile(
    p_a,  # rows of the tile's M side: [BLOCK_A, DS] at p_a + row·stride_ar + d·stride_ad
    p_b,  # rows of the N side: [BLOCK_B, DS]
    m_a,
    m_b,
    DS,
    stride_ar,
    stride_ad,
    stride_br,
    stride_bd,
    BLOCK_A: tl.constexpr,
    BLOCK_B: tl.constexpr,
    BLOCK_D: tl.constexpr,
    UPCAST: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """``A·Bᵀ`` of two row blocks, ``[BLOCK_A, BLOCK_B]`` fp32, ds in ``BLOCK_D`` slices (masked rows read as 0)."""
    o_ar = tl.arange(0, BLOCK_A)
    o_br = tl.arange(0, BLOCK_B)
    o_d = tl.arange(0, BLOCK_D)
    b_s = tl.zeros([BLOCK_A, BLOCK_B], dtype=tl.float32)
    for d0 in range(0, DS, BLOCK_D):
        m_d = d0 + o_d < DS
        p_at = p_a + o_ar[:, None] * stride_ar + (d0 + o_d)[None, :] * stride_ad
        p_bt = p_b + o_br[None, :] * stride_br + (d0 + o_d)[:, None] * stride_bd
        b_a = tl.load(p_at, mask=m_a[:, None] & m_d[None, :], other=0.0)
        b_bt = tl.load(p_bt, mask=m_d[:, None] & m_b[None, :], other=0.0)
        if UPCAST:
            b_a = b_a.to(tl.float32)
            b_bt = b_bt.to(tl.float32)
        # [BLOCK_A, BLOCK_D] @ [BLOCK_D, BLOCK_B] -> [BLOCK_A, BLOCK_B]
        b_s = tl.dot(b_a, b_bt, b_s, input_precision=DOT_PRECISION)
    return b_s


@triton.jit
def _scores_fwd_kernel(
    q_ptr,  # [L, T, DS]
    k_ptr,  # [L, N, DS]
    w_ptr,  # [L, N] fp32, contiguous
    T,
    N,
    DS,
    stride_ql,
    stride_qt,
    stride_qd,
    stride_kl,
    stride_kn,
    stride_kd,
    BLOCK_M: tl.constexpr,  # keys per program
    BLOCK_K: tl.constexpr,  # queries per step
    BLOCK_D: tl.constexpr,
    UPCAST: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    i_n, i_l = tl.program_id(0), tl.program_id(1)
    n0 = i_n.to(tl.int64) * BLOCK_M
    o_n = tl.arange(0, BLOCK_M)
    m_n = n0 + o_n < N
    o_t = tl.arange(0, BLOCK_K)
    p_k = k_ptr + i_l.to(tl.int64) * stride_kl + n0 * stride_kn
    p_q = q_ptr + i_l.to(tl.int64) * stride_ql  # queries t0 .., advanced as a (64-bit) pointer
    b_sum = tl.zeros([BLOCK_M], dtype=tl.float32)
    for t0 in range(0, T, BLOCK_K):
        m_t = t0 + o_t < T
        # [BLOCK_K, BLOCK_M]: queries x keys
        b_s = _scores_tile(p_q, p_k, m_t, m_n, DS, stride_qt, stride_qd, stride_kn, stride_kd, BLOCK_K, BLOCK_M,
                           BLOCK_D, UPCAST, DOT_PRECISION)  # fmt: skip
        b_sum += tl.sum(tl.where(m_t[:, None], tl.sigmoid(b_s), 0.0), axis=0)
        p_q += BLOCK_K * stride_qt
    tl.store(w_ptr + i_l.to(tl.int64) * N + n0 + o_n, b_sum / T, mask=m_n)


@triton.jit
def _scores_bwd_dk_kernel(
    q_ptr,  # [L, T, DS]
    k_ptr,  # [L, N, DS]
    g_ptr,  # [L, N] fp32
    dk_ptr,  # [L, N, DS], contiguous, keys' dtype
    T,
    N,
    DS,
    stride_ql,
    stride_qt,
    stride_qd,
    stride_kl,
    stride_kn,
    stride_kd,
    stride_gl,
    stride_gn,
    BLOCK_M: tl.constexpr,  # keys per program
    BLOCK_K: tl.constexpr,  # queries per step
    BLOCK_D: tl.constexpr,
    BLOCK_DS: tl.constexpr,  # features of dk per program
    UPCAST: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    i_n, i_c, i_l = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    n0 = i_n.to(tl.int64) * BLOCK_M
    o_n = tl.arange(0, BLOCK_M)
    m_n = n0 + o_n < N
    o_t = tl.arange(0, BLOCK_K)
    o_c = i_c * BLOCK_DS + tl.arange(0, BLOCK_DS)
    m_c = o_c < DS
    p_k = k_ptr + i_l.to(tl.int64) * stride_kl + n0 * stride_kn
    p_q = q_ptr + i_l.to(tl.int64) * stride_ql
    b_dk = tl.zeros([BLOCK_M, BLOCK_DS], dtype=tl.float32)
    for t0 in range(0, T, BLOCK_K):
        m_t = t0 + o_t < T
        # [BLOCK_M, BLOCK_K]: keys x queries
        b_s = _scores_tile(p_k, p_q, m_n, m_t, DS, stride_kn, stride_kd, stride_qt, stride_qd, BLOCK_M, BLOCK_K,
                           BLOCK_D, UPCAST, DOT_PRECISION)  # fmt: skip
        b_p = tl.where(m_t[None, :], _sigmoid_grad(b_s), 0.0)
        b_qc = tl.load(p_q + o_t[:, None] * stride_qt + o_c[None, :] * stride_qd, mask=m_t[:, None] & m_c[None, :],
                       other=0.0)  # fmt: skip
        if UPCAST:
            b_qc = b_qc.to(tl.float32)
        # [BLOCK_M, BLOCK_K] @ [BLOCK_K, BLOCK_DS] -> [BLOCK_M, BLOCK_DS]
        b_dk = tl.dot(b_p.to(b_qc.dtype), b_qc, b_dk, input_precision=DOT_PRECISION)
        p_q += BLOCK_K * stride_qt
    b_g = tl.load(g_ptr + i_l.to(tl.int64) * stride_gl + (n0 + o_n) * stride_gn, mask=m_n, other=0.0)
    b_dk = b_dk * (b_g / T)[:, None]
    p_dk = dk_ptr + (i_l.to(tl.int64) * N + n0) * DS + o_n[:, None] * DS + o_c[None, :]
    tl.store(p_dk, b_dk.to(dk_ptr.dtype.element_ty), mask=m_n[:, None] & m_c[None, :])


@triton.jit
def _scores_bwd_dq_kernel(
    q_ptr,  # [L, T, DS]
    k_ptr,  # [L, N, DS]
    g_ptr,  # [L, N] fp32
    gmax_ptr,  # [L] fp32: max_n |g_n| of the layer, 1 where it is 0
    dq_ptr,  # [L, T, DS], contiguous, queries' dtype
    T,
    N,
    DS,
    stride_ql,
    stride_qt,
    stride_qd,
    stride_kl,
    stride_kn,
    stride_kd,
    stride_gl,
    stride_gn,
    BLOCK_M: tl.constexpr,  # queries per program
    BLOCK_K: tl.constexpr,  # keys per step
    BLOCK_D: tl.constexpr,
    BLOCK_DS: tl.constexpr,  # features of dq per program
    UPCAST: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    i_t, i_c, i_l = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    t0 = i_t.to(tl.int64) * BLOCK_M
    o_t = tl.arange(0, BLOCK_M)
    m_t = t0 + o_t < T
    o_n = tl.arange(0, BLOCK_K)
    o_c = i_c * BLOCK_DS + tl.arange(0, BLOCK_DS)
    m_c = o_c < DS
    p_q = q_ptr + i_l.to(tl.int64) * stride_ql + t0 * stride_qt
    p_k = k_ptr + i_l.to(tl.int64) * stride_kl  # keys n0 .., advanced as a (64-bit) pointer
    p_g = g_ptr + i_l.to(tl.int64) * stride_gl
    b_gmax = tl.load(gmax_ptr + i_l)
    b_ginv = 1.0 / b_gmax
    b_dq = tl.zeros([BLOCK_M, BLOCK_DS], dtype=tl.float32)
    for n0 in range(0, N, BLOCK_K):
        m_n = n0 + o_n < N
        # [BLOCK_M, BLOCK_K]: queries x keys
        b_s = _scores_tile(p_q, p_k, m_t, m_n, DS, stride_qt, stride_qd, stride_kn, stride_kd, BLOCK_M, BLOCK_K,
                           BLOCK_D, UPCAST, DOT_PRECISION)  # fmt: skip
        b_g = tl.load(p_g + (n0 + o_n) * stride_gn, mask=m_n, other=0.0) * b_ginv  # keys past N: 0
        b_p = _sigmoid_grad(b_s) * b_g[None, :]
        b_kc = tl.load(p_k + o_n[:, None] * stride_kn + o_c[None, :] * stride_kd, mask=m_n[:, None] & m_c[None, :],
                       other=0.0)  # fmt: skip
        if UPCAST:
            b_kc = b_kc.to(tl.float32)
        # [BLOCK_M, BLOCK_K] @ [BLOCK_K, BLOCK_DS] -> [BLOCK_M, BLOCK_DS]
        b_dq = tl.dot(b_p.to(b_kc.dtype), b_kc, b_dq, input_precision=DOT_PRECISION)
        p_k += BLOCK_K * stride_kn
    b_dq = b_dq * (b_gmax / T)
    p_dq = dq_ptr + (i_l.to(tl.int64) * T + t0) * DS + o_t[:, None] * DS + o_c[None, :]
    tl.store(p_dq, b_dq.to(dq_ptr.dtype.element_ty), mask=m_t[:, None] & m_c[None, :])


# --------------------------------------------------------------------------------------------------------------------
# Launchers (inputs validated by scores.py)
# --------------------------------------------------------------------------------------------------------------------
_empty = torch.empty  # output allocator; tests swap in a NaN-filling one to catch elements a kernel never writes


def _flags(dtype: torch.dtype) -> tuple[bool, str]:
    upcast = dtype == torch.bfloat16 and _config.triton_interpret()
    return upcast, "ieee" if (dtype == torch.float32 or upcast) else "tf32"


def retriever_scores_fwd(queries: Tensor, keys: Tensor, *, config: ScoresConfig | None = None) -> Tensor:
    """``w [L, N]`` fp32 for ``queries [L, T >= 1, ds]`` and ``keys [L, N, ds]`` (fp16 / bf16 / fp32, any strides).
    ``config`` forces a launch configuration (tests: many blocks through tiny shapes)."""
    n_layers, t, ds = queries.shape
    n = keys.shape[1]
    w = _empty((n_layers, n), dtype=torch.float32, device=queries.device)
    if n_layers * n == 0:
        return w
    if ds == 0:
        return w.fill_(0.5)  # every q·k = 0
    cfg = config or select_config("fwd", ds, queries.dtype)
    upcast, precision = _flags(queries.dtype)
    _scores_fwd_kernel[(triton.cdiv(n, cfg.block_m), n_layers)](
        queries, keys, w, t, n, ds, *queries.stride(), *keys.stride(),
        BLOCK_M=cfg.block_m, BLOCK_K=cfg.block_k, BLOCK_D=cfg.block_d, UPCAST=upcast, DOT_PRECISION=precision,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )  # fmt: skip
    return w


def retriever_scores_bwd(
    grad: Tensor, queries: Tensor, keys: Tensor, *, config: ScoresConfig | None = None
) -> tuple[Tensor, Tensor]:
    """``(dqueries, dkeys)`` in the inputs' dtype for the upstream gradient ``grad [L, N]`` (fp32) of
    :func:`retriever_scores_fwd`. ``config`` forces one launch configuration on both kernels."""
    n_layers, t, ds = queries.shape
    n = keys.shape[1]
    dq = _empty((n_layers, t, ds), dtype=queries.dtype, device=queries.device)
    dk = _empty((n_layers, n, ds), dtype=keys.dtype, device=keys.device)
    if n_layers * n * ds == 0:  # no key or no feature: dq is 0, dk is empty
        return dq.zero_(), dk
    grad = grad.float()
    gmax = grad.abs().amax(1)
    gmax = torch.where(gmax > 0, gmax, torch.ones_like(gmax)).contiguous()
    upcast, precision = _flags(queries.dtype)
    cfg = config or select_config("dk", ds, queries.dtype)
    _scores_bwd_dk_kernel[(triton.cdiv(n, cfg.block_m), triton.cdiv(ds, cfg.block_ds), n_layers)](
        queries, keys, grad, dk, t, n, ds, *queries.stride(), *keys.stride(), *grad.stride(),
        BLOCK_M=cfg.block_m, BLOCK_K=cfg.block_k, BLOCK_D=cfg.block_d, BLOCK_DS=cfg.block_ds, UPCAST=upcast,
        DOT_PRECISION=precision, num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )  # fmt: skip
    cfg = config or select_config("dq", ds, queries.dtype)
    _scores_bwd_dq_kernel[(triton.cdiv(t, cfg.block_m), triton.cdiv(ds, cfg.block_ds), n_layers)](
        queries, keys, grad, gmax, dq, t, n, ds, *queries.stride(), *keys.stride(), *grad.stride(),
        BLOCK_M=cfg.block_m, BLOCK_K=cfg.block_k, BLOCK_D=cfg.block_d, BLOCK_DS=cfg.block_ds, UPCAST=upcast,
        DOT_PRECISION=precision, num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )  # fmt: skip
    return dq, dk


# --------------------------------------------------------------------------------------------------------------------
# Ahead-of-time compile check
# --------------------------------------------------------------------------------------------------------------------
def _signature(fn, constexprs: dict, **types: str) -> dict[str, str]:
    """Triton types of ``fn``'s arguments, in order: ``types`` (pointers), ``constexpr`` for the ``constexprs``,
    ``i32`` for the rest (sizes and strides)."""
    return {name: "constexpr" if name in constexprs else types.get(name, "i32") for name in fn.arg_names}


_KERNELS = {"fwd": _scores_fwd_kernel, "dk": _scores_bwd_dk_kernel, "dq": _scores_bwd_dq_kernel}


def compile_specs() -> list[KernelSpec]:
    """Every launch configuration the launchers can use, for ``python -m mplus_kernels.compile_check``."""
    specs = []
    for (kernel, is_fp32, block_ds), cfg in _CONFIGS.items():
        fn = _KERNELS[kernel]
        for ty in ("fp32",) if is_fp32 else ("bf16", "fp16"):
            constexprs = {"BLOCK_M": cfg.block_m, "BLOCK_K": cfg.block_k, "BLOCK_D": cfg.block_d, "UPCAST": False,
                          "DOT_PRECISION": "ieee" if is_fp32 else "tf32"}  # fmt: skip
            if kernel != "fwd":
                constexprs["BLOCK_DS"] = block_ds
            out = {"fwd": ("w_ptr", "fp32"), "dk": ("dk_ptr", ty), "dq": ("dq_ptr", ty)}[kernel]
            types = {"q_ptr": f"*{ty}", "k_ptr": f"*{ty}", "g_ptr": "*fp32", "gmax_ptr": "*fp32", out[0]: f"*{out[1]}"}
            name = f"retriever_scores_{kernel}[{ty}{f',DS{block_ds}' if block_ds else ''}]"
            specs.append(KernelSpec(name, fn, _signature(fn, constexprs, **types), constexprs,
                                    num_warps=cfg.num_warps, num_stages=cfg.num_stages))  # fmt: skip
    return specs


__all__ = ["ScoresConfig", "compile_specs", "retriever_scores_bwd", "retriever_scores_fwd", "select_config"]
