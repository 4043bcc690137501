"""Issue 12, first slice: memory attention and the LSE merge are differentiable on every backend.

The backward (``mplus_kernels/attention/backward.py``, FlashAttention-2 recompute from the saved LSE) is checked
three ways: ``gradcheck`` in fp64 against numerical differentiation; every backend's gradients (the C++ op, the
Triton kernel under the interpreter, the reference) against autograd through the pure-PyTorch reference, including
the gradient through the LSE output; and a segmented forward (partial attentions merged through their LSEs) that
must train exactly like one call over the concatenated memory. Ops that have no backward refuse inputs that ask for
one instead of returning silently gradient-less results.
"""

from __future__ import annotations

import pytest
import torch

import mplus_kernels as mk
from mplus_kernels.attention.backward import memory_attention_backward, merge_attention_states_backward
from mplus_kernels.attention.reference import memory_attention_reference, merge_attention_states_reference
from mplus_kernels.testing import assert_close

P = 64  # RoPE table rows


def _inputs(b, tq, tk, hq, hkv, d, m, dtype=torch.float32, seed=0):
    gen = torch.Generator().manual_seed(seed)
    rand = lambda *shape: torch.randn(*shape, generator=gen).to(dtype)  # noqa: E731
    angles = torch.arange(P)[:, None].float() * torch.rand(d // 2, generator=gen)
    return {
        "q": rand(b, tq, hq, d), "k": rand(b, tk, hkv, d), "v": rand(b, tk, hkv, d),
        "mem_k": rand(b, m, hkv, d), "mem_v": rand(b, m, hkv, d),
        "mem_pos": torch.randint(0, P, (m,), generator=gen), "rope_cos": angles.cos(), "rope_sin": angles.sin(),
    }  # fmt: skip


DIFF = ("q", "k", "v", "mem_k", "mem_v")


def _grads(fn, inputs, causal, kv_len=None, kv_start=None, seed=1, **kw):
    """Gradients of a random linear function of (out, lse) w.r.t. q, k, v, mem_k, mem_v."""
    leaves = {n: t.clone().requires_grad_(n in DIFF) for n, t in inputs.items()}
    out, lse = fn(**leaves, causal=causal, kv_len=kv_len, kv_start=kv_start, **kw)
    gen = torch.Generator().manual_seed(seed)
    go, gl = torch.randn(out.shape, generator=gen), torch.randn(lse.shape, generator=gen)
    visible = torch.isfinite(lse)  # a query that sees nothing has lse = -inf (no gradient flows there)
    loss = (out.float() * go).sum() + (lse.masked_fill(~visible, 0) * gl).sum()
    loss.backward()
    return {n: leaves[n].grad for n in DIFF}


def _reference_fp64(**kw):
    kw = {n: (t.double() if isinstance(t, torch.Tensor) and t.is_floating_point() and n in DIFF else t)
          for n, t in kw.items()}  # fmt: skip
    return memory_attention_reference(**kw, compute_dtype=torch.float64)


class _Recompute(torch.autograd.Function):
    """The fp64 reference forward with mplus's backward: what gradcheck differentiates numerically."""

    @staticmethod
    def forward(ctx, q, k, v, mem_k, mem_v, mem_pos, rope_cos, rope_sin, causal, kv_len, kv_start):
        out, lse = memory_attention_reference(
            q, k, v, mem_k, mem_v, mem_pos, rope_cos, rope_sin, causal=causal, kv_len=kv_len, kv_start=kv_start,
            compute_dtype=torch.float64,
        )  # fmt: skip
        ctx.save_for_backward(q, k, v, mem_k, mem_v, mem_pos, rope_cos, rope_sin, out, lse)
        ctx.causal, ctx.kv = causal, (kv_len, kv_start)
        return out, lse

    @staticmethod
    def backward(ctx, grad_out, grad_lse):
        q, k, v, mem_k, mem_v, mem_pos, rope_cos, rope_sin, out, lse = ctx.saved_tensors
        grads = memory_attention_backward(grad_out, grad_lse, q, k, v, mem_k, mem_v, mem_pos, rope_cos, rope_sin,
                                          out, lse, q.shape[-1] ** -0.5, ctx.causal, *ctx.kv, block=3)  # fmt: skip
        return *grads, None, None, None, None, None, None


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("m", [0, 4])
def test_gradcheck_fp64(causal, m):
    """Numerical gradients in fp64 (blocks of 3 keys: the blocked recompute crosses block edges)."""
    x = _inputs(2, 3, 5, 4, 2, 8, m, dtype=torch.float64)
    kv_len, kv_start = torch.tensor([5, 4]), torch.tensor([0, 1])
    args = [x[n].requires_grad_(n in DIFF) for n in ("q", "k", "v", "mem_k", "mem_v")]
    fixed = (x["mem_pos"], x["rope_cos"].double(), x["rope_sin"].double(), causal, kv_len, kv_start)
    assert torch.autograd.gradcheck(lambda *a: _Recompute.apply(*a, *fixed), args, eps=1e-6, atol=1e-7)


CASES = [  # (B, Tq, Tk, Hq, Hkv, D, M)
    (2, 5, 7, 4, 4, 16, 6),  # GQA 1
    (1, 3, 9, 8, 2, 16, 5),  # GQA 4
    (2, 4, 4, 8, 1, 16, 0),  # GQA 8, no memory
    (1, 1, 12, 4, 1, 16, 3),  # a decode step
]


@pytest.mark.parametrize("case", CASES, ids=[f"B{c[0]}Tq{c[1]}Tk{c[2]}H{c[3]}/{c[4]}M{c[6]}" for c in CASES])
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("ranges", [False, True])
@pytest.mark.parametrize("backend", ["cpp", "reference"])
def test_gradients_match_autograd_of_the_reference(case, causal, ranges, backend):
    b, tq, tk, hq, hkv, d, m = case
    x = _inputs(b, tq, tk, hq, hkv, d, m)
    kv = {}
    if ranges:  # a static cache: rows [kv_start, kv_len) valid per batch row
        kv = {"kv_len": torch.tensor([tk, tk - 1][:b], dtype=torch.int32),
              "kv_start": torch.tensor([0, 2][:b], dtype=torch.int32)}  # fmt: skip
    want = _grads(_reference_fp64, x, causal, **kv)
    got = _grads(lambda **a: mk.memory_attention(**a, backend=backend), x, causal, **kv)
    for name in DIFF:
        if want[name] is None:  # an empty memory (M = 0) is not used: no gradient, or zeros
            assert got[name] is None or not bool(got[name].any()), f"d{name} of an empty memory"
            continue
        assert_close(got[name], want[name].float(), atol=2e-5, rtol=1e-5, name=f"d{name}")


def test_triton_interpreter_gradients():
    """Head dim 64 (the Triton kernel's smallest), memory and a left-padded static cache, fp32."""
    x = _inputs(2, 3, 6, 4, 2, 64, 5)
    kv = {"kv_len": torch.tensor([6, 5], dtype=torch.int32), "kv_start": torch.tensor([0, 2], dtype=torch.int32)}
    want = _grads(_reference_fp64, x, True, **kv)
    got = _grads(lambda **a: mk.memory_attention(**a, backend="triton"), x, True, **kv)
    for name in DIFF:
        assert_close(got[name], want[name].float(), atol=5e-5, rtol=1e-5, name=f"d{name} (triton)")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_gradients_within_twice_the_references_own_error(dtype):
    """The FlashAttention rule: the fused gradients' error against fp64 is at most twice that of the reference run
    in the same low precision (plus a hair for tiny values)."""
    x = _inputs(2, 6, 9, 8, 2, 16, 7)
    truth = _grads(_reference_fp64, {n: t.to(dtype) if n in DIFF else t for n, t in x.items()}, True)
    low = {n: t.to(dtype) if n in DIFF else t for n, t in x.items()}
    fused = _grads(lambda **a: mk.memory_attention(**a, backend="cpp"), low, True)
    ref = _grads(lambda **a: memory_attention_reference(**a, compute_dtype=dtype), low, True)
    for name in DIFF:
        err_fused = (fused[name].double() - truth[name]).abs().max()
        err_ref = (ref[name].double() - truth[name]).abs().max()
        assert err_fused <= 2 * err_ref + 1e-3, f"d{name}: fused error {err_fused:.3g}, reference {err_ref:.3g}"


def test_merge_gradients_match_autograd():
    gen = torch.Generator().manual_seed(0)
    b, t, h, d = 2, 5, 3, 8
    parts = [torch.randn(b, t, h, d, generator=gen), torch.randn(b, h, t, generator=gen),
             torch.randn(b, t, h, d, generator=gen), torch.randn(b, h, t, generator=gen)]  # fmt: skip
    parts[3][0, 1, 2] = float("-inf")  # one part saw nothing for one query
    for backend in ("cpp", "triton", "reference"):
        got, want = [p.clone().requires_grad_() for p in parts], [p.clone().requires_grad_() for p in parts]
        out, lse = mk.merge_attention_states(*got, backend=backend)
        ref_out, ref_lse = merge_attention_states_reference(*want)
        go, gl = torch.randn(out.shape, generator=gen), torch.randn(lse.shape, generator=gen)
        ((out * go).sum() + (lse * gl).sum()).backward()
        ((ref_out * go).sum() + (ref_lse * gl).sum()).backward()
        for i, (a, e) in enumerate(zip(got, want)):
            assert_close(a.grad, e.grad, atol=1e-5, rtol=1e-5, name=f"{backend} grad {i}")


def test_merge_backward_of_two_empty_parts_is_zero():
    b, t, h, d = 1, 2, 1, 4
    inf = torch.full((b, h, t), float("-inf"))
    grads = merge_attention_states_backward(torch.ones(b, t, h, d), torch.ones(b, h, t), torch.randn(b, t, h, d), inf,
                                            torch.randn(b, t, h, d), inf, torch.zeros(b, t, h, d), inf)  # fmt: skip
    assert all(bool((g == 0).all()) for g in grads)


@pytest.mark.parametrize("backend", ["cpp", "reference"])
def test_a_segmented_forward_trains_like_one_call(backend):
    """Two memory segments attended apart and merged through their LSEs give the gradients of one call over the
    concatenated memory (the model's [short-term] / [BOS ; long-term] layout)."""
    x = _inputs(2, 4, 6, 4, 2, 16, 9)
    split = 5
    one = _grads(lambda **a: mk.memory_attention(**a, backend=backend), x, True)

    def segmented(q, k, v, mem_k, mem_v, mem_pos, rope_cos, rope_sin, causal, kv_len=None, kv_start=None):
        o1, l1 = mk.memory_attention(q, k, v, mem_k[:, :split], mem_v[:, :split], mem_pos[:split], rope_cos,
                                     rope_sin, causal=causal, backend=backend)  # fmt: skip
        o2, l2 = mk.memory_attention(q, k[:, :0], v[:, :0], mem_k[:, split:], mem_v[:, split:], mem_pos[split:],
                                     rope_cos, rope_sin, causal=causal, backend=backend)  # fmt: skip
        return mk.merge_attention_states(o1, l1, o2, l2, backend=backend)

    two = _grads(segmented, x, True)
    for name in DIFF:
        assert_close(two[name], one[name], atol=1e-5, rtol=1e-5, name=f"d{name}")


def test_opcheck_attention_and_merge():
    x = _inputs(1, 3, 4, 4, 2, 16, 3)
    args = (x["q"].requires_grad_(), x["k"], x["v"], x["mem_k"].requires_grad_(), x["mem_v"], x["mem_pos"].int(),
            x["rope_cos"], x["rope_sin"], 0.25, True, None, None)  # fmt: skip
    torch.library.opcheck(torch.ops.mplus.memory_attention.default, args)
    out, lse = torch.ops.mplus.memory_attention(*args)
    merge = (out.detach().requires_grad_(), lse.detach().requires_grad_(), out.detach(), lse.detach())
    torch.library.opcheck(torch.ops.mplus.merge_attention_states.default, merge)


def test_no_backward_is_asked_silently():
    """Positions, RoPE tables and key ranges are not differentiable; retrieval, gather and the memory update have no
    backward: each refuses an input that asks for a gradient, naming it."""
    x = _inputs(1, 2, 3, 2, 1, 16, 2)
    with pytest.raises(ValueError, match="rope_cos requires grad, but memory_attention is not differentiable"):
        mk.memory_attention(x["q"], x["k"], x["v"], x["mem_k"], x["mem_v"], x["mem_pos"],
                            x["rope_cos"].requires_grad_(), x["rope_sin"])  # fmt: skip
    with pytest.raises(NotImplementedError, match="retrieve_topk: queries requires grad, but retrieve_topk has no"):
        mk.retrieve_topk(torch.randn(3, 8, requires_grad=True), torch.randn(10, 8), 4)
    with pytest.raises(NotImplementedError, match="gather_rows_: src_a requires grad"):
        mk.gather_rows_(torch.empty(2, 4), torch.randn(5, 4, requires_grad=True), torch.randn(0, 4),
                        torch.tensor([0, 1]))  # fmt: skip
    pos = torch.arange(4, dtype=torch.int32).repeat(1, 1)
    slots = [torch.randn(1, 4, 3, requires_grad=True)]
    with pytest.raises(NotImplementedError, match=r"memory_update_: slots\[0\] requires grad"):
        mk.memory_update_(pos, pos.clone(), torch.tensor([[1]]), slots, [torch.randn(1, 1, 3)])
    with torch.no_grad():  # inference: nothing asks for a gradient
        mk.retrieve_topk(torch.randn(3, 8, requires_grad=True), torch.randn(10, 8), 4)


def test_each_backend_runs_its_own_backward():
    """The op's backward on CPU tensors is the C++ kernel (bit for bit), on the interpreter route the Triton one."""
    from mplus_kernels.attention import op

    x = _inputs(1, 3, 4, 4, 2, 16, 3)
    assert op._backward_impl(x["q"], triton=False) is op._cpp_backward
    assert op._backward_impl(_inputs(1, 3, 4, 4, 2, 64, 3)["q"], triton=True).__module__.endswith("triton_backward")
    leaves = {n: t.clone().requires_grad_(n in DIFF) for n, t in x.items()}
    out, lse = mk.memory_attention(**leaves, backend="cpp")
    go = torch.randn(out.shape, generator=torch.Generator().manual_seed(3))
    grads = torch.autograd.grad(out, [leaves[n] for n in DIFF], go)
    raw = torch.ops.mplus.memory_attention_backward(
        go, None, x["q"], x["k"], x["v"], x["mem_k"], x["mem_v"], x["mem_pos"].int(), x["rope_cos"], x["rope_sin"],
        out.detach(), lse.detach(), 0.25, True, None, None,
    )  # fmt: skip
    for name, a, b in zip(DIFF, grads, raw):
        assert torch.equal(a, b), f"d{name}: the autograd path is not the C++ backward"


def test_raw_ops_without_a_backward_refuse_inputs_that_ask_for_one():
    """The raw ops too: torch's fallback ran them and returned gradient-less results (``q.grad`` stayed None, with a
    warning only at backward time)."""
    with pytest.raises(NotImplementedError, match="retrieve_topk: queries requires grad"):
        torch.ops.mplus.retrieve_topk(torch.randn(3, 8, requires_grad=True), torch.randn(10, 8), None, 4)
    with pytest.raises(NotImplementedError, match="gather_rows_: src_a requires grad"):
        torch.ops.mplus.gather_rows_(torch.empty(2, 4), torch.randn(5, 4, requires_grad=True), torch.randn(0, 4),
                                     torch.tensor([0, 1]))  # fmt: skip
    pos = torch.arange(4, dtype=torch.int32)[None]
    with pytest.raises(NotImplementedError, match=r"memory_update_: new_rows\[0\] requires grad"):
        torch.ops.mplus.memory_update_(pos, pos.clone(), torch.tensor([[1]]), [torch.randn(1, 4, 3)],
                                       [torch.randn(1, 1, 3, requires_grad=True)], [torch.empty(1, 1, 3)])  # fmt: skip
    idx, scores = torch.ops.mplus.retrieve_topk(torch.randn(3, 8), torch.randn(10, 8), None, 4)  # no grad: runs
    assert idx.shape == (4,) and scores.grad_fn is None
