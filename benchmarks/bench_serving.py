"""Serving (issue 11, item 6): batches over one shared memory (B 1, 4, 16) and over two different memories (B 2) at
the real widths of ``bench_model.py`` (2 layers), with its providers: ``mplus`` (fused kernels), ``reference`` (their
pure-PyTorch references), ``official_sdpa`` (the official SDPA attention over ``[memory ; chunk]``, run batched: the
official code serves batch 1 only) and ``llama_sdpa`` (a plain transformers Llama of the same base weights, SDPA, its
``DynamicCache``, the same left-padded batch: M+'s overhead for serving).

Per batch: a prefill of ``PROMPT`` tokens per row (left padded: rows of different lengths) and ``DECODE`` decode
steps over the cached prefix. Throughput is generated tokens per second (B x DECODE / median) for decode and
prompt tokens per second for prefill. Beside time and peak extra memory each result records what one more
sequence costs by design, counted on the cache a prefill returns: its chunk K/V cache rows and its gathered long-term
segment ([BOS ; K0 rows] K/V per layer) and its share of the short-term keys rotated for decoding (one copy per
layer and state: ``MemoryKV.rotated``); the short-term values are read in place from each state. Every provider of
a batch runs the same rounds (1 at B 16).
"""

from __future__ import annotations

import pytest
import torch
from bench_model import DTYPE, LAYERS, PROVIDERS, SHAPE, as_provider, llama, model, variant  # noqa: F401 - fixtures

PROMPT, DECODE = 64, 4
BATCHES = [1, 4, 16]


