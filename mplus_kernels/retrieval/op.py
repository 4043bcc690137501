"""``torch.ops.mplus.retrieve_topk``: contract, validation, backend dispatch and fake kernel.

For queries Q ``[T, ds]`` and long-term keys ``[S1, ds]`` (+ optionally the not-yet-merged cache keys ``[S2, ds]``,
whose indices continue after S1), ``score(s) = mean_t sigmoid(q_t · k_s)`` in fp32, and the op returns the top
``min(k, S1 + S2)`` keys: indices ascending (the official ``sort(topk(...).indices)``) and their scores. Ties at the
K0 boundary go to the lower index, so the result is deterministic (SPEC.md §9 Q4). S = 0 returns empty tensors
(the official code hangs, Q5); k > S returns every key; any k is allowed.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .. import _backend
from .._utils import check_int, check_no_grad, check_same_device, check_tensor, register_no_backward
from .._utils import shape_str as _shape
from .reference import retrieve_topk_reference

OP = "mplus::retrieve_topk"
DTYPES = (torch.bfloat16, torch.float16, torch.float32)


def _check_matrix(name: str, t: object, rows: str) -> Tensor:
    check_tensor("retrieve_topk", name, t)
    if t.dim() != 2:
        raise ValueError(f"retrieve_topk: {name} must be a 2-D [{rows}, ds] tensor, got {t.dim()}-D {_shape(t)}")
    if t.dtype not in DTYPES:
        raise TypeError(f"retrieve_topk: {name} must be bfloat16, float16 or float32, got {t.dtype}")
    return t


def _unit_stride(t: Tensor) -> Tensor:
    """Kernels need unit stride along ds (any row stride is fine); copy only when that is not so."""
    return t if t.shape[1] <= 1 or t.stride(1) == 1 else t.contiguous()


def _validate(
    queries: Tensor, keys: Tensor, keys2: Tensor | None, k: object
) -> tuple[Tensor, Tensor, Tensor | None, int]:
    queries = _check_matrix("queries", queries, "T")
    if queries.shape[0] == 0:
        raise ValueError(
            "retrieve_topk: queries must have at least one row (the score is a mean over queries), got "
            f"{_shape(queries)}"
        )
    ds = queries.shape[1]
    keys = _check_matrix("keys", keys, "S1")
    candidates = [("keys", keys)]
    if keys2 is not None:
        keys2 = _check_matrix("keys2", keys2, "S2")
        candidates.append(("keys2", keys2))
    for name, t in candidates:
        if t.shape[1] != ds:
            raise ValueError(
                f"retrieve_topk: {name} {_shape(t)} has key width {t.shape[1]}, queries {_shape(queries)} have "
                f"ds={ds}; expected [{'S1' if name == 'keys' else 'S2'}, {ds}]"
            )
        if t.dtype != queries.dtype:
            raise TypeError(f"retrieve_topk: {name} has dtype {t.dtype}, queries have {queries.dtype}; they must match")
        if t.device != queries.device:
            raise ValueError(
                f"retrieve_topk: {name} is on {t.device}, queries on {queries.device}; they must share a device"
            )
    k = check_int("retrieve_topk", "k", k, minimum=0)
    return _unit_stride(queries), _unit_stride(keys), None if keys2 is None else _unit_stride(keys2), k


def retrieve_topk(
    queries: Tensor, keys: Tensor, k: int, *, keys2: Tensor | None = None, backend: str | None = None
) -> tuple[Tensor, Tensor]:
    """Top-k long-term-memory keys for a set of queries, fused (the ``[T, S]`` scores are never built).

    Args:
        queries: ``[T, ds]`` retriever queries (T >= 1), bf16 / fp16 / fp32.
        keys: ``[S1, ds]`` merged long-term keys, same dtype and device as ``queries``.
        k: how many keys to return (K0 = 2560 in M+); ``min(k, S1 + S2)`` are returned.
        keys2: optional ``[S2, ds]`` not-yet-merged cache keys; their indices are ``S1 + i``.
        backend: ``auto`` / ``cpp`` / ``triton`` / ``reference`` (default: ``MPLUS_BACKEND``, else auto).

    Returns:
        ``(indices, scores)``: int64 ``[min(k, S1 + S2)]`` ascending, and fp32 ``scores[i] = mean_t
        sigmoid(q_t · k_indices[i])``. Among equal scores at the boundary the lower index is kept.

    Raises ``ValueError``/``TypeError`` naming the argument before any launch when an input is malformed, and
    ``BackendUnavailableError`` when the chosen backend cannot run. Keys and queries are used in place when their
    last dimension has unit stride (any row stride), otherwise copied. NaN inputs give an unspecified selection.
    """
    queries, keys, keys2, k = _validate(queries, keys, keys2, k)
    check_no_grad("retrieve_topk", {"queries": queries, "keys": keys, "keys2": keys2})
    which = _backend.resolve("retrieve_topk", queries.device, backend)
    if _backend.through_dispatcher(which, queries.device):
        return torch.ops.mplus.retrieve_topk(queries, keys, keys2, k)
    if which == "triton":
        return _backend.import_triton_impl("retrieval").retrieve_topk_fwd(queries, keys, keys2, k)
    return retrieve_topk_reference(queries, keys, k, keys2=keys2)


def _register() -> None:
    """Fake kernel (for torch.compile / FakeTensor) and the CUDA → Triton kernel, when the schema exists."""
    if not _backend.cpp_available():
        return

    register_no_backward(OP, ("queries", "keys", "keys2", "k"))

    @torch.library.register_fake(OP)
    def _fake(queries, keys, keys2, k):
        check_same_device("retrieve_topk", "queries", queries.device, {"keys": keys, "keys2": keys2})
        total = keys.shape[0] + (keys2.shape[0] if keys2 is not None else 0)
        k0 = torch.sym_min(k, total)
        return (
            queries.new_empty((k0,), dtype=torch.int64),
            queries.new_empty((k0,), dtype=torch.float32),
        )

    @torch.library.impl(OP, "CUDA")
    def _cuda(queries, keys, keys2, k):
        return _backend.import_triton_impl("retrieval").retrieve_topk_fwd(
            _unit_stride(queries), _unit_stride(keys), None if keys2 is None else _unit_stride(keys2), k
        )


_register()
