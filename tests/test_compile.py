"""``torch.compile(fullgraph=True)`` of every public wrapper and of the model's decode step: no graph break (the
CPU-side proof that CUDA-graph capture can work), no recompilation from one call to the next, eager results.

Graph breaks raise under ``fullgraph=True``; recompilations are counted by a counting backend (``CompileCounter``),
which also runs the captured graph eagerly, so results are compared too.
"""

from __future__ import annotations

import pytest
import torch
from torch._dynamo.testing import CompileCounterWithBackend

import mplus_kernels as mk
from mplus_kernels.testing import assert_close, assert_equal


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def _compiled(fn):
    counter = CompileCounterWithBackend("aot_eager")
    return torch.compile(fn, backend=counter, fullgraph=True), counter


def test_memory_update_wrapper_compiles_fullgraph():
    L, N, d, K = 2, 16, 8, 3  # noqa: N806
    hidden, age = torch.randn(L, N, d), torch.rand(L, N, dtype=torch.float64)
    pos = torch.arange(N, dtype=torch.int32).repeat(L, 1)
    state = [hidden, age, pos, pos.clone()]
    eager = [t.clone() for t in state]

    def step(hidden, age, pos, order, victims, new_hidden, new_age):
        return mk.memory_update_(pos, order, victims, [hidden, age], [new_hidden, new_age])

    fn, counter = _compiled(step)
    for i in range(3):  # other victims and rows each step: one graph
        victims = torch.randperm(N, generator=torch.Generator().manual_seed(i))[:K].sort().values.repeat(L, 1)
        new = torch.randn(L, K, d), torch.rand(L, K, dtype=torch.float64)
        got = fn(*state, victims, *new)
        want = step(*eager, victims, *new)
        for g, w in zip(got, want):
            assert_equal(g, w, name=f"dropped rows, step {i}")
        for g, w, name in zip(state, eager, ("hidden", "age", "pos", "order")):
            assert_equal(g, w, name=f"{name} after step {i}")
    assert counter.frame_count == 1, f"recompiled: {counter.frame_count} frames"


def test_retrieve_topk_wrapper_compiles_fullgraph():
    fn, counter = _compiled(lambda q, k, k2: mk.retrieve_topk(q, k, 7, keys2=k2))
    for seed in range(3):
        gen = torch.Generator().manual_seed(seed)
        q, k, k2 = (torch.randn(s, 32, generator=gen) for s in (5, 40, 9))
        idx, sc = fn(q, k, k2)
        ref_idx, ref_sc = mk.retrieve_topk(q, k, 7, keys2=k2)
        assert_equal(idx, ref_idx, name="indices")
        assert_equal(sc, ref_sc, name="scores")
    assert counter.frame_count == 1


def test_gather_wrapper_compiles_fullgraph():
    src_a, src_b = torch.randn(10, 4, 3), torch.randn(6, 4, 3)
    fn, counter = _compiled(lambda out, index: mk.gather_rows_(out, src_a, src_b, index))
    for seed in range(3):
        index = torch.randint(0, 16, (5,), generator=torch.Generator().manual_seed(seed))
        got = fn(torch.empty(5, 4, 3), index)
        assert_equal(got, torch.cat([src_a, src_b])[index], name="gathered rows")
    assert counter.frame_count == 1


def test_merge_wrapper_compiles_fullgraph():
    fn, counter = _compiled(lambda *a: mk.merge_attention_states(*a))
    for _ in range(2):
        out_a, out_b = torch.randn(2, 3, 4, 8), torch.randn(2, 3, 4, 8)
        lse_a, lse_b = torch.randn(2, 4, 3), torch.randn(2, 4, 3)
        got = fn(out_a, lse_a, out_b, lse_b)
        want = mk.merge_attention_states_reference(out_a, lse_a, out_b, lse_b)
        for g, w in zip(got, want):
            assert_close(g, w, atol=1e-6, rtol=1e-6, name="merged")
    assert counter.frame_count == 1


# ------------------------------------------------------------------------------------------------------------------
# The model's decode step (static cache, positions as tensors)
# ------------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kernels", ["fused", "reference"])
def test_decode_step_compiles_fullgraph_and_matches_golden(kernels):
    """Greedy decoding through ``torch.compile(model.decode_step, fullgraph=True)``: one graph for every step, the
    official tokens, and per-step logits of the eager path."""
    from _golden import GOLDEN, load_state
    from safetensors.torch import load_file

    from mplus.checkpoint import load_official_memory
    from mplus.model import MPlusForCausalLM

    model = MPlusForCausalLM.from_pretrained(
        str(GOLDEN / "model"), semantics="reference", kernels=kernels, max_length=64
    )
    load_official_memory(model, load_state(4))
    golden = load_file(str(GOLDEN / "stable_argsort" / "d_generate_after_inject4.safetensors"))
    prompt = golden["prompt_ids"]
    steps = golden["sequences"].shape[1] - prompt.shape[1]

    out = model(prompt)  # eager prefill
    cache = out.past_key_values
    logits = [out.logits[:, -1]]
    token = logits[0].argmax(-1, keepdim=True)
    step, counter = _compiled(model.decode_step)
    pos = torch.tensor([prompt.shape[1]])
    tokens = [token]
    for _ in range(steps - 1):
        logits.append(step(token, pos, cache))
        token = logits[-1].argmax(-1, keepdim=True)
        tokens.append(token)
        pos += 1
    assert counter.frame_count == 1, f"recompiled: {counter.frame_count} graphs for {steps - 1} steps"
    assert_equal(torch.cat([prompt, *tokens], 1), golden["sequences"], name="greedy tokens")
    assert_close(torch.cat(logits), golden["step_logits"], atol=2e-5, rtol=0, name="per-step logits")

    # the eager forward on a fresh prefill gives the same logits as the compiled step (same kernels)
    again = model(prompt)
    eager_cache, eager = again.past_key_values, []
    for token in tokens[:-1]:
        eager.append(model(token, past_key_values=eager_cache).logits[:, -1])
    assert_close(torch.cat(logits[1:]), torch.cat(eager), atol=1e-5, rtol=0, name="compiled vs eager decode")


def test_compile_decode_step_checks_the_memory_version_outside_the_graph():
    """``model.compile_decode_step()``: the compiled graph behind the eager version check. A cache prefilled before
    an inject raises ``StaleCacheError`` (a check inside the graph would be a guard: one recompilation per inject);
    a new prefill after the inject runs the same graph."""
    from _golden import GOLDEN, load_state

    from mplus.model import MPlusForCausalLM, StaleCacheError

    model = MPlusForCausalLM.from_pretrained(str(GOLDEN / "model"), max_length=64)
    counter = CompileCounterWithBackend("aot_eager")
    step = model.compile_decode_step(backend=counter)
    prompt = torch.tensor([[5, 6, 7]])
    for round_ in range(2):
        out = model(prompt)
        cache, pos = out.past_key_values, torch.tensor([prompt.shape[1]])
        token = out.logits[:, -1].argmax(-1, keepdim=True)
        for _ in range(3):
            logits = step(token, pos, cache)
            assert_equal(logits, model.decode_step(token, pos, cache), name=f"compiled step, round {round_}")
            token = logits.argmax(-1, keepdim=True)
            pos += 1
        model.inject(load_state(1 + round_)["context_ids"])
        with pytest.raises(StaleCacheError, match="memory has changed since"):
            step(token, pos, cache)
    assert counter.frame_count == 1, f"{counter.frame_count} graphs"
