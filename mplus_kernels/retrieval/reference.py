"""Pure-PyTorch references of retriever scoring + top-K (SPEC.md §3.3, §5.2 step 3, §9 Q4/Q5/P2; DESIGN.md §2.3).

Three functions with the op's signature ``(queries, keys, k, *, keys2=None) -> (indices, scores)``:

* :func:`retrieve_topk_reference` is the contract, written to be read: fp32 scores of every key, a *stable*
  descending sort (so among equal scores the lower index comes first), the first ``min(k, S)``, indices ascending.
  The scores are computed in float64 and rounded to fp32: a BLAS fp32 GEMM may round identical key columns
  differently depending on where they sit in its tiles, which would break exact ties between identical keys; in
  float64 those differences vanish in the final rounding. It materialises the ``[T, S]`` score matrix: fine for
  tests, not for S = 1M.
* :func:`official_retrieve_reference` is the official ``get_ltm`` step 3 pattern: ``matmul``, ``sigmoid`` and
  ``mean`` as tensors of the model dtype (bf16 in M+), ``topk``, then an ascending ``sort`` of the indices. Its scores
  are quantised (≈2⁻⁹ near 0.5) and its tie order is whatever ``topk`` does (SPEC.md §9 Q4). Benchmarks use it as the
  "official-style reference". The official small-LTM branch (S < K0: duplicated indices, no scoring, a hang at S = 0,
  SPEC.md §5.2 step 2, Q5) is *not* reproduced: here k > S simply returns all S keys.
* :func:`retrieve_topk_chunked` is a reasonable pure-PyTorch implementation: fp32 scores in chunks of keys (the
  ``[T, chunk]`` tile is ~16 MiB), then a threshold select with the same tie rule as the reference. It is the second
  benchmark provider (what one would write without custom kernels). The tile size matters on a busy machine: each
  chunk runs several OpenMP regions (GEMM, sigmoid, mean), and with 4 MiB tiles their synchronisation made it ~2.7×
  slower than with 16 MiB tiles here (T 2048, 2 shared cores), so the larger tile is the default.
"""

from __future__ import annotations

import torch
from torch import Tensor


def _key_ranges(keys: Tensor, keys2: Tensor | None) -> list[Tensor]:
    return [keys] if keys2 is None else [keys, keys2]


def _empty_result(queries: Tensor) -> tuple[Tensor, Tensor]:
    device = queries.device
    return torch.empty(0, dtype=torch.int64, device=device), torch.empty(0, dtype=torch.float32, device=device)


def retrieval_scores_reference(queries: Tensor, keys: Tensor, *, keys2: Tensor | None = None) -> Tensor:
    """``score[s] = mean_t sigmoid(q_t · k_s)`` for every key of ``cat(keys, keys2)``: fp32 ``[S1 + S2]``
    (computed in float64, then rounded)."""
    all_keys = torch.cat(_key_ranges(keys, keys2)).double()
    return torch.sigmoid(queries.double() @ all_keys.T).mean(dim=0).float()


def retrieve_topk_reference(
    queries: Tensor, keys: Tensor, k: int, *, keys2: Tensor | None = None
) -> tuple[Tensor, Tensor]:
    """Reference of ``torch.ops.mplus.retrieve_topk`` (same contract; see ``op.retrieve_topk``).

    Args:
        queries: ``[T, ds]``.
        keys: ``[S1, ds]`` long-term keys; ``keys2``: optional ``[S2, ds]`` second range, indices continue after S1.
        k: number of keys to return (``min(k, S1 + S2)`` are returned).

    Returns:
        ``indices`` int64 ``[min(k, S)]`` ascending, and their fp32 ``scores``.
    """
    scores = retrieval_scores_reference(queries, keys, keys2=keys2)
    k0 = min(k, scores.numel())
    best_first = torch.sort(scores, descending=True, stable=True).indices  # equal scores: lower index first
    indices = best_first[:k0].sort().values
    return indices, scores[indices]


def official_retrieve_reference(
    queries: Tensor, keys: Tensor, k: int, *, keys2: Tensor | None = None
) -> tuple[Tensor, Tensor]:
    """The official scoring + selection (SPEC.md §5.2 step 3), in the inputs' dtype.

    ``score = sigmoid(queries @ keys.T).mean(0)`` per key range, concatenated, ``topk``, ascending ``sort``. Returns
    the indices and their (model-dtype) scores converted to fp32.
    """
    score = torch.cat([torch.sigmoid(torch.matmul(queries, part.T)).mean(dim=0) for part in _key_ranges(keys, keys2)])
    k0 = min(k, score.numel())
    selected = torch.topk(score, k0).indices.sort().values
    return selected, score[selected].float()


def select_topk_ascending(scores: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """Top ``min(k, S)`` of fp32 ``scores`` without a full sort: indices ascending, ties to the lower index.

    The k-th largest value ``tau`` comes from ``topk``; every score above ``tau`` is taken, and of the scores equal to
    ``tau`` the lowest indices fill the rest. The result equals :func:`retrieve_topk_reference`'s selection.
    """
    k0 = min(k, scores.numel())
    if k0 == 0:
        return _empty_result(scores)
    tau = torch.topk(scores, k0, sorted=False).values.min()
    above = (scores > tau).nonzero().squeeze(1)
    ties = (scores == tau).nonzero().squeeze(1)[: k0 - above.numel()]
    indices = torch.cat([above, ties]).sort().values
    return indices, scores[indices]


def retrieve_topk_chunked(
    queries: Tensor, keys: Tensor, k: int, *, keys2: Tensor | None = None, chunk_elems: int = 1 << 22
) -> tuple[Tensor, Tensor]:
    """Chunked pure-PyTorch scoring (fp32, ``[T, chunk]`` tiles of ``chunk_elems`` elements) + threshold select."""
    q = queries.float()
    chunk = max(1, chunk_elems // max(1, q.shape[0]))
    ranges = _key_ranges(keys, keys2)
    scores = torch.empty(sum(r.shape[0] for r in ranges), dtype=torch.float32, device=queries.device)
    offset = 0
    for part in ranges:
        for s0 in range(0, part.shape[0], chunk):
            tile = q @ part[s0 : s0 + chunk].float().T  # [T, chunk] fp32
            scores[offset + s0 : offset + s0 + tile.shape[1]] = tile.sigmoid_().mean(dim=0)
        offset += part.shape[0]
    return select_topk_ascending(scores, k)
