"""Issue 11, item 1: batched generation over one memory, with left padding (Hugging Face's convention).

The short-term K/V is shared by the batch (an expand, never a copy); each sequence retrieves its own long-term rows
(its padding excluded from the queries' mean) and attends its own gathered segment; its positions start after its
padding, and its padding is invisible (``kv_start``). So every row of a padded batch computes what it computes alone:
greedy tokens equal, token for token, logits within fp32 summation-order noise. Backends: C++ (``fused``), the
pure-PyTorch reference, and Triton (the interpreter here) for every op at head dim 64.
"""

from __future__ import annotations

import pytest
import torch
from _golden import GOLDEN, load_state

from mplus.checkpoint import load_official_memory, memory_state
from mplus.config import MPlusConfig
from mplus.model import MPlusForCausalLM, StaleCacheError
from mplus_kernels.testing import assert_close, assert_equal

PROMPTS = [[3, 1, 4, 1, 5], [9, 2, 6], [5, 3, 5, 8, 9, 7, 9]]
NEW = 5


def _golden_model(kernels: str) -> MPlusForCausalLM:
    """``kernels="triton"``: fused, with attention on the reference (see ``_triton_ops``)."""
    model = MPlusForCausalLM.from_pretrained(
        str(GOLDEN / "model"), kernels="fused" if kernels == "triton" else kernels, max_length=64
    )
    if kernels == "triton":
        for layer in model.layers:
            layer.self_attn.backend = "reference"
    load_official_memory(model, load_state(4))  # 20+ long-term rows per layer and a dropped-row cache
    return model


def _left_padded(prompts: list[list[int]], pad: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    t = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), t), pad, dtype=torch.long)
    mask = torch.zeros(len(prompts), t, dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, t - len(p) :] = torch.tensor(p)
        mask[i, t - len(p) :] = 1
    return ids, mask


def _generate(model, ids, **kw):
    return model.generate(
        ids, max_new_tokens=NEW, do_sample=False, output_logits=True, return_dict_in_generate=True, **kw
    )


def _check_batch_equals_alone(model, prompts, atol, states=None):
    """A left-padded batch of ``prompts`` (over the model's memory, or row i over ``states[i]``) gives each row the
    greedy tokens of that prompt alone, and its per-step logits within ``atol``."""
    per_row = states or [None] * len(prompts)
    alone = [_generate(model, torch.tensor([p]), memory=s) for p, s in zip(prompts, per_row)]
    ids, mask = _left_padded(prompts)
    batch = _generate(model, ids, attention_mask=mask, pad_token_id=0, memory=states)
    t = ids.shape[1]
    for i, (p, one) in enumerate(zip(prompts, alone)):
        assert_equal(batch.sequences[i, t:], one.sequences[0, len(p) :], name=f"greedy tokens of row {i}")
        got = torch.stack([step[i] for step in batch.logits])
        want = torch.stack([step[0] for step in one.logits])
        assert_close(got, want, atol=atol, rtol=0, name=f"per-step logits of row {i}")


@pytest.fixture
def _triton_ops(request, monkeypatch):
    """kernels="triton": the memory update, retrieval and gather on Triton (the golden head dim 16 is below the
    Triton attention kernel's 64: attention stays on the reference; the head-dim-64 test below covers it)."""
    if request.node.callspec.params.get("kernels") == "triton":
        monkeypatch.setenv("MPLUS_BACKEND", "triton")


@pytest.mark.parametrize("kernels", ["fused", "reference", "triton"])
def test_a_padded_batch_equals_each_sequence_alone(kernels, _triton_ops):
    model = _golden_model(kernels)
    _check_batch_equals_alone(model, PROMPTS, atol=2e-5)


def test_every_op_on_triton_at_head_dim_64(monkeypatch):
    """M+ at head dim 64 with long-term rows (five injections, two merges), every op on Triton (the interpreter):
    a padded batch of 2 equals each sequence alone."""
    monkeypatch.setenv("MPLUS_BACKEND", "triton")
    cfg = MPlusConfig.mplus_8b(vocab_size=89, hidden_size=128, intermediate_size=96, num_hidden_layers=2,
                               num_attention_heads=2, num_key_value_heads=1, num_tokens=4, num_blocks=6,
                               num_ltm_blocks=2, update_ltm_frequency=2, selector_hidden_dim=16,
                               lora_config={"r": 4, "lora_alpha": 8, "target_modules": []},
                               bos_token_id=None, eos_token_id=None, pad_token_id=None)  # fmt: skip
    model = MPlusForCausalLM(cfg, kernels="fused", max_length=32)
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * (0.2 if p.dim() > 1 else 1.0) + (p.dim() == 1))
    torch.manual_seed(4)
    for length in (11, 6, 9, 4, 13):
        model.inject(torch.randint(0, 89, (1, length), generator=torch.Generator().manual_seed(length)))
    assert min(model.ltm.size) > 0
    _check_batch_equals_alone(model, [[5, 17, 33, 2, 60, 41], [7, 8]], atol=1e-4)
    other = model.new_memory(seed=7)  # item 3: rows over different memories, every op on Triton
    model.inject(torch.randint(0, 89, (1, 10), generator=torch.Generator().manual_seed(10)), memory=other)
    _check_batch_equals_alone(model, [[5, 17, 33, 2, 60, 41], [7, 8]], 1e-4, [other, model.memory])