def _prompts(b: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``b`` left-padded rows of ``PROMPT - 8*(i % 3)`` tokens."""
    gen = torch.Generator().manual_seed(b)
    ids = torch.randint(0, 128256, (b, PROMPT), generator=gen)
    mask = torch.ones(b, PROMPT, dtype=torch.long)
    for i in range(b):
        mask[i, : 8 * (i % 3)] = 0
    return ids, mask


def _per_row_bytes(cache) -> dict[str, int]:
    """What each sequence of a prefilled cache holds by design: its K/V cache rows, its long-term segments and its
    share of the short-term keys rotated for decoding (one copy per layer and distinct state; the values are read in
    the state itself)."""
    b = cache.batch_size
    kv = sum(t.numel() * t.element_size() for layer in cache.layers for t in (layer.k, layer.v))
    segments = 0
    for memories in cache.memories:
        for seg in memories[1:]:  # [0] is the short-term memory: an expand (shared) or views of each state
            parts = seg if isinstance(seg, list) else [seg]
            segments += sum(p.k.numel() * p.k.element_size() * 2 for p in parts)
    states = cache.memory if isinstance(cache.memory, list) else [cache.memory] * b
    rotated: dict[int, int] = {}  # the short-term keys' rotated copies, by storage
    for layer, memories in enumerate(cache.memories):  # the short-term segment reads each row's values in place
        stm = memories[0] if isinstance(memories[0], list) else [memories[0]] * b
        for row, (seg, state) in enumerate(zip(stm, states)):
            one = 0 if seg.v.shape[0] == 1 else row
            assert seg.v[one].data_ptr() == state.stm.v[layer].data_ptr(), "the short-term values were copied"
            k = seg.k[0 if seg.k.shape[0] == 1 else row]
            if seg.positions is None:  # rotated once at the prefill (MemoryKV.rotated)
                rotated[k.data_ptr()] = k.numel() * k.element_size()
            else:
                assert k.data_ptr() == state.stm.k[layer].data_ptr(), "the short-term keys were copied"
    return {
        "kv_cache_bytes_per_row": kv // b,
        "ltm_segment_bytes_per_row": segments // b,
        "stm_rotated_key_bytes_per_row": sum(rotated.values()) // b,
    }


def _llama_per_row_bytes(cache, b: int) -> dict[str, int]:
    """A plain Llama's sequence holds its K/V cache rows only."""
    kv = sum(t.numel() * t.element_size() for layer in cache.layers for t in (layer.keys, layer.values))
    return {"kv_cache_bytes_per_row": kv // b}


def _llama_fns(llama, ids, mask, what):  # noqa: F811
    """The plain Llama's prefill of the left-padded batch, or its DECODE steps after one (positions from the mask)."""
    b = ids.shape[0]
    positions = (mask.cumsum(-1) - 1).clamp_min(0)

    @torch.no_grad()
    def prefill():
        return llama(ids, attention_mask=mask, position_ids=positions, use_cache=True, logits_to_keep=1)

    if what == "prefill":
        return prefill, prefill()
    out = prefill()
    cache, start = out.past_key_values, out.past_key_values.get_seq_length()
    token = torch.full((b, 1), 42)
    masks = [torch.cat([mask, torch.ones(b, i + 1, dtype=mask.dtype)], -1) for i in range(DECODE)]
    last = positions[:, -1:]

    @torch.no_grad()
    def decode():
        cache.crop(start - cache.get_seq_length())  # rewind: every round decodes the same positions
        for i in range(DECODE):
            llama(token, attention_mask=masks[i], position_ids=last + i + 1, past_key_values=cache, use_cache=True,
                  logits_to_keep=1)  # fmt: skip

    return decode, out


@pytest.fixture(scope="module")
def other_memory(model):  # noqa: F811
    """A second memory state (a copy of the model's, then one injection: a different short-term memory)."""
    state = model.new_memory(seed=1)
    model.set_kernels("fused")
    model.inject(torch.randint(0, 128256, (1, 512)), memory=state)
    return state


def _memories(model, b, other):  # noqa: F811
    return None if other is None else [model.memory, other][:b]


def _run(bench, model, llama, provider, b, other, what):  # noqa: F811
    ids, mask = _prompts(b)
    kind = "two memories" if other is not None else "shared memory"
    shape = f"B{b} ({kind}), prompt {PROMPT} (left padded), {SHAPE}"
    with as_provider(model, provider):
        _bench(bench, model, llama, provider, b, other, what, ids, mask, shape)


def _bench(bench, model, llama, provider, b, other, what, ids, mask, shape):  # noqa: F811
    tokens = int(mask.sum()) if what == "prefill" else b * DECODE
    if provider == "llama_sdpa":
        fn, prefill = _llama_fns(llama, ids, mask, what)
        extra = {"tokens_per_s_tokens": tokens, **_llama_per_row_bytes(prefill.past_key_values, b), **variant(provider)}
        return _record(bench, fn, provider, b, other, what, shape, extra)
    memory = _memories(model, b, other)
    if what == "prefill":
        fn = lambda: model(ids, attention_mask=mask, memory=memory, logits_to_keep=1)  # noqa: E731
        prefill = fn()
    else:
        prefill = model(ids, attention_mask=mask, memory=memory, logits_to_keep=1)
        cache, start = prefill.past_key_values, prefill.past_key_values.length
        token = torch.full((b, 1), 42)

        def fn():
            for layer_cache in cache.layers:
                layer_cache.length = start  # rewind: every round decodes the same positions
            for _ in range(DECODE):
                model(token, past_key_values=cache, logits_to_keep=1)

    extra = {"tokens_per_s_tokens": tokens, **_per_row_bytes(prefill.past_key_values)}
    return _record(bench, fn, provider, b, other, what, shape, extra)


def _record(bench, fn, provider, b, other, what, shape, extra):
    bench(
        fn,
        group=f"serving/{what}{PROMPT if what == 'prefill' else DECODE} B{b}" + (" 2mem" if other is not None else ""),
        provider=provider,
        shape=shape,
        dtype=DTYPE,
        rounds=1 if b >= 16 else 2,
        quick_rounds=1,
        warmup_rounds=0,
        **extra,
    )


@pytest.mark.parametrize("what", ["prefill", "decode"])
@pytest.mark.parametrize("b", BATCHES)
@pytest.mark.parametrize("provider", PROVIDERS)
def test_shared_memory_batch(bench, model, llama, provider, b, what):  # noqa: F811
    _run(bench, model, llama, provider, b, None, what)


@pytest.mark.parametrize("what", ["prefill", "decode"])
@pytest.mark.parametrize("provider", PROVIDERS)
def test_two_memories(bench, model, llama, other_memory, provider, what):  # noqa: F811
    _run(bench, model, llama, provider, 2, other_memory, what)
