"""``mplus.attention.FusedMemoryAttention`` against a hand-written Llama attention over ``[memory ; chunk]`` with an
explicit mask, weight sharing with ``LlamaAttention`` (``from_llama``'s drop-in, its M+ convention as ``.attend``),
official/HF state-dict names, the KV cache, and the ``attn_implementation="mplus"`` registration with transformers
(tiny random models; the real-model checks are in test_hf_attention.py)."""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM
from transformers.models.llama.modeling_llama import (
    LlamaAttention,
    LlamaRotaryEmbedding,
    apply_rotary_pos_emb,
    repeat_kv,
)

from mplus.attention import FusedMemoryAttention, KVCache, MemoryKV, rope_tables
from mplus_kernels import _backend
from mplus_kernels.testing import assert_close

_HAS_CPU_KERNEL = _backend.cpp_available() and torch._C._dispatch_has_kernel_for_dispatch_key(
    "mplus::memory_attention", "CPU"
)
BACKENDS = [  # triton runs under the interpreter (conftest)
    "reference",
    "triton",
    pytest.param("cpp", marks=pytest.mark.skipif(not _HAS_CPU_KERNEL, reason="no CPU kernel for memory_attention")),
]


def _config(**overrides) -> LlamaConfig:
    kw = {
        "vocab_size": 128,  # 128256
        "hidden_size": 256,  # 4096
        "intermediate_size": 512,  # 14336
        "num_hidden_layers": 2,  # 32
        "num_attention_heads": 8,  # 32
        "num_key_value_heads": 2,  # 8
        "head_dim": 64,  # 128
        "max_position_embeddings": 512,  # 131072
        "rope_theta": 500000.0,
    }
    kw.update(overrides)
    cfg = LlamaConfig(**kw)
    cfg._attn_implementation = "eager"
    return cfg


def _llama_attention(cfg: LlamaConfig, seed: int, dtype=torch.float32) -> LlamaAttention:
    torch.manual_seed(seed)
    attn = LlamaAttention(cfg, layer_idx=0).to(dtype).eval()
    if cfg.attention_bias:
        with torch.no_grad():
            for lin in (attn.q_proj, attn.k_proj, attn.v_proj, attn.o_proj):
                lin.bias.normal_()
    return attn


def _handwritten(attn: LlamaAttention, rotary, hidden, chunk_pos, mem_hidden, mem_pos) -> torch.Tensor:
    """Llama attention over the concatenation [memory ; chunk] with an explicit boolean mask, in fp32: memory rows
    visible to every query, the chunk causal; RoPE on all keys with their own positions (SPEC.md §3.1)."""
    attn = attn.float()
    hidden, mem_hidden = hidden.float(), mem_hidden.float()
    b, t, _ = hidden.shape
    m = mem_hidden.shape[1]
    d = attn.head_dim
    x = torch.cat([mem_hidden, hidden], dim=1)
    q = attn.q_proj(hidden).view(b, t, -1, d).transpose(1, 2)
    k = attn.k_proj(x).view(b, m + t, -1, d).transpose(1, 2)
    v = attn.v_proj(x).view(b, m + t, -1, d).transpose(1, 2)
    positions = torch.cat([mem_pos, chunk_pos])[None].expand(b, -1)
    cos, sin = rotary(x, positions)
    q, _ = apply_rotary_pos_emb(q, q, cos[:, m:], sin[:, m:])
    _, k = apply_rotary_pos_emb(k, k, cos, sin)
    k, v = repeat_kv(k, attn.num_key_value_groups), repeat_kv(v, attn.num_key_value_groups)
    mask = torch.ones(t, m + t, dtype=torch.bool)
    mask[:, m:] = torch.ones(t, t, dtype=torch.bool).tril()
    scores = (q @ k.transpose(2, 3)) * attn.scaling
    probs = scores.masked_fill(~mask, float("-inf")).softmax(dim=-1)
    out = (probs @ v).transpose(1, 2).reshape(b, t, -1)
    return attn.o_proj(out)


def _memory_setup(cfg, b, m, t, seed, dtype=torch.float32):
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(b, t, cfg.hidden_size, generator=gen).to(dtype)
    mem_hidden = torch.randn(b, m, cfg.hidden_size, generator=gen).to(dtype)
    mem_pos = torch.randperm(m, generator=gen)  # slots hold logical positions in any order
    chunk_pos = torch.arange(m, m + t)  # the chunk comes after the memory
    return hidden, mem_hidden, mem_pos, chunk_pos


def _memory_kv(fused, rotary, mem_hidden, mem_pos, num_positions) -> MemoryKV:
    k, v = fused.project_memory(mem_hidden)
    cos, sin = rope_tables(rotary.inv_freq, num_positions, rotary.attention_scaling)
    return MemoryKV(k, v, mem_pos, cos, sin)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(("b", "m", "t"), [(1, 37, 9), (2, 5, 1), (1, 0, 6)])