def test_the_short_term_memory_is_shared_and_each_row_retrieves_its_own():
    model = _golden_model("fused")
    ids, mask = _left_padded(PROMPTS)
    cache = model(ids, attention_mask=mask).past_key_values
    stm_segment = cache.memories[0][0]
    # values: a view of the state; keys: one rotated copy for the batch (decode steps read them rotated)
    assert stm_segment.v.stride(0) == 0 and stm_segment.v.data_ptr() == model.stm.v[0].data_ptr(), "a copy"
    assert stm_segment.k.stride(0) == 0 and stm_segment.positions is None, "keys not rotated once for the batch"
    assert cache.retrieved[0].shape[0] == len(PROMPTS)
    for i, p in enumerate(PROMPTS):
        alone = model(torch.tensor([p])).past_key_values
        for layer in range(3):
            assert_equal(cache.retrieved[layer][i], alone.retrieved[layer], name=f"row {i} layer {layer} rows")
    assert_equal(cache.kv_start, torch.tensor([2, 4, 0], dtype=torch.int32), name="kv_start")


def test_decode_step_on_a_padded_batch_equals_forward():
    model = _golden_model("fused")
    ids, mask = _left_padded(PROMPTS)
    out, again = model(ids, attention_mask=mask), model(ids, attention_mask=mask)
    token = out.logits[:, -1].argmax(-1, keepdim=True)
    pos = torch.tensor([ids.shape[1]])
    for _ in range(3):
        stepped = model.decode_step(token, pos, out.past_key_values)
        eager = model(token, past_key_values=again.past_key_values).logits[:, -1]
        assert_close(stepped, eager, atol=1e-5, rtol=0, name="decode_step vs forward")
        token = stepped.argmax(-1, keepdim=True)
        pos += 1


@pytest.mark.parametrize(
    ("mask", "match"),
    [
        ([[1, 1, 0], [1, 1, 1]], r"attention_mask row 0 is \[1, 1, 0\]: mplus needs left padding"),
        ([[0, 0, 0], [1, 1, 1]], r"row 0 is \[0, 0, 0\].*at least one token per row"),
        ([[0, 2, 1], [1, 1, 1]], "must hold 0 .* and 1 .* only"),
        ([[1, 1], [1, 1]], r"attention_mask must be \[B=2, T=3\]"),
    ],
)
def test_bad_masks_are_refused_with_the_memory_unchanged(mask, match):
    model = _golden_model("fused")
    before = {k: v.clone() for k, v in memory_state(model).items()}
    ids = torch.tensor([[1, 2, 3], [4, 5, 6]])
    with pytest.raises(ValueError, match=match):
        model(ids, attention_mask=torch.tensor(mask))
    with pytest.raises(ValueError, match="past_key_values holds 1"):
        model(ids, past_key_values=model.new_cache())
    after = memory_state(model)
    for key, value in before.items():
        assert_equal(after[key], value, name=key)


def test_compiled_decode_step_on_a_padded_batch():
    """The padded batch through ``compile_decode_step`` (fullgraph): one graph, logits equal to the eager step."""
    from torch._dynamo.testing import CompileCounterWithBackend

    model = _golden_model("fused")
    ids, mask = _left_padded(PROMPTS)
    out = model(ids, attention_mask=mask)
    counter = CompileCounterWithBackend("aot_eager")
    step = model.compile_decode_step(backend=counter)
    token, pos = out.logits[:, -1].argmax(-1, keepdim=True), torch.tensor([ids.shape[1]])
    for _ in range(3):
        logits = step(token, pos, out.past_key_values)
        assert_equal(logits, model.decode_step(token, pos, out.past_key_values), name="compiled vs eager step")
        token = logits.argmax(-1, keepdim=True)
        pos += 1
    assert counter.frame_count == 1


# ------------------------------------------------------------------------------------- item 3: different memories
def _two_memories(model):
    """Two states of the model: one after three more injections, one whose long-term store is empty (so the rows
    retrieve different numbers of long-term rows: per-row segments)."""
    a, b = model.new_memory(seed=1), model.new_memory(seed=2)
    for step in (1, 2, 3):
        model.inject(load_state(step)["context_ids"], memory=a)
    b.ltm.clear()
    return a, b


@pytest.mark.parametrize("kernels", ["fused", "reference", "triton"])
def test_a_batch_over_different_memories_equals_each_row_alone(kernels, _triton_ops):
    model = _golden_model(kernels)
    a, b = _two_memories(model)
    _check_batch_equals_alone(model, PROMPTS, 2e-5, [a, b, a])
    ids, mask = _left_padded(PROMPTS)
    segments = model(ids, attention_mask=mask, memory=[a, b, a]).past_key_values.memories[0]
    assert isinstance(segments[0], list) and segments[0][0].v.data_ptr() == a.stm.v[0].data_ptr(), "a copy"
    rows = segments[0]
    assert rows[0].k.data_ptr() == rows[2].k.data_ptr() != rows[1].k.data_ptr(), "one rotated copy per state"
    assert isinstance(segments[1], list), "stores of different sizes give per-row long-term segments"


def test_a_batch_over_different_memories_errors():
    model = _golden_model("fused")
    a, b = _two_memories(model)
    ids, mask = _left_padded(PROMPTS)
    with pytest.raises(ValueError, match="memory lists 2 states for a batch of B=3 rows"):
        model.generate(ids, attention_mask=mask, memory=[a, b], max_new_tokens=2)
    with pytest.raises(TypeError, match=r"memory\[1\]: memory must be a MemoryState"):
        model(ids, attention_mask=mask, memory=[a, "b", a])
    out = model(ids, attention_mask=mask, memory=[a, b, a])
    model.inject(load_state(4)["context_ids"], memory=b)
    with pytest.raises(StaleCacheError, match="memory has changed since"):
        model(torch.zeros(3, 1, dtype=torch.long), past_key_values=out.past_key_values)
