"""Issue 22: a generation's decode steps read the short-term keys rotated once, at the prefill (``MemoryKV.rotated``).

The rotation is the kernels' (fp32 on the widened keys) rounded once to the keys' dtype, as a plain Llama's KV cache
holds its keys; a memory the batch shares keeps one rotated copy (an expand), and a state serving several rows of a
per-row batch one copy. Decoding from the rotated keys computes what decoding from the keys before RoPE computes
(the kernel rotating them at every step): the same greedy tokens, logits within fp32 summation noise (the golden
model is fp32), and the memory state is not touched.
"""

from __future__ import annotations

import math

import pytest
import torch
from _golden import GOLDEN, load_state

from mplus.attention import rope_tables
from mplus.checkpoint import load_official_memory
from mplus.model import MPlusForCausalLM
from mplus.segments import MemoryKV
from mplus_kernels.attention import memory_attention
from mplus_kernels.testing import assert_close, assert_equal, rope_rotation64


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("shared", [True, False])
def test_rotated_segment(dtype, shared):
    """The rotated keys are the rotation by the tables' rows rounded once to the dtype; values and the source keys
    are untouched; a shared expand stays one copy; attention over the rotated segment matches the kernel's own
    rotation."""
    g = torch.Generator().manual_seed(5)
    m, h, d, b = 300, 2, 64, 3
    cos, sin = rope_tables(1.0 / (10000.0 ** (torch.arange(0, d, 2, dtype=torch.float32) / d)), 400)
    k = torch.randn(1 if shared else b, m, h, d, generator=g).to(dtype)
    v = torch.randn(1 if shared else b, m, h, d, generator=g).to(dtype)
    if shared:
        k, v = k.expand(b, -1, -1, -1), v.expand(b, -1, -1, -1)
    positions = torch.randperm(400, generator=g)[:m].to(torch.int32)
    seg = MemoryKV(k, v, positions, cos, sin)
    before = k.clone()
    rot = seg.rotated()
    assert rot.positions is None and rot.rope_cos is None and rot.v is v
    assert rot.k.dtype == dtype and rot.k.shape == k.shape
    assert (rot.k.stride(0) == 0) == shared, "a shared memory must stay one rotated copy"
    assert_equal(k, before, name="source keys")
    want, size = rope_rotation64(k, positions, cos, sin)
    # one rounding to the dtype (half an ulp of the result) plus the fp32 arithmetic (a few ulps of its terms)
    half_ulp = 2.0**-8 if dtype == torch.bfloat16 else 2.0**-24
    bound = half_ulp * want.abs() + 3 * 2.0**-24 * size
    excess = (rot.k.double() - want).abs() - bound
    assert float(excess.max()) <= 0, f"rotated keys beyond one rounding by {float(excess.max()):.3g}"
    assert rot.rotated() is rot

    q = torch.randn(b, 1, 4 * h, d, generator=g).to(dtype)
    ck, cv = torch.randn(b, 5, h, d, generator=g).to(dtype), torch.randn(b, 5, h, d, generator=g).to(dtype)
    scale = 1 / math.sqrt(d)
    out, lse = memory_attention(q, ck, cv, k, v, positions, cos, sin, softmax_scale=scale, causal=True)
    out_r, lse_r = memory_attention(q, ck, cv, rot.k, v, softmax_scale=scale, causal=True)
    tol = 2e-2 if dtype == torch.bfloat16 else 1e-5
    assert_close(out_r.float(), out.float(), atol=tol, rtol=0, name="attention over rotated keys")
    assert_close(lse_r, lse, atol=tol, rtol=0, name="lse over rotated keys")


def _model(rotate: bool) -> MPlusForCausalLM:
    model = MPlusForCausalLM.from_pretrained(str(GOLDEN / "model"), kernels="fused", max_length=64)
    load_official_memory(model, load_state(4))
    model.rotate_decode_memory = rotate
    return model


def test_decode_from_rotated_keys_equals_decode_from_keys_before_rope():
    prompt = torch.tensor([[3, 1, 4, 1, 5, 9, 2]])
    runs = {}
    for rotate in (True, False):
        model = _model(rotate)
        stm_k = model.stm.k.clone()
        out = model.generate(
            prompt, max_new_tokens=6, do_sample=False, output_logits=True, return_dict_in_generate=True
        )
        cache = model(prompt).past_key_values
        for layer, segments in enumerate(cache.memories):  # the short-term segment rotated, the prefix as it was
            assert (segments[0].positions is None) == rotate, f"layer {layer}: rotate_decode_memory={rotate} not kept"
            assert all(part.positions is not None for part in segments[1:]), f"layer {layer}: prefix rotated"
        stm = cache.memories[0][0]
        assert (stm.k.data_ptr() == model.stm.k[0].data_ptr()) != rotate, "keys before RoPE: a view of the state"
        assert_equal(model.stm.k, stm_k, name="short-term keys of the state after generating")
        runs[rotate] = out
    assert_equal(runs[True].sequences, runs[False].sequences, name="greedy tokens")
    assert_close(torch.cat(runs[True].logits), torch.cat(runs[False].logits), atol=2e-5, rtol=0, name="step logits")
