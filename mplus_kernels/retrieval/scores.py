"""Retriever scores for training (issue 12, item 2; SPEC.md §7.1, §7.3): ``w = mean_t sigmoid(q_t · k_n)`` with a
backward, and the BCE objective the official training code minimises.

``retriever_scores(queries [L, T, ds], keys [L, N, ds]) -> w [L, N]`` is a custom op (``mplus::retriever_scores``)
whose backward recomputes the scores per block of keys instead of keeping the ``[L, T, N]`` sigmoid matrix:
with ``σ' = σ(1 − σ)``, ``dq_t = (1/T) Σ_n g_n σ'(q_t·k_n) k_n`` and ``dk_n = (g_n/T) Σ_t σ'(q_t·k_n) q_t``.
It is PyTorch on every device for now (blocked matmuls); a C++ / Triton kernel of the same recurrence is next.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .._utils import check_tensor

BLOCK = 4096  # keys per recomputed block


def _check(queries: Tensor, keys: Tensor) -> None:
    fn = "retriever_scores"
    check_tensor(fn, "queries", queries)
    check_tensor(fn, "keys", keys)
    if not queries.is_floating_point():
        raise TypeError(f"{fn}: queries must be a floating tensor, got {queries.dtype}")
    if queries.dim() != 3 or keys.dim() != 3 or queries.shape[0] != keys.shape[0] or queries.shape[2] != keys.shape[2]:
        raise ValueError(
            f"{fn}: queries must be [L, T, ds] and keys [L, N, ds] with the same L and ds, got "
            f"{list(queries.shape)} and {list(keys.shape)}"
        )
    if queries.shape[1] == 0:
        raise ValueError(f"{fn}: queries {list(queries.shape)} hold no query (T = 0): the mean is undefined")
    if keys.dtype != queries.dtype or keys.device != queries.device:
        raise ValueError(
            f"{fn}: keys are {keys.dtype} on {keys.device}, queries {queries.dtype} on {queries.device}; they must "
            "match"
        )


@torch.library.custom_op("mplus::retriever_scores", mutates_args=())
def _retriever_scores(queries: Tensor, keys: Tensor) -> Tensor:
    acc = torch.float64 if queries.dtype == torch.float64 else torch.float32
    q, k = queries.to(acc), keys.to(acc)
    out = [torch.sigmoid(q @ k[:, lo : lo + BLOCK].transpose(1, 2)).mean(1) for lo in range(0, k.shape[1], BLOCK)]
    return (torch.cat(out, 1) if out else q.new_zeros(q.shape[0], 0)).to(torch.float32 if acc != torch.float64 else acc)


@_retriever_scores.register_fake
def _(queries: Tensor, keys: Tensor) -> Tensor:
    dtype = torch.float64 if queries.dtype == torch.float64 else torch.float32
    return queries.new_empty((queries.shape[0], keys.shape[1]), dtype=dtype)


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


_retriever_scores.register_autograd(_backward, setup_context=lambda ctx, inputs, output: ctx.save_for_backward(*inputs))


def retriever_scores(queries: Tensor, keys: Tensor) -> Tensor:
    """``w [L, N] = mean_t sigmoid(queries[l, t] · keys[l, n])`` (fp32; fp64 for fp64 inputs), differentiable in
    both arguments. ``queries [L, T, ds]`` (e.g. ``query_proj`` of a chunk's normalised tokens, SPEC.md §7.1),
    ``keys [L, N, ds]`` (``key_proj`` of the short-term rows)."""
    _check(queries, keys)
    return _retriever_scores(queries, keys)


def retriever_bce_loss(scores: Tensor, positives: Tensor, negative_weight: float = 1.0, eps: float = 1e-5) -> Tensor:
    """The official selector loss (SPEC.md §7.3, ``selector_loss_type = bce``) over all layers jointly:
    ``L_pos = mean_pos −log(w + eps)``, ``L_neg = mean_neg −log(1 − w + eps)``, ``(L_pos + λ·L_neg) / (1 + λ)``.

    ``scores [L, N]`` (:func:`retriever_scores`), ``positives [L, N]`` bool: the rows that hold the document's memory
    (the tracked indicator of SPEC.md §7.2); every other row is a negative. A side with no row contributes 0 (the
    official code would produce NaN)."""
    check_tensor("retriever_bce_loss", "scores", scores)
    check_tensor("retriever_bce_loss", "positives", positives)
    if positives.shape != scores.shape or positives.dtype != torch.bool:
        raise ValueError(
            f"retriever_bce_loss: positives must be a bool tensor shaped like scores {list(scores.shape)}, got "
            f"{positives.dtype} {list(positives.shape)}"
        )
    zero = scores.sum() * 0
    pos = -torch.log(scores[positives] + eps).mean() if bool(positives.any()) else zero
    neg = -torch.log(1 - scores[~positives] + eps).mean() if bool((~positives).any()) else zero
    return (pos + negative_weight * neg) / (1 + negative_weight)
