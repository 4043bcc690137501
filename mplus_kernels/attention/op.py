"""``torch.ops.mplus.memory_attention`` and ``merge_attention_states``: contract, validation, dispatch, fake kernels.

The chunk's queries attend to a memory prefix that every query sees and to the chunk itself, bottom-right causal
(query t of Tq sees chunk key j of Tk iff ``j <= t + Tk - Tq``, FlashAttention >= 2.1), with native GQA and no mask
tensor. Memory keys are stored before RoPE and rotated inside the kernel from a per-row position table, so a memory
slot updated in place never invalidates cached K/V. Both ops return the natural-log LSE, so partial attentions over
disjoint key sets merge exactly (``merge_attention_states``): e.g. attend to short-term memory and the chunk while the
long-term rows are still being copied, then attend to those rows alone and merge.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from .. import _backend
from .._utils import shape_str as _shape
from .reference import memory_attention_reference, merge_attention_states_reference

OP_ATTENTION = "mplus::memory_attention"
OP_MERGE = "mplus::merge_attention_states"
FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def _tensor(fn: str, name: str, t: object) -> Tensor:
    if not isinstance(t, Tensor):
        raise TypeError(f"{fn}: {name} must be a torch.Tensor, got {type(t).__name__}")
    return t


def _float(fn: str, name: str, t: Tensor, dtype: torch.dtype | None = None) -> None:
    if dtype is None and t.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{fn}: {name} must be float16, bfloat16 or float32, got {t.dtype}")
    if dtype is not None and t.dtype != dtype:
        raise TypeError(f"{fn}: {name} has dtype {t.dtype}, expected {dtype}")


def _same_device(fn: str, name: str, t: Tensor, device: torch.device) -> None:
    if t.device != device:
        raise ValueError(f"{fn}: {name} is on {t.device}, expected {device} (where q is)")


def _can_sync() -> bool:
    """Whether reading a tensor's values on the host is allowed here (not while tracing or capturing a graph)."""
    if torch.compiler.is_compiling():
        return False
    return not (torch.cuda.is_available() and torch.cuda.is_current_stream_capturing())


