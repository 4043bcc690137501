"""Backward of memory attention (issue 12, item 5): mplus's backward vs autograd through the pure-PyTorch reference.

One layer of M+ attention scaled to this machine: batch 1, Hq 32, Hkv 8, D 128, a chunk of Tq = Tk = 256 over a
memory of M = 2,561 rows (BOS + K0 2,560 long-term rows; the 10,240 short-term rows are a second segment of the same
op), keys stored before RoPE, fp32 and bf16. Both providers get the same inputs and the same upstream gradients of
``out`` and ``lse``, and time the backward only (the forward, and its saved tensors, are outside the timing):

* ``reference``: ``torch.autograd.grad`` through ``memory_attention_reference`` (concatenation, ``repeat_interleave``
  to 32 heads, the full ``[Tq, M + Tk]`` score and probability matrices held for the backward);
* ``mplus``: ``torch.autograd.grad`` through ``mplus_kernels.memory_attention`` (the C++ forward; the backward
  recomputes P per block of keys from the saved LSE, never holding ``[Tq, M + Tk]``).

``tflops`` counts the backward's 2.5× the forward's useful work: 4·D·Hq per visible pair for the forward, so
10·D·Hq per pair here (dV, dP, dQ, dK: four matmuls of 2·D each, plus the recompute of S: 2·D).
"""

from __future__ import annotations

import pytest
import torch

import mplus_kernels as mk
from mplus_kernels.attention.reference import memory_attention_reference

B, T, M, HQ, HKV, D = 1, 256, 2561, 32, 8, 128
DIFF = ("q", "k", "v", "mem_k", "mem_v")


def _inputs(dtype: torch.dtype) -> dict:
    g = torch.Generator().manual_seed(0)
    rnd = lambda *s: torch.randn(*s, generator=g).to(dtype)  # noqa: E731
    inv = 1.0 / (500000.0 ** (torch.arange(0, D, 2, dtype=torch.float32) / D))
    ang = torch.arange(M + T, dtype=torch.float32)[:, None] * inv[None]
    return {
        "q": rnd(B, T, HQ, D), "k": rnd(B, T, HKV, D), "v": rnd(B, T, HKV, D),
        "mem_k": rnd(B, M, HKV, D), "mem_v": rnd(B, M, HKV, D),
        "mem_pos": torch.randperm(M, generator=g).int(), "rope_cos": ang.cos(), "rope_sin": ang.sin(),
    }  # fmt: skip


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("provider", ["reference", "mplus"])
def test_attention_backward(benchmark, bench, provider, dtype):
    x = _inputs(dtype)
    leaves = {n: t.requires_grad_(n in DIFF) for n, t in x.items()}
    if provider == "reference":
        out, lse = memory_attention_reference(**leaves, causal=True)
    else:
        out, lse = mk.memory_attention(**leaves, causal=True)
    g = torch.Generator().manual_seed(1)
    go, gl = torch.randn(out.shape, generator=g).to(out.dtype), torch.randn(lse.shape, generator=g)
    inputs = [leaves[n] for n in DIFF]
    pairs = T * M + T * (T + 1) // 2
    bench(
        lambda: torch.autograd.grad((out, lse), inputs, (go, gl), retain_graph=True),
        group=f"attention_backward/Tq{T}/{str(dtype).replace('torch.', '')}",
        provider=provider,
        shape=f"B{B} Tq=Tk={T} M{M} H{HQ}/{HKV} D{D} causal",
        dtype=dtype,
        rounds=3,
    )
    benchmark.extra_info["tflops"] = 10 * D * HQ * pairs / benchmark.stats.stats.median / 1e12