def test_matches_handwritten_attention_over_memory_and_chunk(backend, b, m, t):
    cfg = _config()
    attn = _llama_attention(cfg, seed=m + t)
    rotary = LlamaRotaryEmbedding(cfg)
    hidden, mem_hidden, mem_pos, chunk_pos = _memory_setup(cfg, b, m, t, seed=1)
    fused = FusedMemoryAttention.from_llama(attn, backend=backend)
    with torch.no_grad():
        memory = _memory_kv(fused, rotary, mem_hidden, mem_pos, m + t)
        got = fused.attend(hidden, rotary(hidden, chunk_pos[None].expand(b, -1)), memory=memory)
        expected = _handwritten(attn, rotary, hidden, chunk_pos, mem_hidden, mem_pos)
    assert got.shape == (b, t, cfg.hidden_size)
    assert_close(got, expected, atol=2e-5, rtol=2e-5, name=f"{backend} module vs hand-written")


@pytest.mark.parametrize("backend", BACKENDS)
def test_bf16_module_close_to_fp32_handwritten(backend):
    cfg = _config()
    attn = _llama_attention(cfg, seed=3, dtype=torch.bfloat16)
    rotary = LlamaRotaryEmbedding(cfg)
    hidden, mem_hidden, mem_pos, chunk_pos = _memory_setup(cfg, 1, 21, 7, seed=2, dtype=torch.bfloat16)
    fused = FusedMemoryAttention.from_llama(attn, backend=backend)
    with torch.no_grad():
        memory = _memory_kv(fused, rotary, mem_hidden, mem_pos, 28)
        got = fused.attend(hidden, rotary(hidden, chunk_pos[None]), memory=memory)
        expected = _handwritten(attn, rotary, hidden, chunk_pos, mem_hidden, mem_pos)
    assert got.dtype == torch.bfloat16
    rel = (got.float() - expected).norm() / expected.norm()
    assert rel < 2e-2, f"bf16 module vs fp32 hand-written: relative error {rel:.3g}"


@pytest.mark.parametrize("backend", BACKENDS)
def test_without_memory_equals_llama_attention(backend):
    cfg = _config(attention_bias=True)
    attn = _llama_attention(cfg, seed=4)
    rotary = LlamaRotaryEmbedding(cfg)
    hidden = torch.randn(2, 10, cfg.hidden_size)
    pos = torch.arange(10)[None].expand(2, -1)
    mask = torch.full((10, 10), float("-inf")).triu(1)[None, None]
    fused = FusedMemoryAttention.from_llama(attn, backend=backend)
    with torch.no_grad():
        expected, _ = attn(hidden, position_embeddings=rotary(hidden, pos), attention_mask=mask)
        got = fused.attend(hidden, rotary(hidden, pos))
        # the drop-in convention, with eager's additive causal mask
        dropped_in, weights = fused(hidden_states=hidden, position_embeddings=rotary(hidden, pos), attention_mask=mask)
    assert_close(got, expected, atol=2e-5, rtol=2e-5, name="no-memory module vs LlamaAttention")
    assert_close(dropped_in, expected, atol=2e-5, rtol=2e-5, name="drop-in forward vs LlamaAttention")
    assert weights is None


def test_from_llama_shares_weights():
    cfg = _config()
    attn = _llama_attention(cfg, seed=5)
    fused = FusedMemoryAttention.from_llama(attn, backend="reference")
    for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
        assert getattr(fused, name) is getattr(attn, name)
        assert getattr(fused, name).weight.data_ptr() == getattr(attn, name).weight.data_ptr()
    assert (fused.num_heads, fused.num_kv_heads, fused.head_dim) == (8, 2, 64)
    rotary = LlamaRotaryEmbedding(cfg)
    hidden = torch.randn(1, 4, cfg.hidden_size)
    pe = rotary(hidden, torch.arange(4)[None])
    with torch.no_grad():
        before = fused.attend(hidden, pe)
        attn.o_proj.weight.mul_(2.0)  # an in-place change of the Llama weights is seen by the fused module
        after = fused.attend(hidden, pe)
    assert_close(after, 2 * before, atol=1e-5, rtol=1e-5, name="after scaling o_proj")


@pytest.mark.parametrize("bias", [False, True])
def test_state_dict_with_official_names_loads_unchanged(bias):
    cfg = _config(attention_bias=bias)
    torch.manual_seed(6)
    model = LlamaForCausalLM(cfg).eval()
    prefix = "model.layers.1.self_attn."  # the official / HF checkpoint names
    layer_sd = {k[len(prefix) :]: v for k, v in model.state_dict().items() if k.startswith(prefix)}
    fused = FusedMemoryAttention.from_config(cfg, layer_idx=1, backend="reference")
    assert set(fused.state_dict()) == set(layer_sd)
    fused.load_state_dict(layer_sd, strict=True)
    hidden = torch.randn(1, 5, cfg.hidden_size)
    pe = LlamaRotaryEmbedding(cfg)(hidden, torch.arange(5)[None])
    shared = FusedMemoryAttention.from_llama(model.model.layers[1].self_attn, backend="reference")
    with torch.no_grad():
        assert_close(fused(hidden, pe), shared.attend(hidden, pe), atol=0, rtol=0, name="loaded vs shared")


