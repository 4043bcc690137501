"""Retriever scores for training (issue 12, item 2; SPEC.md §7.1, §7.3): ``w = mean_t sigmoid(q_t · k)`` with a
backward, and the BCE objective the official training code minimises.

``retriever_scores(queries [L, T, ds], keys [L, N, ds]) -> w [L, N]`` is the fused op ``mplus::retriever_scores``
(schema in csrc/torch_bindings.cpp) with its backward ``mplus::retriever_scores_backward``, registered here through
``torch.library.register_autograd``, so the public op is differentiable on every backend. With ``σ' = σ(1 − σ)``,
``dq_t = (1/T) Σ_n g_n σ'(q_t·k_n) k_n`` and ``dk_n = (g_n/T) Σ_t σ'(q_t·k_n) q_t``; neither direction builds the
``[L, T, N]`` matrix: the backward recomputes the dot products per tile.

Dispatch (DESIGN.md §2.5, ``_backend.resolve``): the wrapper validates, then ``auto`` calls ``torch.ops.mplus``, which
sends CPU tensors to the C++ kernels (csrc/cpu/retriever_scores.cpp), CUDA tensors to the Triton kernels
(``triton_scores.py``, registered below) and meta / fake tensors to the fake kernels. ``backend="reference"`` runs the
PyTorch blocked matmuls (:func:`retriever_scores_reference`, a custom op of its own with its own backward);
``backend="triton"`` on CPU tensors (the interpreter, ``TRITON_INTERPRET=1``) calls the Triton launchers through an
``autograd.Function``. A backend that cannot run raises ``BackendUnavailableError``; nothing falls back.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .. import _backend
from .._utils import check_same_device, check_tensor, register_no_backward
from .._utils import shape_str as _shape

OP = "mplus::retriever_scores"
OP_BACKWARD = "mplus::retriever_scores_backward"
BLOCK = 4096  # keys per recomputed block of the reference
DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _check(queries: Tensor, keys: Tensor, fn: str = "retriever_scores") -> None:
    """Shapes, dtypes and devices of ``queries [L, T >= 1, ds]`` and ``keys [L, N, ds]``, before anything runs."""
    check_tensor(fn, "queries", queries)
    check_tensor(fn, "keys", keys)
    if queries.dtype not in DTYPES:
        raise TypeError(f"{fn}: queries must be float16, bfloat16, float32 or float64, got {queries.dtype}")
    if queries.dim() != 3:
        raise ValueError(f"{fn}: queries must be a 3-D [L, T, ds] tensor, got {queries.dim()}-D {_shape(queries)}")
    if keys.dim() != 3 or queries.shape[0] != keys.shape[0] or queries.shape[2] != keys.shape[2]:
        raise ValueError(
            f"{fn}: queries must be [L, T, ds] and keys [L, N, ds] with the same L and ds, got "
            f"{list(queries.shape)} and {list(keys.shape)}"
        )
    if queries.shape[1] == 0:
        raise ValueError(f"{fn}: queries {list(queries.shape)} hold no query (T = 0): the mean is undefined")
    if keys.dtype != queries.dtype:
        raise TypeError(f"{fn}: keys have dtype {keys.dtype}, queries have {queries.dtype}; they must match")
    if keys.device != queries.device:
        raise ValueError(f"{fn}: keys are on {keys.device}, queries on {queries.device}; they must share a device")


def _score_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


# --------------------------------------------------------------------------------------------------------------------
# The reference: PyTorch blocked matmuls, a custom op of its own (any device; no extension needed)
# --------------------------------------------------------------------------------------------------------------------
@torch.library.custom_op("mplus::retriever_scores_reference", mutates_args=())
def _retriever_scores_reference(queries: Tensor, keys: Tensor) -> Tensor:
    acc = torch.float64 if queries.dtype == torch.float64 else torch.float32
    q, k = queries.to(acc), keys.to(acc)
    out = [torch.sigmoid(q @ k[:, lo : lo + BLOCK].transpose(1, 2)).mean(1) for lo in range(0, k.shape[1], BLOCK)]
    return (torch.cat(out, 1) if out else q.new_zeros(q.shape[0], 0)).to(torch.float32 if acc != torch.float64 else acc)


@_retriever_scores_reference.register_fake
def _(queries: Tensor, keys: Tensor) -> Tensor:
    return queries.new_empty((queries.shape[0], keys.shape[1]), dtype=_score_dtype(queries.dtype))


def _backward(ctx, grad: Tensor):
    queries, keys = ctx.saved_tensors
    acc = torch.float64 if queries.dtype == torch.float64 else torch.float32
    q, k, g = queries.to(acc), keys.to(acc), grad.to(acc)
    t = q.shape[1]
    dq = torch.zeros_like(q)
    dks = []
    for lo in range(0, k.shape[1], BLOCK):
        kb, gb = k[:, lo : lo + BLOCK], g[:, lo : lo + BLOCK]
        s = torch.sigmoid(q @ kb.transpose(1, 2))  # [L, T, n]
        ds = s * (1 - s) * (gb[:, None, :] / t)  # d w_n / d s_tn, times the upstream gradient
        dq += ds @ kb
        dks.append(ds.transpose(1, 2) @ q)
    dk = torch.cat(dks, 1) if dks else torch.zeros_like(k)
    return dq.to(queries.dtype), dk.to(keys.dtype)


_retriever_scores_reference.register_autograd(
    _backward, setup_context=lambda ctx, inputs, output: ctx.save_for_backward(*inputs)
)


def retriever_scores_reference(queries: Tensor, keys: Tensor) -> Tensor:
    """The reference of :func:`retriever_scores` (same contract, differentiable): fp32 (fp64) matmuls over blocks of
    ``BLOCK`` keys, so it holds ``[L, T, BLOCK]`` matrices at a time; its backward recomputes them per block."""
    _check(queries, keys, "retriever_scores_reference")
    return _retriever_scores_reference(queries, keys)


# --------------------------------------------------------------------------------------------------------------------
# The fused op: routing, the interpreter route, registration
# --------------------------------------------------------------------------------------------------------------------
def _triton():
    from . import triton_scores  # lazily: import mplus_kernels never needs triton

    return triton_scores


def _route(fn: str, device: torch.device, dtype: torch.dtype, backend: str | None) -> str:
    """``"reference"``, ``"triton"`` (the launchers themselves, see :func:`_backend.through_dispatcher`) or ``"op"``
    (``torch.ops.mplus``, which picks the kernel by device key); ``BackendUnavailableError`` for what cannot run."""
    which = _backend.resolve(fn, device, backend)
    if which == "triton" and dtype == torch.float64:
        raise TypeError(
            f"{fn}: the triton backend takes float16, bfloat16 or float32 inputs, got {dtype}; pass backend='cpp' "
            "(CPU tensors) or backend='reference' for float64"
        )
    if not _backend.through_dispatcher(which, device):
        return which
    if device.type == "cpu" and not torch.compiler.is_compiling():
        for op in (OP, OP_BACKWARD):
            if not torch._C._dispatch_has_kernel_for_dispatch_key(op, "CPU"):
                raise _backend.BackendUnavailableError(
                    f"{fn}: the C++ extension is built but has no CPU kernel for {op} (csrc/cpu/retriever_scores.cpp "
                    "missing from the build); rebuild with `pip install -e . --no-build-isolation`, or pass "
                    "backend='reference'"
                )
    return "op"


def retriever_scores(queries: Tensor, keys: Tensor, *, backend: str | None = None) -> Tensor:
    """``w [L, N] = mean_t sigmoid(queries[l, t] · keys[l, n])`` (fp32; fp64 for fp64 inputs), differentiable in
    both arguments. ``queries [L, T, ds]`` (e.g. ``query_proj`` of a chunk's normalised tokens, SPEC.md §7.1),
    ``keys [L, N, ds]`` (``key_proj`` of the short-term rows); fp16 / bf16 / fp32 / fp64 (fp64: cpp and reference
    only), any strides. Gradients come back in the inputs' dtype.

    ``backend``: ``auto`` / ``cpp`` / ``triton`` / ``reference`` (default: ``MPLUS_BACKEND``, else auto). Raises
    ``TypeError`` / ``ValueError`` naming the argument before anything runs, and ``BackendUnavailableError`` when
    the chosen backend cannot run here."""
    _check(queries, keys)
    route = _route("retriever_scores", queries.device, queries.dtype, backend)
    if route == "reference":
        return _retriever_scores_reference(queries, keys)
    if route == "triton":  # Triton on CPU tensors (the interpreter) is called directly: autograd through a Function
        return _TritonScores.apply(queries, keys)
    return torch.ops.mplus.retriever_scores(queries, keys)


class _TritonScores(torch.autograd.Function):
    """The interpreter route (Triton on CPU tensors, called directly) with the Triton backward."""

    @staticmethod
    def forward(queries, keys):
        return _triton().retriever_scores_fwd(queries, keys)

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(*inputs)

    @staticmethod
    def backward(ctx, grad):
        queries, keys = ctx.saved_tensors
        return _triton().retriever_scores_bwd(grad, queries, keys)


def _op_backward(ctx, grad: Tensor):
    """The backward of ``mplus::retriever_scores``: ``mplus::retriever_scores_backward`` by device key (CPU → C++,
    CUDA → Triton, meta / fake → the fake kernel)."""
    queries, keys = ctx.saved_tensors
    dq, dk = torch.ops.mplus.retriever_scores_backward(grad, queries, keys)
    return (dq if ctx.needs_input_grad[0] else None), (dk if ctx.needs_input_grad[1] else None)


def _check_grad(fn: str, grad: Tensor, queries: Tensor, keys: Tensor) -> None:
    check_tensor(fn, "grad", grad)
    want = (queries.shape[0], keys.shape[1])
    if tuple(grad.shape) != want:
        raise ValueError(f"{fn}: grad must be [L={want[0]}, N={want[1]}] (the scores' shape), got {_shape(grad)}")
    if grad.dtype != _score_dtype(queries.dtype):
        raise TypeError(
            f"{fn}: grad must be {_score_dtype(queries.dtype)} (the scores' dtype for {queries.dtype} inputs), got "
            f"{grad.dtype}"
        )


def _register() -> None:
    """The backward of the op, fake kernels (torch.compile / FakeTensor / the meta device) and the CUDA → Triton
    kernels, when the schemas (from the C++ extension) exist."""
    if not _backend.cpp_available():
        return

    torch.library.register_autograd(
        OP, _op_backward, setup_context=lambda ctx, inputs, output: ctx.save_for_backward(*inputs)
    )
    register_no_backward(OP_BACKWARD, ("grad", "queries", "keys"))  # no double backward: refuse, never ignore

    @torch.library.register_fake(OP)
    def _fake(queries, keys):
        _check(queries, keys)
        check_same_device("retriever_scores", "queries", queries.device, {"keys": keys})
        return queries.new_empty((queries.shape[0], keys.shape[1]), dtype=_score_dtype(queries.dtype))

    @torch.library.register_fake(OP_BACKWARD)
    def _fake_backward(grad, queries, keys):
        fn = "retriever_scores_backward"
        _check(queries, keys, fn)
        _check_grad(fn, grad, queries, keys)
        check_same_device(fn, "queries", queries.device, {"grad": grad, "keys": keys})
        return queries.new_empty(queries.shape), keys.new_empty(keys.shape)

    @torch.library.impl(OP, "CUDA")
    def _cuda(queries, keys):
        return _triton().retriever_scores_fwd(queries, keys)

    @torch.library.impl(OP_BACKWARD, "CUDA")
    def _cuda_backward(grad, queries, keys):
        return _triton().retriever_scores_bwd(grad, queries, keys)


_register()


def retriever_bce_loss(scores: Tensor, positives: Tensor, negative_weight: float = 1.0, eps: float = 1e-5) -> Tensor:
    """The official selector loss (SPEC.md §7.3, ``selector_loss_type = bce``) over all layers jointly:
    ``L_pos = mean_pos −log(w + eps)``, ``L_neg = mean_neg −log(1 − w + eps)``, ``(L_pos + λ·L_neg) / (1 + λ)``.

    ``scores [L, N]`` (:func:`retriever_scores`), ``positives [L, N]`` bool: the rows that hold the document's memory
    (the tracked indicator of SPEC.md §7.2); every other row is a negative. A side with no row contributes 0 (the
    official code would produce NaN). Masked sums, no boolean indexing: no host sync on a device (and it runs on
    meta)."""
    check_tensor("retriever_bce_loss", "scores", scores)
    check_tensor("retriever_bce_loss", "positives", positives)
    if positives.shape != scores.shape or positives.dtype != torch.bool:
        raise ValueError(
            f"retriever_bce_loss: positives must be a bool tensor shaped like scores {list(scores.shape)}, got "
            f"{positives.dtype} {list(positives.shape)}"
        )
    p = positives.to(scores.dtype)
    n = 1 - p
    pos = -(torch.log(scores + eps) * p).sum() / p.sum().clamp_min(1)
    neg = -(torch.log(1 - scores + eps) * n).sum() / n.sum().clamp_min(1)
    return (pos + negative_weight * neg) / (1 + negative_weight)
