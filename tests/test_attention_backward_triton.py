"""Issue 12, item 1: the Triton backward of memory attention (``attention/triton_backward.py``).

The kernels run under the CPU interpreter (conftest sets TRITON_INTERPRET=1) on tiny shapes. fp32 gradients must
equal the PyTorch backward (``backward.memory_attention_backward``, the same recurrence) to 1e-4; fp16 gradients
must be within twice the fp16 reference's own error against an fp64 truth (the FlashAttention rule). Every gradient
buffer starts as NaN (``nan_grads``), so an element a kernel never writes fails the comparison; static caches hold
NaN outside each row's valid keys, which must never reach a gradient.
"""

from __future__ import annotations

import pytest
import torch

import mplus_kernels.attention.triton_backward as tb
from mplus_kernels.attention.backward import memory_attention_backward
from mplus_kernels.attention.reference import memory_attention_reference
from mplus_kernels.attention.triton_impl import memory_attention_fwd
from mplus_kernels.testing import assert_close

P = 64  # RoPE table rows
TINY = tb.BwdConfig(16, 16, 4, 1)  # many row and key blocks through tiny shapes
DIFF = ("q", "k", "v", "mem_k", "mem_v")


@pytest.fixture
def nan_grads(monkeypatch):
    """Every gradient buffer the launcher allocates starts as NaN, so an element never written shows up."""
    monkeypatch.setattr(tb, "_empty", lambda *a, **kw: torch.empty(*a, **kw).fill_(float("nan")))


