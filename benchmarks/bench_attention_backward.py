"""Backward of memory attention (issue 12, item 5): mplus's backward vs autograd through the pure-PyTorch reference.

One layer of M+ attention scaled to this machine: batch 1, Hq 32, Hkv 8, D 128, a chunk of Tq = Tk = 256 over a
memory of M = 2,561 rows (BOS + K0 2,560 long-term rows; the 10,240 short-term rows are a second segment of the same
op), keys stored before RoPE, fp32 and bf16. Both providers get the same inputs and the same upstream gradients of
``out`` and ``lse``, and time the backward only (the forward, and its saved tensors, are outside the timing):

* ``reference``: ``torch.autograd.grad`` through ``memory_attention_reference`` (concatenation, ``repeat_interleave``
  to 32 heads, the full ``[Tq, M + Tk]`` score and probability matrices held for the backward);
* ``sdpa_gqa``: ``torch.autograd.grad`` through what a user would write with PyTorch alone: the memory keys rotated
  (fp32 rotation, like mplus) and concatenated with the chunk, ``scaled_dot_product_attention`` with
  ``enable_gqa=True`` and a ``causal_lower_right`` bias (no repeat_kv, no mask tensor); its gradient of ``out`` only
  (SDPA returns no LSE), the same upstream gradient;
* ``mplus``: ``torch.autograd.grad`` through ``mplus_kernels.memory_attention`` (the C++ forward; the backward
  recomputes P per block of keys from the saved LSE, never holding ``[Tq, M + Tk]``); ``mplus@<level>`` the same at
  another ISA level (``MPLUS_BENCH_ISAS``, conftest).

``tflops`` counts the backward's 2.5× the forward's useful work: 4·D·Hq per visible pair for the forward, so
10·D·Hq per pair here (dV, dP, dQ, dK: four matmuls of 2·D each, plus the recompute of S: 2·D).
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch.nn.attention.bias import causal_lower_right

import mplus_kernels as mk
from mplus_kernels.attention.reference import apply_rope, memory_attention_reference
from mplus_kernels.testing import mplus_providers

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


def _sdpa_gqa(x: dict) -> torch.Tensor:
    """The PyTorch-only attention of the same inputs, differentiable in every DIFF input: [B, T, HQ, D]."""
    mem_k = apply_rope(x["mem_k"].float(), x["mem_pos"], x["rope_cos"], x["rope_sin"]).to(x["k"].dtype)
    keys = torch.cat([mem_k, x["k"]], 1).transpose(1, 2)
    values = torch.cat([x["mem_v"], x["v"]], 1).transpose(1, 2)
    bias = causal_lower_right(T, M + T)
    out = F.scaled_dot_product_attention(
        x["q"].transpose(1, 2), keys, values, attn_mask=bias, enable_gqa=True, scale=1.0 / math.sqrt(D)
    )
    return out.transpose(1, 2)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("provider", ["reference", "sdpa_gqa", *mplus_providers()])
def test_attention_backward(benchmark, bench, provider, dtype):
    x = _inputs(dtype)
    leaves = {n: t.requires_grad_(n in DIFF) for n, t in x.items()}
    lse = None
    if provider == "reference":
        out, lse = memory_attention_reference(**leaves, causal=True)
    elif provider == "sdpa_gqa":
        out = _sdpa_gqa(leaves)
    else:
        out, lse = mk.memory_attention(**leaves, causal=True)
    g = torch.Generator().manual_seed(1)
    go = torch.randn(out.shape, generator=g).to(out.dtype)
    gl = torch.randn((B, HQ, T), generator=g)  # the lse's upstream gradient (drawn for every provider: same go)
    outputs, grads = ((out, lse), (go, gl)) if lse is not None else ((out,), (go,))
    inputs = [leaves[n] for n in DIFF]
    pairs = T * M + T * (T + 1) // 2
    bench(
        lambda: torch.autograd.grad(outputs, inputs, grads, retain_graph=True),
        group=f"attention_backward/Tq{T}/{str(dtype).replace('torch.', '')}",
        provider=provider,
        shape=f"B{B} Tq=Tk={T} M{M} H{HQ}/{HKV} D{D} causal",
        dtype=dtype,
        rounds=3,
    )
    benchmark.extra_info["tflops"] = 10 * D * HQ * pairs / benchmark.stats.stats.median / 1e12
