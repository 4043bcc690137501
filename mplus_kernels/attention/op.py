"""``torch.ops.mplus.memory_attention`` and ``merge_attention_states``: contract, validation, dispatch, fake kernels.

The chunk's queries attend to a memory prefix that every query sees and to the chunk itself, bottom-right causal
(query t of Tq sees chunk key j of Tk iff ``j <= t + Tk - Tq``, FlashAttention >= 2.1), with native GQA and no mask
tensor. With a static KV cache (``k``/``v`` the whole preallocated ``[B, S_max, Hkv, D]`` buffer) each batch row has
its own valid key range ``[kv_start[b], kv_len[b])``, passed as device tensors and read only inside the kernels, and
causality is aligned to the row's end (flash-attn's ``cache_seqlens`` / ``cache_leftpad``). Memory keys are stored
before RoPE and rotated inside the kernel from a per-row position table, so a memory slot updated in place never
invalidates cached K/V. Both ops return the natural-log LSE, so partial attentions over disjoint key sets merge
exactly (``merge_attention_states``): e.g. attend to short-term memory and the chunk while the long-term rows are
still being copied, then attend to those rows alone and merge.

Dispatch (DESIGN.md §2.5): the wrappers validate, then call ``torch.ops.mplus.<op>``, which the dispatcher sends by
device key (CPU → C++, CUDA → the Triton launcher registered below, Meta/FakeTensor → the fake kernel). Only
``backend="reference"`` and ``backend="triton"`` on CPU tensors (the interpreter, for tests) bypass it. Nothing in a
wrapper reads a device tensor's values.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from .. import _backend
from .._utils import check_device, check_float, check_integer, check_same_device, check_tensor, host_values
from .._utils import shape_str as _shape
from .backward import memory_attention_backward, merge_attention_states_backward
from .reference import memory_attention_reference, merge_attention_states_reference

OP_ATTENTION = "mplus::memory_attention"
OP_MERGE = "mplus::merge_attention_states"


def check_rope_tables(
    fn: str, name: str, positions: Tensor, rope_cos: Tensor, rope_sin: Tensor, d: int, device: torch.device, where: str
) -> None:
    """The RoPE tables: fp32 ``[P, D/2]`` of one shape on ``device`` (that of argument ``where``), and the values of
    ``positions`` (argument ``name``) rows of them, where they can be read without a device sync."""
    for table, t in (("rope_cos", rope_cos), ("rope_sin", rope_sin)):
        t = check_tensor(fn, table, t)
        if t.dim() != 2 or t.shape[1] != d // 2:
            raise ValueError(f"{fn}: {table} must be [P, D/2={d // 2}], got {_shape(t)}")
        check_float(fn, table, t, torch.float32)
        check_device(fn, table, t, device, where)
    if rope_sin.shape != rope_cos.shape:
        raise ValueError(f"{fn}: rope_sin {_shape(rope_sin)} must have rope_cos's shape {_shape(rope_cos)}")
    if positions.numel() > 0 and host_values(positions):
        lo, hi = (int(x) for x in torch.aminmax(positions))
        p = rope_cos.shape[0]
        if lo < 0 or hi >= p:
            raise ValueError(
                f"{fn}: {name} must index the {p} rows of rope_cos/rope_sin (0 <= pos < {p}), got range [{lo}, {hi}]"
            )


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
    kv_len: Tensor | None,
    kv_start: Tensor | None,
) -> float:
    """Check every argument before anything runs; return the softmax scale. Values (``mem_pos``, ``kv_len``,
    ``kv_start``) are checked only where they can be read without a device sync (``host_values``)."""
    fn = "memory_attention"
    q, k, v = check_tensor(fn, "q", q), check_tensor(fn, "k", k), check_tensor(fn, "v", v)
    if q.dim() != 4:
        raise ValueError(f"{fn}: q must be [B, Tq, Hq, D], got {_shape(q)}")
    check_float(fn, "q", q)
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
        check_float(fn, name, t, q.dtype)
        check_device(fn, name, t, device, "q")

    if (mem_k is None) != (mem_v is None):
        raise ValueError(
            f"{fn}: mem_k and mem_v must be given together (got only {'mem_k' if mem_v is None else 'mem_v'})"
        )
    m = 0
    if mem_k is not None:
        mem_k, mem_v = check_tensor(fn, "mem_k", mem_k), check_tensor(fn, "mem_v", mem_v)
        if mem_k.dim() != 4 or mem_k.shape[0] != b or mem_k.shape[2] != hkv or mem_k.shape[3] != d:
            raise ValueError(f"{fn}: mem_k must be [B={b}, M, Hkv={hkv}, D={d}], got {_shape(mem_k)}")
        if mem_v.shape != mem_k.shape:
            raise ValueError(f"{fn}: mem_v must have mem_k's shape {_shape(mem_k)}, got {_shape(mem_v)}")
        for name, t in (("mem_k", mem_k), ("mem_v", mem_v)):
            check_float(fn, name, t, q.dtype)
            check_device(fn, name, t, device, "q")
        m = mem_k.shape[1]

    if mem_pos is None:
        if rope_cos is not None or rope_sin is not None:
            raise ValueError(f"{fn}: rope_cos/rope_sin were given without mem_pos (which table rows to use)")
    else:
        mem_pos = check_tensor(fn, "mem_pos", mem_pos)
        if mem_k is None:
            raise ValueError(f"{fn}: mem_pos was given without mem_k/mem_v")
        check_integer(fn, "mem_pos", mem_pos)
        if mem_pos.dim() != 1 or mem_pos.shape[0] != m:
            raise ValueError(f"{fn}: mem_pos must be [M={m}] (one position per memory row), got {_shape(mem_pos)}")
        check_device(fn, "mem_pos", mem_pos, device, "q")
        if rope_cos is None or rope_sin is None:
            raise ValueError(f"{fn}: mem_pos needs both rope_cos and rope_sin tables [P, D/2={d // 2}]")
        check_rope_tables(fn, "mem_pos", mem_pos, rope_cos, rope_sin, d, device, "q")

    tk = k.shape[1]
    for name, t in (("kv_len", kv_len), ("kv_start", kv_start)):
        if t is None:
            continue
        t = check_tensor(fn, name, t)
        if t.dtype != torch.int32:
            raise TypeError(f"{fn}: {name} must be an int32 tensor [B={b}], got {t.dtype}")
        if t.dim() != 1 or t.shape[0] != b:
            raise ValueError(f"{fn}: {name} must be [B={b}] (one value per batch row), got {_shape(t)}")
        check_device(fn, name, t, device, "q")
    given = [t for t in (kv_len, kv_start) if t is not None]
    if given and all(host_values(t) for t in given):
        end = torch.full((b,), tk, device=device) if kv_len is None else kv_len.long()
        start = torch.zeros(b, dtype=torch.int64, device=device) if kv_start is None else kv_start.long()
        bad = (start < 0) | (start > end) | (end > tk)
        if bool(bad.any()):
            i = int(bad.nonzero()[0, 0])
            raise ValueError(
                f"{fn}: batch row {i} needs 0 <= kv_start <= kv_len <= Tk={tk} (k is {_shape(k)}), got "
                f"kv_start={int(start[i])}, kv_len={int(end[i])}"
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
    out_a, out_b = check_tensor(fn, "out_a", out_a), check_tensor(fn, "out_b", out_b)
    lse_a, lse_b = check_tensor(fn, "lse_a", lse_a), check_tensor(fn, "lse_b", lse_b)
    if out_a.dim() != 4:
        raise ValueError(f"{fn}: out_a must be [B, T, H, D], got {_shape(out_a)}")
    check_float(fn, "out_a", out_a)
    if out_b.shape != out_a.shape:
        raise ValueError(f"{fn}: out_b must have out_a's shape {_shape(out_a)}, got {_shape(out_b)}")
    check_float(fn, "out_b", out_b, out_a.dtype)
    b, t, h, _ = out_a.shape
    for name, lse in (("lse_a", lse_a), ("lse_b", lse_b)):
        if tuple(lse.shape) != (b, h, t):
            raise ValueError(
                f"{fn}: {name} must be [B={b}, H={h}, T={t}] (out_a is {_shape(out_a)}), got {_shape(lse)}"
            )
        check_float(fn, name, lse, torch.float32)
    for name, x in (("out_b", out_b), ("lse_a", lse_a), ("lse_b", lse_b)):
        check_device(fn, name, x, out_a.device, "out_a")


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


def _route(fn: str, op: str, device: torch.device, backend: str | None, head_dim: int | None = None) -> str:
    """Where a validated call goes: ``"reference"``, ``"triton"`` (the launcher itself, see
    :func:`_backend.through_dispatcher`) or ``"op"`` (``torch.ops.mplus``, which picks the kernel by device key).
    Raises ``BackendUnavailableError`` for what cannot run, before anything does."""
    which = _backend.resolve(fn, device, backend)
    if which == "triton" and head_dim is not None:
        _triton(fn, head_dim)
    if not _backend.through_dispatcher(which, device):
        return which
    if device.type == "cpu" and not torch.compiler.is_compiling():
        _require_cpu_kernel(op, fn)
    return "op"


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
    kv_len: Tensor | None = None,
    kv_start: Tensor | None = None,
    backend: str | None = None,
) -> tuple[Tensor, Tensor]:
    """Attention of a chunk's queries over ``[memory ; chunk]``, returning the output and its natural-log LSE.

    Visibility (the exact rule, every backend): every query sees every memory row; query ``t`` (of Tq) of batch row
    ``b`` sees chunk key ``j`` (of Tk) iff ``kv_start[b] <= j < kv_len[b]`` and, when ``causal``,
    ``j <= t + kv_len[b] - Tq`` (bottom-right causal aligned to the row's last valid key). With ``kv_len`` and
    ``kv_start`` None this is ``j <= t + Tk - Tq`` over the whole chunk (FlashAttention >= 2.1).

    Args:
        q: ``[B, Tq, Hq, D]`` queries, already rotated (fp16, bf16 or fp32; any strides).
        k, v: ``[B, Tk, Hkv, D]`` the chunk's keys (rotated) and values, q's dtype; ``Hq % Hkv == 0`` (GQA).
            With a KV cache, ``k``/``v`` are either the cache's valid rows (past + this chunk) or the whole static
            cache ``[B, S_max, Hkv, D]`` with ``kv_len``.
        mem_k, mem_v: ``[B, M, Hkv, D]`` memory keys *before* RoPE and values, or None. Every query sees every
            memory row. A memory shared by the batch can be passed as ``x.expand(B, -1, -1, -1)`` (no copy).
        mem_pos: ``[M]`` int32/int64 row of the RoPE tables for each memory row (None: ``mem_k`` used as given).
        rope_cos, rope_sin: ``[P, D/2]`` fp32 tables, row p = ``cos/sin(p · inv_freq)``; needed with ``mem_pos``.
        softmax_scale: default ``1/sqrt(D)``.
        causal: bottom-right causal on the chunk (see above); False makes every valid chunk key visible.
        kv_len: ``[B]`` int32 on q's device, the number of valid chunk keys per batch row (like flash-attn's
            ``cache_seqlens``): keys ``j >= kv_len[b]`` are never read. None: Tk for every row.
        kv_start: ``[B]`` int32 on q's device, the first valid chunk key per batch row (left padding, like
            ``cache_leftpad``): keys before it are never read. None: 0. Needs ``0 <= kv_start <= kv_len <= Tk``.
            Both are read by the kernels on the device, never by this wrapper (except host tensors, validated), so
            a compiled or CUDA-graph decode step over a static cache does not depend on their values.
        backend: ``auto`` / ``cpp`` / ``triton`` / ``reference`` (default: ``MPLUS_BACKEND``, else auto).

    Returns:
        ``out [B, Tq, Hq, D]`` in q's dtype, ``lse [B, Hq, Tq]`` fp32 (natural log of the softmax denominator of the
        scaled scores). A query that sees no key gets ``out = 0`` and ``lse = -inf``.

    Raises ``TypeError``/``ValueError`` naming the argument before anything runs (value ranges of ``mem_pos``,
    ``kv_len`` and ``kv_start`` only where they are host tensors and not traced: ``host_values``), and
    ``BackendUnavailableError`` when the chosen backend cannot run. The raw CPU op range-checks those values itself;
    the Triton kernel clamps them to the tensors' extents, so no call reads out of bounds.
    """
    fn = "memory_attention"
    scale = _validate_attention(
        q, k, v, mem_k, mem_v, mem_pos, rope_cos, rope_sin, softmax_scale, causal, kv_len, kv_start
    )
    _check_not_differentiable(fn, {"mem_pos": mem_pos, "rope_cos": rope_cos, "rope_sin": rope_sin, "kv_len": kv_len,
                                   "kv_start": kv_start})  # fmt: skip
    route = _route(fn, OP_ATTENTION, q.device, backend, head_dim=q.shape[3])
    if route == "reference":
        return memory_attention_reference(
            q, k, v, mem_k, mem_v, mem_pos, rope_cos, rope_sin, softmax_scale=scale, causal=causal, kv_len=kv_len,
            kv_start=kv_start,
        )  # fmt: skip
    if route == "triton":  # Triton on CPU tensors (the interpreter) is called directly: autograd through a Function
        return _TritonAttention.apply(q, k, v, mem_k, mem_v, mem_pos, rope_cos, rope_sin, scale, causal, kv_len,
                                      kv_start)  # fmt: skip
    pos = None if mem_pos is None else mem_pos.to(torch.int32)
    out, lse = torch.ops.mplus.memory_attention(
        q, k, v, mem_k, mem_v, pos, rope_cos, rope_sin, scale, causal, kv_len, kv_start
    )
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
    route = _route(fn, OP_MERGE, out_a.device, backend)
    if route == "reference":
        return merge_attention_states_reference(out_a, lse_a, out_b, lse_b)
    if route == "triton":
        return _TritonMerge.apply(out_a, lse_a, out_b, lse_b)
    out, lse = torch.ops.mplus.merge_attention_states(out_a, lse_a, out_b, lse_b)
    return out, lse


def _check_not_differentiable(fn: str, tensors: dict[str, Tensor | None]) -> None:
    """Positions, RoPE tables and key ranges are not differentiated: asking for their gradient is an error."""
    if not torch.is_grad_enabled():
        return
    for name, t in tensors.items():
        if t is not None and t.requires_grad:
            raise ValueError(
                f"{fn}: {name} requires grad, but {fn} is not differentiable in {name} (positions, RoPE tables and "
                "key ranges are constants): detach it"
            )


def _attention_grads(ctx, grad_out, grad_lse):
    q, k, v, mem_k, mem_v, mem_pos, rope_cos, rope_sin, kv_len, kv_start, out, lse = ctx.saved_tensors
    mem_k = mem_k if ctx.has_memory else None
    mem_v = mem_v if ctx.has_memory else None
    impl = _backward_impl(q, ctx.triton)
    dq, dk, dv, dmk, dmv = impl(
        grad_out, grad_lse, q, k, v, mem_k, mem_v, mem_pos if ctx.has_pos else None, rope_cos, rope_sin, out, lse,
        ctx.scale, ctx.causal, kv_len if ctx.has_len else None, kv_start if ctx.has_start else None,
    )  # fmt: skip
    return dq, dk, dv, dmk, dmv


def _backward_impl(q: Tensor, triton: bool):
    """The backward of the forward's backend: the Triton kernels where the forward ran Triton (CUDA, or the
    interpreter route on CPU tensors) at a head dim they take, else the PyTorch recurrence (``backward.py``)."""
    if (triton or q.device.type == "cuda") and q.shape[3] in (64, 128):
        from . import triton_backward  # lazily: import mplus_kernels never needs triton

        return triton_backward.memory_attention_bwd
    if q.device.type == "cpu" and not triton and _backend.cpp_available():
        return _cpp_backward
    return memory_attention_backward


def _cpp_backward(grad_out, grad_lse, q, k, v, mem_k, mem_v, mem_pos, rope_cos, rope_sin, out, lse, scale, causal,
                  kv_len, kv_start):  # fmt: skip
    """The C++ backward (``csrc/cpu/attention_backward.cpp``); None upstream gradients are zeros."""
    grad_out = torch.zeros_like(out) if grad_out is None else grad_out
    dq, dk, dv, dmk, dmv = torch.ops.mplus.memory_attention_backward(
        grad_out, grad_lse, q, k, v, mem_k, mem_v, mem_pos, rope_cos, rope_sin, out, lse, scale, causal, kv_len,
        kv_start,
    )  # fmt: skip
    return dq, dk, dv, (None if mem_k is None else dmk), (None if mem_v is None else dmv)


def _save_attention(ctx, inputs, output) -> None:
    q, k, v, mem_k, mem_v, mem_pos, rope_cos, rope_sin, scale, causal, kv_len, kv_start = inputs
    ctx.has_memory, ctx.has_pos = mem_k is not None, mem_pos is not None
    ctx.has_len, ctx.has_start = kv_len is not None, kv_start is not None
    ctx.scale, ctx.causal, ctx.triton = scale, causal, False
    empty = q.new_empty(0)
    keep = lambda t: empty if t is None else t  # noqa: E731 - save_for_backward takes tensors only
    ctx.save_for_backward(q, k, v, keep(mem_k), keep(mem_v), keep(mem_pos), keep(rope_cos), keep(rope_sin),
                          keep(kv_len), keep(kv_start), *output)  # fmt: skip


class _TritonAttention(torch.autograd.Function):
    """The interpreter route (Triton on CPU tensors, called directly) with the same backward as the op."""

    @staticmethod
    def forward(q, k, v, mem_k, mem_v, mem_pos, rope_cos, rope_sin, scale, causal, kv_len, kv_start):
        return _backend.import_triton_impl("attention").memory_attention_fwd(
            q, k, v, mem_k, mem_v, mem_pos, rope_cos, rope_sin, scale, causal, kv_len, kv_start
        )

    @staticmethod
    def setup_context(ctx, inputs, output):
        _save_attention(ctx, inputs, output)
        ctx.triton = True

    @staticmethod
    def backward(ctx, grad_out, grad_lse):
        return *_attention_grads(ctx, grad_out, grad_lse), None, None, None, None, None, None, None


def _merge_grads(ctx, grad_out, grad_lse):
    return merge_attention_states_backward(grad_out, grad_lse, *ctx.saved_tensors)


class _TritonMerge(torch.autograd.Function):
    @staticmethod
    def forward(out_a, lse_a, out_b, lse_b):
        return _backend.import_triton_impl("attention").merge_attention_states_fwd(out_a, lse_a, out_b, lse_b)

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(*inputs, *output)

    @staticmethod
    def backward(ctx, grad_out, grad_lse):
        return _merge_grads(ctx, grad_out, grad_lse)


def _register() -> None:
    """Fake kernels (for torch.compile / FakeTensor / the meta device), the CUDA → Triton kernels and the backward
    of both ops (every backend through the op; ``backward.py``), when the schemas exist."""
    if not _backend.cpp_available():
        return

    torch.library.register_autograd(
        OP_ATTENTION,
        lambda ctx, grad_out, grad_lse: (*_attention_grads(ctx, grad_out, grad_lse), *([None] * 7)),
        setup_context=_save_attention,
    )
    torch.library.register_autograd(
        OP_MERGE, _merge_grads, setup_context=lambda ctx, inputs, output: ctx.save_for_backward(*inputs, *output)
    )

    @torch.library.register_fake(OP_ATTENTION)
    def _fake_attention(q, k, v, mem_k, mem_v, mem_pos, rope_cos, rope_sin, softmax_scale, causal, kv_len=None,
                        kv_start=None):  # fmt: skip  # noqa: ARG001
        named = {"k": k, "v": v, "mem_k": mem_k, "mem_v": mem_v, "mem_pos": mem_pos, "rope_cos": rope_cos,
                 "rope_sin": rope_sin, "kv_len": kv_len, "kv_start": kv_start}  # fmt: skip
        check_same_device("memory_attention", "q", q.device, named)
        b, tq, hq, d = q.shape
        return q.new_empty((b, tq, hq, d)), q.new_empty((b, hq, tq), dtype=torch.float32)

    @torch.library.register_fake("mplus::memory_attention_backward")
    def _fake_attention_backward(grad_out, grad_lse, q, k, v, mem_k, mem_v, mem_pos, rope_cos, rope_sin, out, lse,
                                 softmax_scale, causal, kv_len, kv_start):  # fmt: skip  # noqa: ARG001
        named = {"grad_out": grad_out, "grad_lse": grad_lse, "k": k, "v": v, "mem_k": mem_k, "mem_v": mem_v,
                 "mem_pos": mem_pos, "rope_cos": rope_cos, "rope_sin": rope_sin, "out": out, "lse": lse,
                 "kv_len": kv_len, "kv_start": kv_start}  # fmt: skip
        check_same_device("memory_attention_backward", "q", q.device, named)
        b, hkv, d = q.shape[0], k.shape[2], q.shape[3]
        absent = (b, 0, hkv, d)  # no memory: empty gradients, as the C++ op returns
        dmem_k = q.new_empty(absent) if mem_k is None else mem_k.new_empty(mem_k.shape)
        dmem_v = q.new_empty(absent) if mem_v is None else mem_v.new_empty(mem_v.shape)
        return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape), dmem_k, dmem_v

    @torch.library.register_fake(OP_MERGE)
    def _fake_merge(out_a, lse_a, out_b, lse_b):
        named = {"lse_a": lse_a, "out_b": out_b, "lse_b": lse_b}
        check_same_device("merge_attention_states", "out_a", out_a.device, named)
        b, t, h, d = out_a.shape
        return out_a.new_empty((b, t, h, d)), lse_a.new_empty((b, h, t))

    @torch.library.impl(OP_ATTENTION, "CUDA")
    def _cuda_attention(q, k, v, mem_k, mem_v, mem_pos, rope_cos, rope_sin, softmax_scale, causal, kv_len=None,
                        kv_start=None):  # fmt: skip
        impl = _triton("memory_attention", q.shape[3])
        return impl.memory_attention_fwd(
            q, k, v, mem_k, mem_v, mem_pos, rope_cos, rope_sin, softmax_scale, causal, kv_len, kv_start
        )

    @torch.library.impl(OP_MERGE, "CUDA")
    def _cuda_merge(out_a, lse_a, out_b, lse_b):
        return _backend.import_triton_impl("attention").merge_attention_states_fwd(out_a, lse_a, out_b, lse_b)


_register()