def _inputs(b, tq, tk, hq, hkv, d, m, dtype=torch.float32, *, ends=None, starts=None, seed=0) -> dict:
    """Inputs of ``memory_attention``; with ``ends``/``starts`` a static cache whose rows outside
    ``[starts[b], ends[b])`` are NaN, and the int32 ``kv_len``/``kv_start`` (None where not given)."""
    gen = torch.Generator().manual_seed(seed)
    rand = lambda *shape: torch.randn(*shape, generator=gen).to(dtype)  # noqa: E731
    angles = torch.arange(P)[:, None].float() * torch.rand(d // 2, generator=gen)
    x = {
        "q": rand(b, tq, hq, d), "k": rand(b, tk, hkv, d), "v": rand(b, tk, hkv, d),
        "mem_k": rand(b, m, hkv, d) if m else None, "mem_v": rand(b, m, hkv, d) if m else None,
        "mem_pos": torch.randint(0, P, (m,), generator=gen) if m else None,
        "rope_cos": angles.cos(), "rope_sin": angles.sin(), "kv_len": None, "kv_start": None,
    }  # fmt: skip
    if ends is not None or starts is not None:
        end = torch.tensor(ends if ends is not None else [tk] * b, dtype=torch.int32)
        start = torch.tensor(starts if starts is not None else [0] * b, dtype=torch.int32)
        j = torch.arange(tk)[None, :]
        garbage = ((j < start[:, None]) | (j >= end[:, None]))[:, :, None, None]
        x["k"], x["v"] = x["k"].masked_fill(garbage, float("nan")), x["v"].masked_fill(garbage, float("nan"))
        x["kv_len"] = None if ends is None else end
        x["kv_start"] = None if starts is None else start
    return x


def _upstream(out, lse, *, with_lse=True, seed=1):
    gen = torch.Generator().manual_seed(seed)
    go = torch.randn(out.shape, generator=gen).half().to(out.dtype)  # the same values in every dtype
    gl = torch.randn(lse.shape, generator=gen) if with_lse else None
    return go, gl


def _args(x, out, lse, go, gl, causal):
    return (go, gl, x["q"], x["k"], x["v"], x["mem_k"], x["mem_v"], x["mem_pos"], x["rope_cos"], x["rope_sin"],
            out, lse, x["q"].shape[-1] ** -0.5, causal, x["kv_len"], x["kv_start"])  # fmt: skip


def _check_fp32(x, causal, config, *, with_lse=True):
    """The Triton gradients against the PyTorch backward, from the Triton forward's out/lse."""
    scale = x["q"].shape[-1] ** -0.5
    out, lse = memory_attention_fwd(x["q"], x["k"], x["v"], x["mem_k"], x["mem_v"], x["mem_pos"], x["rope_cos"],
                                    x["rope_sin"], scale, causal, x["kv_len"], x["kv_start"])  # fmt: skip
    go, gl = _upstream(out, lse, with_lse=with_lse)
    got = tb.memory_attention_bwd(*_args(x, out, lse, go, gl, causal), config=config)
    want = memory_attention_backward(*_args(x, out, lse, go, gl, causal))
    for name, g, w in zip(DIFF, got, want):
        if w is None:
            assert g is None, f"d{name} should be None"
            continue
        assert g.dtype == x[name].dtype and g.shape == x[name].shape, name
        assert_close(g, w, atol=1e-4, rtol=1e-4, name=f"d{name}")
    return got


# (B, Tq, Tk, Hq, Hkv, D, M, config)
CASES = [
    (2, 4, 6, 2, 2, 64, 0, None),  # MHA, no memory
    (1, 3, 7, 8, 2, 64, 5, None),  # odd sizes, GQA 4
    (2, 1, 9, 4, 1, 64, 6, TINY),  # decode (Tq = 1), GQA 4, several key blocks
    (1, 9, 21, 4, 1, 64, 18, TINY),  # several row and key blocks on both ranges
    (1, 6, 4, 2, 2, 64, 3, TINY),  # Tk < Tq: the first queries see only the memory (causal)
    (1, 3, 5, 4, 1, 128, 7, None),  # D = 128
]


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize(("b", "tq", "tk", "hq", "hkv", "d", "m", "config"), CASES)
def test_matches_pytorch_backward(b, tq, tk, hq, hkv, d, m, config, causal, nan_grads):
    _check_fp32(_inputs(b, tq, tk, hq, hkv, d, m), causal, config)


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize(
    ("m", "ends", "starts"),
    [
        (5, [10, 7], [3, 0]),  # left-padded static cache, and a row ending early
        (0, [10, 6], [10, 2]),  # row 0 sees no key at all: lse = -inf, no gradient
        (3, [4, 9], None),  # kv_len only
        (0, None, [5, 1]),  # kv_start only
    ],
)
def test_static_cache_kv_ranges(m, ends, starts, causal, nan_grads):
    """Cache rows outside [kv_start, kv_len) are NaN: they get zero gradient and never leak into the others."""
    x = _inputs(2, 3, 10, 4, 2, 64, m, ends=ends, starts=starts)
    dq, dk, dv, _, _ = _check_fp32(x, causal, TINY)
    for g in (dq, dk, dv):
        assert torch.isfinite(g).all()
    if m == 0 and starts == [10, 2]:
        assert (dq[0] == 0).all()


def test_grad_lse_none_and_grad_out_none(nan_grads):
    x = _inputs(1, 3, 7, 4, 1, 64, 5)
    _check_fp32(x, True, TINY, with_lse=False)
    scale = 64**-0.5
    out, lse = memory_attention_fwd(x["q"], x["k"], x["v"], x["mem_k"], x["mem_v"], x["mem_pos"], x["rope_cos"],
                                    x["rope_sin"], scale, True)  # fmt: skip
    _, gl = _upstream(out, lse)
    got = tb.memory_attention_bwd(*_args(x, out, lse, None, gl, True), config=TINY)
    want = memory_attention_backward(*_args(x, out, lse, None, gl, True))
    for name, g, w in zip(DIFF, got, want):
        assert_close(g, w, atol=1e-4, rtol=1e-4, name=f"d{name} (grad_out None)")


def test_rows_with_lse_minus_inf_get_no_gradient(nan_grads):
    """A row whose saved lse is -inf contributes nothing, whatever its keys (the PyTorch backward's rule)."""
    x = _inputs(1, 3, 7, 4, 2, 64, 5)
    scale = 64**-0.5
    out, lse = memory_attention_fwd(x["q"], x["k"], x["v"], x["mem_k"], x["mem_v"], x["mem_pos"], x["rope_cos"],
                                    x["rope_sin"], scale, True)  # fmt: skip
    lse[0, 1, 2] = float("-inf")
    go, gl = _upstream(out, lse)
    got = tb.memory_attention_bwd(*_args(x, out, lse, go, gl, True), config=TINY)
    want = memory_attention_backward(*_args(x, out, lse, go, gl, True))
    assert (got[0][0, 2, 1] == 0).all()
    for name, g, w in zip(DIFF, got, want):
        assert_close(g, w, atol=1e-4, rtol=1e-4, name=f"d{name}")


def test_memory_without_rotation(nan_grads):
    """``mem_pos`` None: memory keys are used as given (the identity table row)."""
    x = _inputs(1, 3, 7, 4, 2, 64, 5) | {"mem_pos": None}
    _check_fp32(x, True, TINY)


def test_non_contiguous_inputs(nan_grads):
    """Head-sliced views (strided, still 16-byte aligned) and a transposed grad_lse: same gradients."""
    x = _inputs(2, 3, 7, 8, 4, 64, 5)
    # every other head of a [B, T, 2H, D] tensor whose other heads are NaN
    wide = {n: torch.stack([x[n], torch.full_like(x[n], float("nan"))], 3).flatten(2, 3)[:, :, ::2] for n in "qkv"}
    assert not wide["q"].is_contiguous()
    scale = 64**-0.5
    out, lse = memory_attention_fwd(x["q"], x["k"], x["v"], x["mem_k"], x["mem_v"], x["mem_pos"], x["rope_cos"],
                                    x["rope_sin"], scale, True)  # fmt: skip
    go, gl = _upstream(out, lse)
    gl_t = gl.transpose(1, 2).contiguous().transpose(1, 2)  # [B, Hq, Tq] with Tq not the unit-stride dim
    got = tb.memory_attention_bwd(*_args(x | wide, out, lse, go, gl_t, True), config=TINY)
    want = memory_attention_backward(*_args(x, out, lse, go, gl, True))
    for name, g, w in zip(DIFF, got, want):
        assert_close(g, w, atol=1e-4, rtol=1e-4, name=f"d{name}")


def _autograd_grads(x, causal, compute_dtype):
    """Gradients of the reference forward in ``compute_dtype`` (autograd), for the upstream of ``_upstream``."""
    leaves = {n: (t.clone().requires_grad_(n in DIFF) if t is not None else None) for n, t in x.items()}
    out, lse = memory_attention_reference(**leaves, causal=causal, compute_dtype=compute_dtype)
    go, gl = _upstream(out, lse)
    ((out.double() * go.double()).sum() + (lse.double() * gl.double()).sum()).backward()
    return {n: leaves[n].grad for n in DIFF}


@pytest.mark.parametrize("causal", [True, False])
def test_fp16_gradients_within_twice_the_references_own_error(causal, nan_grads):
    """The FlashAttention rule: the kernel's fp16 gradients' error against fp64 is at most twice that of the
    reference run in fp16 (plus a hair for tiny values)."""
    x = _inputs(2, 5, 9, 8, 2, 64, 7, dtype=torch.float16)
    x64 = {n: t.double() if n in DIFF else t for n, t in x.items()}
    truth = _autograd_grads(x64, causal, torch.float64)
    ref = _autograd_grads(x, causal, torch.float16)
    scale = 64**-0.5
    out, lse = memory_attention_fwd(x["q"], x["k"], x["v"], x["mem_k"], x["mem_v"], x["mem_pos"], x["rope_cos"],
                                    x["rope_sin"], scale, causal)  # fmt: skip
    go, gl = _upstream(out, lse)
    got = dict(zip(DIFF, tb.memory_attention_bwd(*_args(x, out, lse, go, gl, causal), config=TINY)))
    for name in DIFF:
        assert got[name].dtype == torch.float16
        err = (got[name].double() - truth[name]).abs().max()
        err_ref = (ref[name].double() - truth[name]).abs().max()
        assert err <= 2 * err_ref + 1e-3, f"d{name}: triton error {err:.3g}, fp16 reference {err_ref:.3g}"


def test_unsupported_head_dim_raises():
    with pytest.raises(ValueError, match="head_dim"):
        tb.select_config("dq", 32, torch.float16)


def test_compile_specs_cover_every_kernel():
    """Each launched kernel of the module has a compile spec (under the interpreter the kernels are not
    JITFunctions, so this checks the names the specs point at)."""
    names = {spec.fn.__name__ if hasattr(spec.fn, "__name__") else spec.fn.fn.__name__ for spec in tb.compile_specs()}
    assert {"_attn_bwd_preprocess_kernel", "_attn_bwd_dkdv_kernel", "_attn_bwd_dq_kernel"} <= names, names
