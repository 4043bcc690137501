"""Issue 12: the C++ CPU backward of memory attention (``torch.ops.mplus.memory_attention_backward``,
csrc/cpu/attention_backward.cpp) against the PyTorch backward it replaces (``attention/backward.py``).

fp32 gradients match the PyTorch recurrence within 2e-5 over GQA ratios, memory with and without RoPE positions,
causal and not, left-padded static caches whose invalid rows hold NaN, decode and odd shapes; bf16/fp16 gradients
obey the FlashAttention 2× rule against an fp64 truth; bad input raises naming the argument; and the results do not
depend on the thread count. Every test runs once per ISA level this CPU executes (the ``cpu_isa`` fixture).
"""

from __future__ import annotations

import pytest
import torch

from mplus_kernels import _backend
from mplus_kernels.attention.backward import memory_attention_backward
from mplus_kernels.attention.reference import memory_attention_reference
from mplus_kernels.testing import assert_close, assert_equal

if not _backend.cpp_available():  # a missing build is a failure, not a skip
    raise ImportError(f"the C++ extension did not load: {_backend.cpp_import_error()}")

pytestmark = pytest.mark.usefixtures("cpu_isa")

OP = torch.ops.mplus.memory_attention_backward
FWD = torch.ops.mplus.memory_attention
P = 64  # RoPE table rows
NAMES = ("dq", "dk", "dv", "dmem_k", "dmem_v")