@pytest.mark.parametrize("backend", BACKENDS)
def test_kv_cache_prefill_then_decode_equals_one_pass(backend):
    """Prefill 6 tokens into a preallocated cache, then decode 3 tokens one at a time: each step's output equals the
    matching row of one pass over all 9 tokens (the memory is seen at every step)."""
    cfg = _config()
    attn = _llama_attention(cfg, seed=7)
    rotary = LlamaRotaryEmbedding(cfg)
    hidden, mem_hidden, mem_pos, chunk_pos = _memory_setup(cfg, 2, 13, 9, seed=3)
    fused = FusedMemoryAttention.from_llama(attn, backend=backend)
    with torch.no_grad():
        memory = _memory_kv(fused, rotary, mem_hidden, mem_pos, 22)
        full, full_lse = fused.attend(
            hidden, rotary(hidden, chunk_pos[None].expand(2, -1)), memory=memory, return_lse=True
        )
        cache = KVCache.empty(2, 16, cfg.num_key_value_heads, cfg.head_dim, dtype=torch.float32)
        steps = [slice(0, 6), slice(6, 7), slice(7, 8), slice(8, 9)]
        outs, lses = [], []
        for s in steps:
            pe = rotary(hidden[:, s], chunk_pos[s][None].expand(2, -1))
            y, lse = fused.attend(hidden[:, s], pe, memory=memory, kv_cache=cache, return_lse=True)
            outs.append(y)
            lses.append(lse)
    assert cache.length == 9
    assert full_lse.shape == (2, cfg.num_attention_heads, 9)
    assert_close(torch.cat(outs, dim=1), full, atol=2e-5, rtol=2e-5, name="cached steps vs one pass")
    assert_close(torch.cat(lses, dim=2), full_lse, atol=2e-5, rtol=2e-5, name="cached lse vs one pass")


def test_kv_cache_overflow_and_shape_errors():
    cache = KVCache.empty(1, 4, 2, 64, dtype=torch.float32)
    cache.append(torch.zeros(1, 3, 2, 64), torch.zeros(1, 3, 2, 64))
    with pytest.raises(ValueError, match=r"3 \+ 2 rows exceed the cache capacity S_max=4"):
        cache.append(torch.zeros(1, 2, 2, 64), torch.zeros(1, 2, 2, 64))
    with pytest.raises(ValueError, match=r"do not fit the cache \[1, 4, 2, 64\]"):
        cache.append(torch.zeros(1, 1, 4, 64), torch.zeros(1, 1, 4, 64))
    assert cache.length == 3


# ---------------------------------------------------------------------------------------------------------------
# transformers: attn_implementation="mplus"
# ---------------------------------------------------------------------------------------------------------------
@pytest.fixture
def tiny_llama():
    torch.manual_seed(8)
    cfg = _config()
    cfg._attn_implementation = "sdpa"
    return LlamaForCausalLM(cfg).eval()


@pytest.mark.parametrize("backend", BACKENDS)
def test_transformers_registry_same_logits_as_sdpa(tiny_llama, backend, monkeypatch):
    monkeypatch.setenv("MPLUS_BACKEND", backend)
    ids = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        tiny_llama.set_attn_implementation("sdpa")
        expected = tiny_llama(ids).logits
        tiny_llama.set_attn_implementation("mplus")
        assert tiny_llama.config._attn_implementation == "mplus"
        got = tiny_llama(ids).logits
    assert_close(got, expected, atol=1e-4, rtol=1e-4, name=f"logits mplus ({backend}) vs sdpa")


def test_transformers_registry_generate_and_padding(tiny_llama, monkeypatch):
    """Cached greedy decoding (queries of one token against the cache, bottom-right causal) gives sdpa's tokens; a
    left-padded batch runs with each row's first valid key (kv_start) and equals sdpa on its real tokens; right padding
    is refused instead of being silently attended."""
    monkeypatch.setenv("MPLUS_BACKEND", "triton")
    ids = torch.randint(0, 128, (1, 7), generator=torch.Generator().manual_seed(1))
    mask = torch.ones(2, 7, dtype=torch.long)
    mask[1, :2] = 0
    with torch.no_grad():
        tiny_llama.set_attn_implementation("sdpa")
        expected = tiny_llama.generate(ids, max_new_tokens=4, do_sample=False)
        expected_padded = tiny_llama(ids.expand(2, -1), attention_mask=mask).logits
        tiny_llama.set_attn_implementation("mplus")
        got = tiny_llama.generate(ids, max_new_tokens=4, do_sample=False)
        assert torch.equal(got, expected), f"{got} != {expected}"
        padded = tiny_llama(ids.expand(2, -1), attention_mask=mask).logits
        assert_close(padded[mask.bool()], expected_padded[mask.bool()], atol=1e-4, rtol=1e-4, name="left-padded")
        with pytest.raises(ValueError, match="is not left padding"):
            tiny_llama(ids.expand(2, -1), attention_mask=mask.flip(1))
