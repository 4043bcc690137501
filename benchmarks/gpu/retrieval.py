"""Retriever scoring + top-K0 on the GPU at M+ sizes: the fused Triton kernels vs chunked PyTorch.

T 2,048 queries, ds 256, S = 153,600 (the full M+ long-term memory) and 1,000,000 keys, K0 2,560, bf16.
score(s) = mean_t sigmoid(q_t · k_s), then the top K0 (indices ascending). Providers:

* ``mplus``: ``mplus_kernels.retrieve_topk`` (fused: the [T, S] scores are never built; peak extra memory O(S));
* ``torch_chunked_fp32``: ``retrieve_topk_chunked`` (the package's pure-PyTorch version: fp32 [T, chunk] tiles,
  sigmoid, mean, threshold select), on the device;
* ``torch_chunked_bf16``: the fastest plain PyTorch: bf16 tensor-core matmul of [T, 32768]-key tiles, fp32
  sigmoid + mean, ``torch.topk`` + sort.

``selection_overlap_vs_mplus`` is the fraction of mplus's K0 indices a peer also selected (1.0 = same set).
"""

from __future__ import annotations

import torch

import mplus_kernels as mk
from mplus_kernels.retrieval import retrieve_topk_chunked

from ._harness import Recorder

T, DS, K0 = 2048, 256, 2560
SIZES = (153_600, 1_000_000)
DTYPE = torch.bfloat16
TILE = 32_768


def _torch_bf16(q: torch.Tensor, keys: torch.Tensor):
    scores = torch.empty(keys.shape[0], dtype=torch.float32, device="cuda")

    def fn():
        for s0 in range(0, keys.shape[0], TILE):
            tile = (q @ keys[s0 : s0 + TILE].T).float()  # [T, tile], bf16 matmul with fp32 accumulation
            scores[s0 : s0 + tile.shape[1]] = tile.sigmoid_().mean(dim=0)
        top = torch.topk(scores, min(K0, scores.shape[0]))
        idx, order = top.indices.sort()
        return idx, top.values[order]

    return fn


def _overlap(ref_idx: torch.Tensor):
    def check(out) -> dict:
        idx = out[0]
        common = torch.isin(idx, ref_idx).sum()
        return {"selection_overlap_vs_mplus": float(common) / max(1, ref_idx.numel())}

    return check


def _one_size(rec: Recorder, s: int) -> None:
    group = f"retrieval/S{s}"
    shape = f"T{T} S{s} ds{DS} K0{K0}"
    try:
        g = torch.Generator(device="cuda").manual_seed(s)
        q = (torch.randn(T, DS, generator=g, device="cuda") / DS**0.5).to(DTYPE)
        keys = torch.randn(s, DS, generator=g, device="cuda").to(DTYPE)
    except Exception as exc:
        rec.note(group, error=f"inputs: {type(exc).__name__}: {exc}")
        return
    common = {"shape": shape, "dtype": DTYPE, "flops": 2 * T * s * DS, "moved_bytes": (s + T) * DS * 2}
    out = rec.measure(group, "mplus", lambda: lambda: mk.retrieve_topk(q, keys, K0), **common)
    check = _overlap(out[0]) if out is not None else None
    rec.measure(group, "torch_chunked_bf16", lambda: _torch_bf16(q, keys), check=check, **common)
    rec.measure(
        group, "torch_chunked_fp32", lambda: lambda: retrieve_topk_chunked(q, keys, K0), check=check,
        min_budget_s=4.0, **common,
    )  # fmt: skip


def run(rec: Recorder) -> None:
    for s in SIZES:
        _one_size(rec, s)
        torch.cuda.empty_cache()