def _case(b, tq, tk, hq, hkv, d, m, *, pos=True, ranges=False, causal=True, dtype=torch.float32, seed=0):
    """Inputs of one backward call: the forward's out/lse from the C++ forward, random upstream gradients. With
    `ranges`, row b keeps chunk keys [kv_start, kv_len) = [b, tk - b) and the rows outside hold NaN."""
    gen = torch.Generator().manual_seed(seed)
    rand = lambda *shape: torch.randn(*shape, generator=gen).to(dtype)  # noqa: E731
    q, k, v = rand(b, tq, hq, d), rand(b, tk, hkv, d), rand(b, tk, hkv, d)
    mem_k, mem_v = (rand(b, m, hkv, d), rand(b, m, hkv, d)) if m >= 0 else (None, None)
    angles = torch.arange(P)[:, None].float() * torch.rand(d // 2, generator=gen)
    mem_pos = torch.randint(0, P, (max(m, 0),), generator=gen, dtype=torch.int32) if pos and m > 0 else None
    kv_len = kv_start = None
    if ranges:
        kv_start = torch.arange(b, dtype=torch.int32).clamp(max=tk // 2)
        kv_len = (tk - torch.arange(b, dtype=torch.int32)).clamp(min=tk // 2)
        for r in range(b):  # a static cache: garbage outside the valid rows must not leak into any gradient
            for t in (k, v):
                t[r, : kv_start[r]] = float("nan")
                t[r, kv_len[r] :] = float("nan")
    x = {"q": q, "k": k, "v": v, "mem_k": mem_k, "mem_v": mem_v, "mem_pos": mem_pos, "rope_cos": angles.cos(),
         "rope_sin": angles.sin(), "softmax_scale": d**-0.5, "causal": causal, "kv_len": kv_len,
         "kv_start": kv_start}  # fmt: skip
    out, lse = FWD(*x.values())
    grad_out = torch.randn(out.shape, generator=gen).to(dtype)
    grad_lse = torch.randn(lse.shape, generator=gen)
    return {"grad_out": grad_out, "grad_lse": grad_lse, **x, "out": out, "lse": lse}


ARGS = ("grad_out", "grad_lse", "q", "k", "v", "mem_k", "mem_v", "mem_pos", "rope_cos", "rope_sin", "out", "lse",
        "softmax_scale", "causal", "kv_len", "kv_start")  # fmt: skip


def _call(fn, c):
    return fn(*(c[n] for n in ARGS))


CASES = [  # (B, Tq, Tk, Hq, Hkv, D, M); M = -1: no memory (None)
    (2, 5, 7, 4, 4, 16, 6),  # GQA 1
    (2, 6, 9, 8, 2, 64, 70),  # GQA 4, memory across two key blocks
    (2, 4, 4, 8, 1, 16, 0),  # GQA 8, an empty memory
    (2, 4, 70, 8, 1, 16, -1),  # GQA 8, no memory, chunk across two key blocks
    (2, 1, 12, 4, 1, 128, 3),  # a decode step
    (2, 3, 7, 4, 2, 16, 5),  # odd sizes
    (2, 20, 9, 2, 1, 128, 5),  # more queries than one dQ block
]


@pytest.mark.parametrize("case", CASES, ids=[f"B{c[0]}Tq{c[1]}Tk{c[2]}H{c[3]}/{c[4]}D{c[5]}M{c[6]}" for c in CASES])
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
@pytest.mark.parametrize("ranges", [False, True], ids=["dense", "static-cache"])
@pytest.mark.parametrize("pos", [True, False], ids=["rope", "no-rope"])
def test_matches_the_pytorch_backward(case, causal, ranges, pos):
    c = _case(*case, pos=pos, ranges=ranges, causal=causal)
    got = _call(OP, c)
    want = _call(memory_attention_backward, c)
    b, hkv, d = case[0], case[4], case[5]
    for name, g, w in zip(NAMES, got, want):
        assert bool(torch.isfinite(g).all()), f"{name}: non-finite values (a garbage cache row leaked)"
        if w is None:  # no memory: empty gradients
            assert g.shape == (b, 0, hkv, d), f"{name}: {list(g.shape)} for an absent memory"
            continue
        assert g.dtype == w.dtype and g.shape == w.shape, f"{name}: {g.dtype} {list(g.shape)}"
        assert_close(g, w, atol=2e-5, rtol=1e-5, name=name)
    if ranges:  # keys outside [kv_start, kv_len) get exactly 0
        for name, g in (("dk", got[1]), ("dv", got[2])):
            for r in range(b):
                lo, hi = int(c["kv_start"][r]), int(c["kv_len"][r])
                assert not bool(g[r, :lo].any()) and not bool(g[r, hi:].any()), f"{name}: row {r} outside range"


def test_queries_that_see_nothing_get_no_gradient():
    """Causal, no memory, a query before the row's first valid key: lse = -inf, dq = 0, and nothing flows back."""
    c = _case(2, 4, 6, 4, 2, 16, -1)
    c["kv_start"] = torch.tensor([0, 4], dtype=torch.int32)
    c["kv_len"] = torch.tensor([6, 6], dtype=torch.int32)
    c["out"], c["lse"] = FWD(*(c[n] for n in ("q", "k", "v", "mem_k", "mem_v", "mem_pos", "rope_cos", "rope_sin",
                                              "softmax_scale", "causal", "kv_len", "kv_start")))  # fmt: skip
    assert bool(torch.isinf(c["lse"]).any())
    got, want = _call(OP, c), _call(memory_attention_backward, c)
    for name, g, w in zip(NAMES[:3], got, want):
        assert_close(g, w, atol=2e-5, rtol=1e-5, name=name)
    dead = torch.isinf(c["lse"]).transpose(1, 2)  # [B, Tq, Hq]
    assert not bool(got[0][dead].any())


def test_grad_lse_none_is_zero():
    c = _case(2, 5, 7, 8, 2, 16, 6)
    got = _call(OP, {**c, "grad_lse": None})
    zero = _call(OP, {**c, "grad_lse": torch.zeros_like(c["grad_lse"])})
    want = _call(memory_attention_backward, {**c, "grad_lse": None})
    for name, g, z, w in zip(NAMES, got, zero, want):
        assert_equal(g, z, name=name)
        assert_close(g, w, atol=2e-5, rtol=1e-5, name=name)


def _fp64(c):
    return {n: t.double() if isinstance(t, torch.Tensor) and t.is_floating_point() and n not in (
        "rope_cos", "rope_sin") else t for n, t in c.items()}  # fmt: skip


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_gradients_within_twice_the_references_own_error(dtype):
    """The FlashAttention rule: the error against fp64 of the C++ gradients (low-precision inputs) is at most twice
    that of autograd through the reference run in the same low precision (plus a hair for tiny values)."""
    c = _case(2, 6, 9, 8, 2, 64, 7, ranges=True, dtype=dtype)
    fwd_args = ("q", "k", "v", "mem_k", "mem_v", "mem_pos", "rope_cos", "rope_sin")
    kv = {"causal": True, "kv_len": c["kv_len"], "kv_start": c["kv_start"]}
    diff = ("q", "k", "v", "mem_k", "mem_v")

    def autograd(compute_dtype, cast):
        leaves = {n: cast(c[n]).clone().requires_grad_(n in diff) for n in fwd_args if c[n] is not None}
        out, lse = memory_attention_reference(**leaves, **kv, compute_dtype=compute_dtype)
        keep = torch.isfinite(lse)
        loss = (out.double() * c["grad_out"].double()).sum() + (lse.masked_fill(~keep, 0) * c["grad_lse"]).sum()
        loss.backward()
        return [leaves[n].grad.double() for n in diff]

    to64 = lambda t: t.double() if t.is_floating_point() and t.dtype != torch.float32 else t  # noqa: E731
    truth = autograd(torch.float64, to64)
    ref = autograd(dtype, lambda t: t)
    fused = _call(OP, c)
    for name, f, r, t in zip(NAMES, fused, ref, truth):
        assert f.dtype == dtype, f"{name}: {f.dtype}"
        rows = ~torch.isnan(t)  # dk/dv of the NaN cache rows: the reference's own autograd gives NaN there
        err_fused = (f.double() - t)[rows].abs().max()
        err_ref = (r - t)[rows].abs().max()
        assert err_fused <= 2 * err_ref + 1e-3, f"{name}: fused error {err_fused:.3g}, reference {err_ref:.3g}"


@pytest.mark.parametrize("case", [(2, 40, 150, 8, 2, 64, 130), (1, 33, 150, 6, 3, 64, 70)])
def test_bit_identical_across_thread_counts(case):
    """The reduction order is fixed by the shapes: 1, 2 and 3 threads (odd task counts split mid-head) agree."""
    c = _case(*case, ranges=True)
    before = torch.get_num_threads()
    try:
        results = []
        for n in (1, 2, 3):
            torch.set_num_threads(n)
            results.append(_call(OP, c))
    finally:
        torch.set_num_threads(before)
    for other in results[1:]:
        for name, a, b in zip(NAMES, results[0], other):
            assert_equal(b, a, name=name)


def test_fake_kernel_and_schema():
    c = _case(2, 3, 5, 4, 2, 16, 4)
    torch.library.opcheck(OP.default, tuple(c[n] for n in ARGS), test_utils=("test_schema", "test_faketensor"))
    meta = {n: t.to("meta") if isinstance(t, torch.Tensor) else t for n, t in c.items()}
    for got, want in zip(_call(OP, meta), _call(OP, c)):
        assert got.shape == want.shape and got.dtype == want.dtype
    no_mem = _case(2, 3, 5, 4, 2, 16, -1)
    meta = {n: t.to("meta") if isinstance(t, torch.Tensor) else t for n, t in no_mem.items()}
    assert [tuple(g.shape) for g in _call(OP, meta)[3:]] == [(2, 0, 2, 16)] * 2


BAD = [  # (argument, how it is broken, error, message)
    ("q", lambda c: c["q"].double(), TypeError, "q must be float32"),
    ("grad_out", lambda c: c["grad_out"].half(), TypeError, "grad_out has dtype"),
    ("grad_out", lambda c: c["grad_out"][:, :2], ValueError, "grad_out has shape"),
    ("out", lambda c: c["out"][..., :8], ValueError, "out has shape"),
    ("lse", lambda c: c["lse"].double(), TypeError, "lse must be float32"),
    ("lse", lambda c: c["lse"][:, :, :2], ValueError, "lse must be a CPU"),
    ("grad_lse", lambda c: c["grad_lse"][:1], ValueError, "grad_lse must be a CPU"),
    ("k", lambda c: c["k"][..., :8], ValueError, "k has shape"),
    ("v", lambda c: c["v"][:, :3], ValueError, "v has shape"),
    ("k", lambda c: c["k"][:, :, :1].expand(-1, -1, 3, -1), ValueError, "must be a multiple of Hkv"),
    ("mem_v", lambda c: None, ValueError, "give both mem_k and mem_v"),
    ("mem_v", lambda c: c["mem_v"][:, :2], ValueError, "mem_v has shape"),
    ("mem_pos", lambda c: c["mem_pos"].long(), ValueError, "mem_pos must be a CPU int32"),
    ("mem_pos", lambda c: c["mem_pos"] + P, ValueError, "mem_pos values must lie in"),
    ("rope_sin", lambda c: None, ValueError, "mem_pos needs rope_cos/rope_sin"),
    ("rope_cos", lambda c: c["rope_cos"][:, :3], ValueError, "rope_cos must be a CPU float32"),
    ("kv_len", lambda c: torch.tensor([5, 6], dtype=torch.int32), ValueError, "kv_len <= Tk"),
    ("kv_start", lambda c: torch.tensor([3, 0], dtype=torch.int32), ValueError, "0 <= kv_start <= kv_len"),
    ("kv_len", lambda c: torch.tensor([5, 5]), ValueError, "kv_len must be a CPU int32"),
]


@pytest.mark.parametrize("name, bad, error, match", BAD, ids=[f"{b[0]}-{i}" for i, b in enumerate(BAD)])
def test_bad_input_names_the_argument(name, bad, error, match):
    c = _case(2, 3, 5, 4, 2, 16, 4)
    c["kv_len"] = torch.tensor([5, 2], dtype=torch.int32) if name != "kv_len" else c["kv_len"]
    c["kv_start"] = torch.tensor([0, 1], dtype=torch.int32) if name != "kv_start" else c["kv_start"]
    if name == "kv_start":
        c["kv_len"] = torch.tensor([2, 5], dtype=torch.int32)
    with pytest.raises(error, match=match):
        _call(OP, {**c, name: bad(c)})