def _validate_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    mem_k: Tensor | None,
    mem_v: Tensor | None,
    mem_pos: Tensor | None,
    rope_cos: Tensor | None,
    rope_sin: Tensor | None,
    softmax_scale: float | None,
    causal: bool,
) -> float:
    """Check every argument before anything runs; return the softmax scale."""
    fn = "memory_attention"
    q, k, v = _tensor(fn, "q", q), _tensor(fn, "k", k), _tensor(fn, "v", v)
    if q.dim() != 4:
        raise ValueError(f"{fn}: q must be [B, Tq, Hq, D], got {_shape(q)}")
    _float(fn, "q", q)
    b, _, hq, d = q.shape
    if d == 0 or d % 2:
        raise ValueError(f"{fn}: head dim D = q.shape[3] must be even and > 0 (RoPE rotates two halves), got {d}")
    device = q.device
    if k.dim() != 4 or k.shape[0] != b or k.shape[3] != d:
        raise ValueError(f"{fn}: k must be [B={b}, Tk, Hkv, D={d}], got {_shape(k)}")
    hkv = k.shape[2]
    if hkv == 0 or hq % hkv:
        raise ValueError(f"{fn}: Hq={hq} (q {_shape(q)}) must be a multiple of Hkv={hkv} (k {_shape(k)}) for GQA")
    if v.shape != k.shape:
        raise ValueError(f"{fn}: v must have k's shape {_shape(k)}, got {_shape(v)}")
    for name, t in (("k", k), ("v", v)):
        _float(fn, name, t, q.dtype)
        _same_device(fn, name, t, device)

    if (mem_k is None) != (mem_v is None):
        raise ValueError(
            f"{fn}: mem_k and mem_v must be given together (got only {'mem_k' if mem_v is None else 'mem_v'})"
        )
    m = 0
    if mem_k is not None:
        mem_k, mem_v = _tensor(fn, "mem_k", mem_k), _tensor(fn, "mem_v", mem_v)
        if mem_k.dim() != 4 or mem_k.shape[0] != b or mem_k.shape[2] != hkv or mem_k.shape[3] != d:
            raise ValueError(f"{fn}: mem_k must be [B={b}, M, Hkv={hkv}, D={d}], got {_shape(mem_k)}")
        if mem_v.shape != mem_k.shape:
            raise ValueError(f"{fn}: mem_v must have mem_k's shape {_shape(mem_k)}, got {_shape(mem_v)}")
        for name, t in (("mem_k", mem_k), ("mem_v", mem_v)):
            _float(fn, name, t, q.dtype)
            _same_device(fn, name, t, device)
        m = mem_k.shape[1]

    if mem_pos is None:
        if rope_cos is not None or rope_sin is not None:
            raise ValueError(f"{fn}: rope_cos/rope_sin were given without mem_pos (which table rows to use)")
    else:
        mem_pos = _tensor(fn, "mem_pos", mem_pos)
        if mem_k is None:
            raise ValueError(f"{fn}: mem_pos was given without mem_k/mem_v")
        if mem_pos.dtype.is_floating_point or mem_pos.is_complex() or mem_pos.dtype == torch.bool:
            raise TypeError(f"{fn}: mem_pos must be an integer tensor (int32 or int64), got {mem_pos.dtype}")
        if mem_pos.dim() != 1 or mem_pos.shape[0] != m:
            raise ValueError(f"{fn}: mem_pos must be [M={m}] (one position per memory row), got {_shape(mem_pos)}")
        _same_device(fn, "mem_pos", mem_pos, device)
        if rope_cos is None or rope_sin is None:
            raise ValueError(f"{fn}: mem_pos needs both rope_cos and rope_sin tables [P, D/2={d // 2}]")
        for name, t in (("rope_cos", rope_cos), ("rope_sin", rope_sin)):
            t = _tensor(fn, name, t)
            if t.dim() != 2 or t.shape[1] != d // 2:
                raise ValueError(f"{fn}: {name} must be [P, D/2={d // 2}], got {_shape(t)}")
            _float(fn, name, t, torch.float32)
            _same_device(fn, name, t, device)
        if rope_sin.shape != rope_cos.shape:
            raise ValueError(f"{fn}: rope_sin {_shape(rope_sin)} must have rope_cos's shape {_shape(rope_cos)}")
        if m > 0 and _can_sync():
            lo, hi = (int(x) for x in torch.aminmax(mem_pos))
            p = rope_cos.shape[0]
            if lo < 0 or hi >= p:
                raise ValueError(
                    f"{fn}: mem_pos must index the {p} rows of rope_cos/rope_sin (0 <= pos < {p}), "
                    f"got range [{lo}, {hi}]"
                )

    if not isinstance(causal, bool):
        raise TypeError(f"{fn}: causal must be a bool, got {type(causal).__name__}")
    if softmax_scale is None:
        return 1.0 / math.sqrt(d)
    if isinstance(softmax_scale, bool) or not isinstance(softmax_scale, (int, float)):
        raise TypeError(f"{fn}: softmax_scale must be a float or None, got {type(softmax_scale).__name__}")
    if not math.isfinite(softmax_scale):
        raise ValueError(f"{fn}: softmax_scale must be finite, got {softmax_scale}")
    return float(softmax_scale)


