"""Retriever scoring + top-K0 at M+ shapes: the fused op vs the official-style reference and a chunked PyTorch version.

M+ retrieval (SPEC.md §5.2): T prompt queries (256 or 2,048), S long-term keys (25,600 = 10 injections, 153,600 =
the LTM cap, 1,000,000 = an oversized store), ds 256, K0 2,560, bf16 (the model dtype) and fp32. Providers, on the
same inputs:

* ``official``: ``sigmoid(Q @ Kᵀ).mean(0)`` as model-dtype tensors, ``topk``, ``sort`` (materialises [T, S] twice);
* ``chunked``: fp32 scores in ``[T, chunk]`` tiles of ~16 MiB, then a threshold select (pure PyTorch);
* ``mplus``: ``mplus_kernels.retrieve_topk`` (the C++ kernel on CPU).

``gflops`` counts the 2·T·S·ds of the dot products only. The official provider at S = 1M is run once per shape (it
takes ~17 s and 7.6 GiB in bf16 at T 2048): its time comes from that one call, which also measures its memory. At
T 2048 / S 1M in fp32 it would need ~16 GiB (two [2048, 1M] fp32 matrices) on a 24 GiB machine shared with other
jobs, so that one case is skipped. Every provider of a shape runs the same rounds: 3 at S = 25,600, 2 at S = 153,600,
1 at S = 1M, each after an untimed warm-up call (but the official at S = 1M: its one call), so the whole file stays
within minutes.

Retriever scores for training (``test_retriever_scores_fwd_bwd``, SPEC.md §7.1): ``w = mean_t sigmoid(q_t·k)`` over
the short-term rows of every layer, forward and backward (``torch.autograd.grad`` of ``w`` with a fixed upstream
gradient, so one timed call is the whole training step of the op). M+ trains with L 32 layers, N 10,240 STM rows, ds
256 and up to ~512 query tokens; scaled here to L 2, N 2,048 (T 512, ds 256), fp32 and bf16. Providers:
``reference`` (``retriever_scores_reference``: fp32 matmuls, the ``[L, T, N]`` scores held for its backward) and
``mplus`` (``retriever_scores``, the C++ kernels on CPU, recomputing the scores per tile). ``gflops`` counts the useful
6·L·T·N·ds (QKᵀ of the forward and the two gradient products), not the backward's recomputation of QKᵀ.
"""

from __future__ import annotations

import gc

import pytest
import torch

import mplus_kernels as mk
from mplus_kernels.retrieval.scores import retriever_scores, retriever_scores_reference
from mplus_kernels.testing import measure_peak_memory, mplus_providers, peak_memory_available

DS, K0 = 256, 2560
T_MAX = 2048
PROVIDERS = {
    "official": mk.official_retrieve_reference,
    "chunked": mk.retrieve_topk_chunked,
    **{name: mk.retrieve_topk for name in mplus_providers()},  # mplus@<level>: MPLUS_BENCH_ISAS (conftest)
}

_cache: dict[tuple[int, torch.dtype], tuple[torch.Tensor, torch.Tensor]] = {}


def _inputs(s: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Queries [2048, ds] and keys [S, ds] with q·k ~ N(0, 1); one (S, dtype) pair kept alive at a time."""
    key = (s, dtype)
    if key not in _cache:
        _cache.clear()
        gc.collect()
        gen = torch.Generator().manual_seed(s)
        std = DS**-0.25
        queries = (torch.randn(T_MAX, DS, generator=gen) * std).to(dtype)
        keys = torch.empty(s, DS, dtype=dtype)
        for s0 in range(0, s, 1 << 17):  # in slices: no 1 GiB fp32 temporary for bf16 keys
            keys[s0 : s0 + (1 << 17)] = torch.randn(min(1 << 17, s - s0), DS, generator=gen) * std
        _cache[key] = (queries, keys)
    return _cache[key]


# Parametrisation order (top varies fastest): all providers and T for one (S, dtype) before the next inputs.
@pytest.mark.parametrize("provider", list(PROVIDERS))
@pytest.mark.parametrize("t", [256, 2048])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
@pytest.mark.parametrize("s", [25_600, 153_600, 1_000_000])
def test_retrieval(bench, benchmark, provider, t, dtype, s):
    big_official = provider == "official" and s >= 1_000_000
    if provider == "official" and 2 * t * s * dtype.itemsize > 8 * 2**30:
        pytest.skip(f"official at T{t}/S{s}/{dtype} needs ~16 GiB ([T, S] scores + sigmoid copy); machine has 24 GiB")
    queries, keys = _inputs(s, dtype)
    q = queries[:t]
    impl = PROVIDERS[provider]

    def fn():
        return impl(q, keys, K0)

    common = {
        "group": f"retrieval/T{t}/S{s}/{dtype}".replace("torch.", ""),
        "provider": provider,
        "shape": f"T{t} S{s} ds{DS} K0{K0}",
        "dtype": dtype,
    }
    if big_official:  # one call in all: timed, and metered from inside (the meter costs microseconds)
        box = {}

        def once():
            box["out"], box["peak"] = measure_peak_memory(fn) if peak_memory_available() else (fn(), None)

        bench(once, rounds=1, warmup_rounds=0, measure_memory=False, **common)
        if box["peak"] is not None:
            benchmark.extra_info["peak_extra_bytes"] = box["peak"]
    else:
        rounds, warmup = (1, 0) if s >= 1_000_000 else (2, 0) if s >= 153_600 else (3, 1)
        bench(fn, rounds=rounds, warmup_rounds=warmup, **common)
    benchmark.extra_info["gflops"] = 2 * t * s * DS / benchmark.stats.stats.median / 1e9


# --- retriever scores for training: forward + backward ------------------------------------------------------------
SCORES_L, SCORES_T, SCORES_N = 2, 512, 2048  # M+: 32 layers, up to ~512 queries, 10,240 STM rows (ds 256)
SCORES_PROVIDERS = {"reference": retriever_scores_reference, **{name: retriever_scores for name in mplus_providers()}}


@pytest.mark.parametrize("provider", list(SCORES_PROVIDERS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_retriever_scores_fwd_bwd(bench, benchmark, provider, dtype):
    n_layers, t, n = SCORES_L, SCORES_T, SCORES_N
    gen = torch.Generator().manual_seed(0)
    std = DS**-0.25  # q·k ~ N(0, 1)
    queries = (torch.randn(n_layers, t, DS, generator=gen) * std).to(dtype)
    keys = (torch.randn(n_layers, n, DS, generator=gen) * std).to(dtype)
    upstream = torch.randn(n_layers, n, generator=gen)
    impl = SCORES_PROVIDERS[provider]

    def fn():
        q, k = queries.detach().requires_grad_(), keys.detach().requires_grad_()
        return torch.autograd.grad(impl(q, k), (q, k), upstream)

    bench(
        fn,
        group=f"retriever_scores_fwd_bwd/L{n_layers}/T{t}/N{n}/{dtype}".replace("torch.", ""),
        provider=provider,
        shape=f"L{n_layers} T{t} N{n} ds{DS} (M+: L32 N10240)",
        dtype=dtype,
        rounds=5,
    )
    benchmark.extra_info["gflops"] = 6 * n_layers * t * n * DS / benchmark.stats.stats.median / 1e9
