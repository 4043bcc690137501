"""End to end: the M+ model with real Llama-3.1-8B layer widths, fused kernels vs their pure-PyTorch references.

Real widths (d 4,096, 32/8 heads, D 128, intermediate 14,336, vocab 128,256, N 10,240, K0 2,560, a 51,200-row
long-term memory per layer plus a 15,104-row cache) but only ``LAYERS`` layers, which is what this machine's 24 GiB
holds next to both paths' working memory. Weights and memory are random (no 8B checkpoint here; values do not change
the work done). One model instance serves both providers (``set_kernels``), so both see the same weights and inputs.

Phases: inject a 512-token chunk; prefill a 2,048-token prompt (logits of the last position only); decode 16
tokens (one token per step over the cached prefix).
"""

from __future__ import annotations

import pytest
import torch

from mplus.checkpoint import refresh_memory_kv
from mplus.config import MPlusConfig
from mplus.model import MPlusForCausalLM

LAYERS = 2
DTYPE = torch.bfloat16
LTM_ROWS, INJECT, PROMPT, DECODE = 51_200, 512, 2048, 16


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    config = MPlusConfig.mplus_8b(num_hidden_layers=LAYERS)
    m = MPlusForCausalLM(config, dtype=DTYPE, max_length=PROMPT + DECODE, ltm_capacity=LTM_ROWS + 60 * 256)
    m.eval()
    with torch.no_grad():
        for p in m.parameters():
            p.normal_(0, 0.02)
        m.stm.hidden.normal_()
        refresh_memory_kv(m)
        kv = (config.num_key_value_heads, config.head_dim)
        for layer in range(LAYERS):
            m.ltm.append_rows_(
                layer,
                torch.randn(LTM_ROWS, config.hidden_size).to(DTYPE),
                torch.randn(LTM_ROWS, config.selector_hidden_dim).to(DTYPE),
                torch.arange(LTM_ROWS, dtype=torch.float64) * 3,
                torch.full((LTM_ROWS,), 10.0),
                (torch.randn(LTM_ROWS, *kv).to(DTYPE), torch.randn(LTM_ROWS, *kv).to(DTYPE)),
            )
        # a cache of 58 updates' dropped rows: near the largest scoring set, and one more inject does not merge
        for _ in range(58):
            m.ltm.push_dropped(
                torch.randn(LAYERS, 256, config.selector_hidden_dim).to(DTYPE),
                hidden=torch.randn(LAYERS, 256, config.hidden_size).to(DTYPE),
                age=torch.zeros(LAYERS, 256, dtype=torch.float64),
                kv=(torch.randn(LAYERS, 256, *kv).to(DTYPE), torch.randn(LAYERS, 256, *kv).to(DTYPE)),
            )
    return m


SHAPE = f"{LAYERS} layers x (d4096, 32/8 heads, ffn 14336), N10240, K0 2560, LTM {LTM_ROWS}+14848"
PROVIDERS = {"reference": "reference", "fused": "mplus"}


@pytest.mark.parametrize("kernels", ["reference", "fused"])
def test_inject(bench, model, kernels):
    model.set_kernels(kernels)
    ids = torch.randint(0, 128256, (1, INJECT))
    snapshot = model.ltm.update_step, model.ltm.cache_len

    def inject():
        model.inject(ids)
        # keep the long-term cache just below its merge point, so every round does the same work
        model.ltm.update_step, model.ltm.cache_len = snapshot

    bench(
        inject,
        group="model/inject512",
        provider=PROVIDERS[kernels],
        shape=SHAPE,
        dtype=DTYPE,
        rounds=3,
        tokens_per_s_tokens=INJECT,
    )


@pytest.mark.parametrize("kernels", ["reference", "fused"])
def test_prefill(bench, model, kernels):
    model.set_kernels(kernels)
    ids = torch.randint(0, 128256, (1, PROMPT))
    bench(
        lambda: model(ids, past_key_values=model.new_cache(), logits_to_keep=1),
        group="model/prefill2048",
        provider=PROVIDERS[kernels],
        shape=SHAPE,
        dtype=DTYPE,
        rounds=2,
        tokens_per_s_tokens=PROMPT,
    )


@pytest.mark.parametrize("kernels", ["reference", "fused"])
def test_decode(bench, model, kernels):
    model.set_kernels(kernels)
    cache = model.new_cache()
    model(torch.randint(0, 128256, (1, PROMPT)), past_key_values=cache, logits_to_keep=1)
    start = cache.length
    token = torch.tensor([[42]])

    def decode():
        for layer_cache in cache.layers:
            layer_cache.length = start  # rewind: every round decodes the same 16 positions
        for _ in range(DECODE):
            model(token, past_key_values=cache, logits_to_keep=1)

    bench(
        decode,
        group="model/decode16",
        provider=PROVIDERS[kernels],
        shape=SHAPE,
        dtype=DTYPE,
        rounds=3,
        tokens_per_s_tokens=DECODE,
    )