def _validate_merge(out_a: Tensor, lse_a: Tensor, out_b: Tensor, lse_b: Tensor) -> None:
    fn = "merge_attention_states"
    out_a, out_b = _tensor(fn, "out_a", out_a), _tensor(fn, "out_b", out_b)
    lse_a, lse_b = _tensor(fn, "lse_a", lse_a), _tensor(fn, "lse_b", lse_b)
    if out_a.dim() != 4:
        raise ValueError(f"{fn}: out_a must be [B, T, H, D], got {_shape(out_a)}")
    _float(fn, "out_a", out_a)
    if out_b.shape != out_a.shape:
        raise ValueError(f"{fn}: out_b must have out_a's shape {_shape(out_a)}, got {_shape(out_b)}")
    _float(fn, "out_b", out_b, out_a.dtype)
    b, t, h, _ = out_a.shape
    for name, lse in (("lse_a", lse_a), ("lse_b", lse_b)):
        if tuple(lse.shape) != (b, h, t):
            raise ValueError(
                f"{fn}: {name} must be [B={b}, H={h}, T={t}] (out_a is {_shape(out_a)}), got {_shape(lse)}"
            )
        _float(fn, name, lse, torch.float32)
    for name, x in (("out_b", out_b), ("lse_a", lse_a), ("lse_b", lse_b)):
        if x.device != out_a.device:
            raise ValueError(f"{fn}: {name} is on {x.device}, expected {out_a.device} (where out_a is)")


def _require_cpu_kernel(op: str, fn: str) -> None:
    """The extension can load without this op's C++ kernel (schema only): say so instead of a dispatcher error."""
    if not torch._C._dispatch_has_kernel_for_dispatch_key(op, "CPU"):
        raise _backend.BackendUnavailableError(
            f"{fn}: the C++ extension is built but has no CPU kernel for {op} (csrc/cpu/attention.cpp missing from "
            "the build); rebuild with `pip install -e . --no-build-isolation`, or pass backend='reference'"
        )


def _triton(fn: str, head_dim: int):
    impl = _backend.import_triton_impl("attention")
    if head_dim not in impl.HEAD_DIMS:
        raise ValueError(
            f"{fn}: the triton backend is compiled for head_dim in {impl.HEAD_DIMS}, got {head_dim}; "
            "pass backend='reference' for other head dims"
        )
    return impl


def memory_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    mem_k: Tensor | None = None,
    mem_v: Tensor | None = None,
    mem_pos: Tensor | None = None,
    rope_cos: Tensor | None = None,
    rope_sin: Tensor | None = None,
    *,
    softmax_scale: float | None = None,
    causal: bool = True,
    backend: str | None = None,
) -> tuple[Tensor, Tensor]:
    """Attention of a chunk's queries over ``[memory ; chunk]``, returning the output and its natural-log LSE.

    Args:
        q: ``[B, Tq, Hq, D]`` queries, already rotated (fp16, bf16 or fp32; any strides).
        k, v: ``[B, Tk, Hkv, D]`` the chunk's keys (rotated) and values, q's dtype; ``Hq % Hkv == 0`` (GQA).
            With a KV cache, ``k``/``v`` are the cache's valid rows (past + this chunk): ``Tk >= Tq``.
        mem_k, mem_v: ``[B, M, Hkv, D]`` memory keys *before* RoPE and values, or None. Every query sees every
            memory row. A memory shared by the batch can be passed as ``x.expand(B, -1, -1, -1)`` (no copy).
        mem_pos: ``[M]`` int32/int64 row of the RoPE tables for each memory row (None: ``mem_k`` used as given).
        rope_cos, rope_sin: ``[P, D/2]`` fp32 tables, row p = ``cos/sin(p · inv_freq)``; needed with ``mem_pos``.
        softmax_scale: default ``1/sqrt(D)``.
        causal: bottom-right causal on the chunk (query t sees chunk key j iff ``j <= t + Tk - Tq``); False makes the
            whole chunk visible.
        backend: ``auto`` / ``cpp`` / ``triton`` / ``reference`` (default: ``MPLUS_BACKEND``, else auto).

    Returns:
        ``out [B, Tq, Hq, D]`` in q's dtype, ``lse [B, Hq, Tq]`` fp32 (natural log of the softmax denominator of the
        scaled scores). A query that sees no key gets ``out = 0`` and ``lse = -inf``.

    Raises ``TypeError``/``ValueError`` naming the argument before anything runs (including memory positions outside
    the tables, checked on the host except while tracing or capturing a CUDA graph), and ``BackendUnavailableError``
    when the chosen backend cannot run.
    """
    fn = "memory_attention"
    scale = _validate_attention(q, k, v, mem_k, mem_v, mem_pos, rope_cos, rope_sin, softmax_scale, causal)
    which = _backend.resolve(fn, q.device, backend)
    if which == "reference":
        return memory_attention_reference(
            q, k, v, mem_k, mem_v, mem_pos, rope_cos, rope_sin, softmax_scale=scale, causal=causal
        )
    if which == "triton":
        impl = _triton(fn, q.shape[3])
        return impl.memory_attention_fwd(q, k, v, mem_k, mem_v, mem_pos, rope_cos, rope_sin, scale, causal)
    _require_cpu_kernel(OP_ATTENTION, fn)
    pos = None if mem_pos is None else mem_pos.to(torch.int32)
    out, lse = torch.ops.mplus.memory_attention(q, k, v, mem_k, mem_v, pos, rope_cos, rope_sin, scale, causal)
    return out, lse


