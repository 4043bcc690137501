"""End to end: the M+ model with real Llama-3.1-8B layer widths, against a plain Llama, the official computation and
its own pure-PyTorch references.

Real widths (d 4,096, 32/8 heads, D 128, intermediate 14,336, vocab 128,256, N 10,240, K0 2,560, a 51,200-row
long-term memory per layer plus a 15,104-row cache) but only ``LAYERS`` layers, which is what this machine's 24 GiB
holds next to the providers' working memory. Weights and memory are random (no 8B checkpoint here; values do not change
the work done). One model instance serves every provider, so all see the same weights and inputs:

* ``mplus``: the model on its fused kernels (``set_kernels("fused")``);
* ``reference``: the same model on the pure-PyTorch references of every op (``set_kernels("reference")``);
* ``official_sdpa``: the model with its attention computed as the official ``modeling_mplus.py``'s SDPA path does
  (``model_peers.official_attention``: the memory keys rotated, ``[memory ; chunk]`` concatenated, ``repeat_kv``, a
  boolean mask, SDPA — every layer, every forward; the rest on the fused kernels, the memory K/V cached);
* ``llama_sdpa``: a plain ``transformers.LlamaForCausalLM`` with the same base weights (shared, no memory, no LoRA),
  SDPA attention and its own ``DynamicCache`` (``model_peers.plain_llama``). M+'s time over its time is M+'s
  overhead; the report prints it.

Phases: inject a 512-token chunk (the plain Llama: a prefill of the 512 tokens into its KV cache, its way of taking in
a context); prefill a 2,048-token prompt (logits of the last position only); decode 16 tokens (one token per step over
the cached prefix; each provider decodes from the cache of its own prefill benchmark when that ran). Decode records
``moved_bytes``, what one step must read at least (the weights but the embedding table, the memory's K/V for M+, the
cached K/V), so the report gives it as a fraction of the machine's read bandwidth. Inference runs under ``no_grad``, as
``generate`` does. Every provider of a phase runs the same rounds.
"""

from __future__ import annotations

import contextlib

import pytest
import torch
from model_peers import llama_weight_bytes, official_attention, plain_llama
from transformers import DynamicCache

from mplus.checkpoint import refresh_memory_kv
from mplus.config import MPlusConfig
from mplus.model import MPlusForCausalLM

LAYERS = 2
DTYPE = torch.bfloat16
LTM_ROWS, INJECT, PROMPT, DECODE = 51_200, 512, 2048, 16
PROVIDERS = ["reference", "mplus", "official_sdpa", "llama_sdpa"]
LLAMA_VARIANT = "transformers LlamaForCausalLM, same base weights, SDPA, DynamicCache, no memory"
_PREFILLED: dict[str, object] = {}  # provider -> the cache its prefill benchmark left (its decode starts from it)


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
    _PREFILLED.clear()
    yield m
    _PREFILLED.clear()


@pytest.fixture(scope="module")
def llama(model):
    """The plain Llama of the model's widths, on its base weights (no copy)."""
    return plain_llama(model)


SHAPE = f"{LAYERS} layers x (d4096, 32/8 heads, ffn 14336), N10240, K0 2560, LTM {LTM_ROWS}+14848"


def as_provider(model: MPlusForCausalLM, provider: str) -> contextlib.AbstractContextManager:
    """Set ``model`` up for an M+ provider (its kernels; for ``official_sdpa`` the official attention, within the
    block). The plain Llama needs nothing."""
    model.set_kernels("reference" if provider == "reference" else "fused")
    return official_attention(model) if provider == "official_sdpa" else contextlib.nullcontext()


def variant(provider: str) -> dict[str, str]:
    return {"variant": LLAMA_VARIANT} if provider == "llama_sdpa" else {}


@pytest.mark.parametrize("provider", PROVIDERS)
def test_inject(bench, model, llama, provider):
    ids = torch.randint(0, 128256, (1, INJECT))
    if provider == "llama_sdpa":

        @torch.no_grad()
        def inject():
            return llama(ids, use_cache=True, logits_to_keep=1)
    else:
        snapshot = model.ltm.update_step, model.ltm.cache_len

        def inject():
            model.inject(ids)
            # keep the long-term cache just below its merge point, so every round does the same work
            model.ltm.update_step, model.ltm.cache_len = snapshot

    with as_provider(model, provider):
        bench(
            inject,
            group="model/inject512",
            provider=provider,
            shape=SHAPE,
            dtype=DTYPE,
            rounds=3,
            quick_rounds=1,
            tokens_per_s_tokens=INJECT,
            **variant(provider),
        )


def _prefill(model, llama, provider: str, ids: torch.Tensor):
    """One prefill of ``ids`` with a fresh cache; returns the model output (its ``past_key_values``)."""
    if provider == "llama_sdpa":
        with torch.no_grad():
            return llama(ids, past_key_values=DynamicCache(config=llama.config), use_cache=True, logits_to_keep=1)
    return model(ids, past_key_values=model.new_cache(), logits_to_keep=1)


@pytest.mark.parametrize("provider", PROVIDERS)
def test_prefill(bench, model, llama, provider):
    ids = torch.randint(0, 128256, (1, PROMPT))
    with as_provider(model, provider):
        out = bench(
            lambda: _prefill(model, llama, provider, ids),
            group="model/prefill2048",
            provider=provider,
            shape=SHAPE,
            dtype=DTYPE,
            rounds=2,
            quick_rounds=1,
            tokens_per_s_tokens=PROMPT,
            **variant(provider),
        )
    _PREFILLED[provider] = out.past_key_values


def _decode_bytes(model, llama, provider: str) -> int:
    """What DECODE steps read at least: per step the weights (but the embedding table), the cached K/V of the tokens
    so far and, for M+, each layer's memory K/V (BOS + K0 long-term + N short-term rows)."""
    cfg = model.config
    row = 2 * cfg.num_key_value_heads * cfg.head_dim * torch.finfo(DTYPE).bits // 8  # one row's K and V, one layer
    memory_rows = 0 if provider == "llama_sdpa" else cfg.memory_prefix_len
    steps = range(PROMPT, PROMPT + DECODE)
    return sum(llama_weight_bytes(llama) + LAYERS * row * (memory_rows + cached + 1) for cached in steps)


@pytest.mark.parametrize("provider", PROVIDERS)
def test_decode(bench, model, llama, provider):
    token = torch.tensor([[42]])
    with as_provider(model, provider):
        cache = _PREFILLED.pop(provider, None)
        if cache is None:  # the prefill benchmark of this provider did not run (or ran in another session)
            cache = _prefill(model, llama, provider, torch.randint(0, 128256, (1, PROMPT))).past_key_values
        if provider == "llama_sdpa":
            start = cache.get_seq_length()

            @torch.no_grad()
            def decode():
                cache.crop(start - cache.get_seq_length())  # rewind: every round decodes the same 16 positions
                for _ in range(DECODE):
                    llama(token, past_key_values=cache, use_cache=True, logits_to_keep=1)
        else:
            start = cache.length

            def decode():
                for layer_cache in cache.layers:
                    layer_cache.length = start  # rewind: every round decodes the same 16 positions
                for _ in range(DECODE):
                    model(token, past_key_values=cache, logits_to_keep=1)

        bench(
            decode,
            group="model/decode16",
            provider=provider,
            shape=SHAPE,
            dtype=DTYPE,
            rounds=3,
            quick_rounds=2,
            tokens_per_s_tokens=DECODE,
            moved_bytes=_decode_bytes(model, llama, provider),
            **variant(provider),
        )