def merge_attention_states(
    out_a: Tensor, lse_a: Tensor, out_b: Tensor, lse_b: Tensor, *, backend: str | None = None
) -> tuple[Tensor, Tensor]:
    """Exact merge of two attentions of the same queries over disjoint key sets.

    Args:
        out_a, out_b: ``[B, T, H, D]`` partial outputs (same float dtype).
        lse_a, lse_b: ``[B, H, T]`` fp32 natural-log LSEs (−inf for a query that saw no key in that part).
        backend: ``auto`` / ``cpp`` / ``triton`` / ``reference``.

    Returns:
        ``out [B, T, H, D]`` in out_a's dtype and ``lse [B, H, T]`` fp32, equal to one attention over the union of the
        two key sets: ``lse = logaddexp(lse_a, lse_b)``, ``out = out_a·exp(lse_a − lse) + out_b·exp(lse_b − lse)``.
    """
    fn = "merge_attention_states"
    _validate_merge(out_a, lse_a, out_b, lse_b)
    which = _backend.resolve(fn, out_a.device, backend)
    if which == "reference":
        return merge_attention_states_reference(out_a, lse_a, out_b, lse_b)
    if which == "triton":
        return _backend.import_triton_impl("attention").merge_attention_states_fwd(out_a, lse_a, out_b, lse_b)
    _require_cpu_kernel(OP_MERGE, fn)
    out, lse = torch.ops.mplus.merge_attention_states(out_a, lse_a, out_b, lse_b)
    return out, lse


def _register() -> None:
    """Fake kernels (for torch.compile / FakeTensor) and the CUDA → Triton kernels, when the schemas exist."""
    if not _backend.cpp_available():
        return

    @torch.library.register_fake(OP_ATTENTION)
    def _fake_attention(q, k, v, mem_k, mem_v, mem_pos, rope_cos, rope_sin, softmax_scale, causal):  # noqa: ARG001
        b, tq, hq, d = q.shape
        return q.new_empty((b, tq, hq, d)), q.new_empty((b, hq, tq), dtype=torch.float32)

    @torch.library.register_fake(OP_MERGE)
    def _fake_merge(out_a, lse_a, out_b, lse_b):  # noqa: ARG001
        b, t, h, d = out_a.shape
        return out_a.new_empty((b, t, h, d)), lse_a.new_empty((b, h, t))

    @torch.library.impl(OP_ATTENTION, "CUDA")
    def _cuda_attention(q, k, v, mem_k, mem_v, mem_pos, rope_cos, rope_sin, softmax_scale, causal):
        impl = _triton("memory_attention", q.shape[3])
        return impl.memory_attention_fwd(q, k, v, mem_k, mem_v, mem_pos, rope_cos, rope_sin, softmax_scale, causal)

    @torch.library.impl(OP_MERGE, "CUDA")
    def _cuda_merge(out_a, lse_a, out_b, lse_b):
        return _backend.import_triton_impl("attention").merge_attention_states_fwd(out_a, lse_a, out_b, lse_b)


_register()
