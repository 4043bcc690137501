"""The bf16 levels' own backward: memory attention's gradients on bf16 matrix products (csrc/cpu/
attention_backward_bf16.h on csrc/cpu/bf16_gemm.h: vdpbf16ps at avx512_bf16, ATen's brgemm at amx), against the
fp64 truth with the tolerance every level meets (tests/test_attention_backward_cpu.py's: FlashAttention's rule, the
error at most twice that of autograd through the reference run in bf16, plus 1e-3).

Every test runs once per ISA level (the ``cpu_isa`` fixture): at avx512_bf16 and amx it exercises the code above, at
the other levels the same shapes through the fp32 kernel; a level this CPU lacks is reported as skipped, with the
feature it lacks. The shapes cross the bf16 kernel's tiles: blocks of 96 keys (M and Tk around 96, 192), chunks of
64 query rows (G x Tq around 64, rows padded to 32), passes of 1,024 rows, head dims padded to 32, rotated memory keys
(the scores on two bf16 halves) and keys used as given, causal and not, static-cache ranges whose invalid rows hold
NaN, and splits of the key blocks (long memories) whose partial dQ are added in a fixed order.
"""

from __future__ import annotations

import pytest
import torch

from mplus_kernels import _backend
from mplus_kernels.attention.reference import memory_attention_reference
from mplus_kernels.testing import assert_equal
from tests.test_attention_backward_cpu import NAMES, OP, _call, _case

if not _backend.cpp_available():  # a missing build is a failure, not a skip
    raise ImportError(f"the C++ extension did not load: {_backend.cpp_import_error()}")

pytestmark = pytest.mark.usefixtures("cpu_isa")  # every test once per ISA level (conftest.py)

BF16 = torch.bfloat16
FWD_ARGS = ("q", "k", "v", "mem_k", "mem_v", "mem_pos", "rope_cos", "rope_sin")
DIFF = ("q", "k", "v", "mem_k", "mem_v")


def _autograd(c, compute_dtype, cast):
    """Gradients of (out·grad_out + lse·grad_lse) through the reference computed in compute_dtype."""
    leaves = {n: cast(c[n]).clone().requires_grad_(n in DIFF) for n in FWD_ARGS if c[n] is not None}
    kw = {"softmax_scale": c["softmax_scale"], "causal": c["causal"], "kv_len": c["kv_len"], "kv_start": c["kv_start"]}
    out, lse = memory_attention_reference(**leaves, **kw, compute_dtype=compute_dtype)
    keep = torch.isfinite(lse)
    loss = (out.double() * c["grad_out"].double()).sum() + (lse.masked_fill(~keep, 0) * c["grad_lse"]).sum()
    loss.backward()
    # an empty memory (M = 0) takes no part: no gradient, i.e. an empty one
    grads = {n: x.grad if x.grad is not None else torch.zeros_like(x) for n, x in leaves.items()}
    return [grads[n].double() if n in grads else None for n in DIFF]


def check(c, name=""):
    """The C++ gradients of case c (bf16) against the fp64 truth: FlashAttention's rule."""
    to64 = lambda t: t.double() if t.is_floating_point() and t.dtype != torch.float32 else t  # noqa: E731
    truth = _autograd(c, torch.float64, to64)
    ref = _autograd(c, BF16, lambda t: t)
    fused = _call(OP, c)
    for g, f, r, t in zip(NAMES, fused, ref, truth):
        assert f.dtype == BF16, f"{name} {g}: {f.dtype}"
        if t is None:  # no memory
            assert f.numel() == 0, f"{name} {g}: {list(f.shape)} for an absent memory"
            continue
        rows = ~torch.isnan(t)  # dk/dv of the NaN cache rows: the reference's own autograd gives NaN there
        assert bool(torch.isfinite(f).all()), f"{name} {g}: non-finite values (a garbage cache row leaked)"
        err_fused = float((f.double() - t)[rows].abs().max()) if rows.any() else 0.0
        err_ref = float((r - t)[rows].abs().max()) if rows.any() else 0.0
        assert err_fused <= 2 * err_ref + 1e-3, f"{name} {g}: fused error {err_fused:.3g}, reference {err_ref:.3g}"
    return fused


# --- tiles: 96-key blocks, 64-row chunks padded to 32, 1,024-row passes ----------------------------------------------
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
@pytest.mark.parametrize("m", [1, 95, 97, 200])
@pytest.mark.parametrize(("tq", "group"), [(9, 1), (16, 4), (33, 2), (97, 1), (129, 8)])
def test_tiles(tq, group, m, causal):
    """Rows 9, 64, 66, 97 and 1,032 (two passes), chunk keys as many as the queries (a causal diagonal inside and
    across blocks), memories of one key, around one block and over two."""
    c = _case(1, tq, tq, group, 1, 128, m, causal=causal, dtype=BF16, seed=tq * 7 + m)
    check(c, f"Tq={tq} G={group} M={m}")


@pytest.mark.parametrize("pos", [True, False], ids=["rope", "no-rope"])
@pytest.mark.parametrize("d", [8, 40, 64, 96, 256])
def test_head_dims(d, pos):
    """Head dims below, at and between multiples of 32 (zero-padded K of the scores, N of dV/dK); memory keys rotated
    (two bf16 halves in the scores) or used as given (bf16 numbers)."""
    c = _case(2, 20, 23, 8, 2, d, 70, pos=pos, dtype=BF16, seed=d)
    check(c, f"D={d} pos={pos}")


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
@pytest.mark.parametrize(("tq", "tk", "m"), [(40, 150, 130), (5, 200, 0), (70, 97, -1)])
def test_static_cache_ranges(tq, tk, m, causal):
    """Each row's valid chunk keys [b, Tk - b), causality aligned to the row's end; NaN rows outside never read, their
    dk/dv exactly 0. Chunk blocks start at the row's first valid key; an empty memory; no memory."""
    c = _case(3, tq, tk, 8, 2, 64, m, ranges=True, causal=causal, dtype=BF16, seed=tk + m)
    _, dk, dv, _, _ = check(c, f"Tq={tq} Tk={tk} M={m}")
    for name, g in (("dk", dk), ("dv", dv)):
        for r in range(3):
            lo, hi = int(c["kv_start"][r]), int(c["kv_len"][r])
            assert not bool(g[r, :lo].any()) and not bool(g[r, hi:].any()), f"{name}: row {r} outside its range"


def test_long_memory_splits():
    """1,700 memory keys: 18 blocks, two splits of the key blocks per head, their partial dQ added in split order."""
    c = _case(1, 24, 24, 4, 1, 64, 1700, dtype=BF16, seed=5)
    check(c, "M=1700")


def test_queries_that_see_nothing_get_no_gradient():
    """A causal query before its row's first valid key and no memory: lse = -inf, p = 0, dq = 0."""
    c = _case(2, 4, 6, 4, 2, 32, -1, dtype=BF16)
    c["kv_start"] = torch.tensor([0, 4], dtype=torch.int32)
    c["kv_len"] = torch.tensor([6, 6], dtype=torch.int32)
    fwd = ("q", "k", "v", "mem_k", "mem_v", "mem_pos", "rope_cos", "rope_sin", "softmax_scale", "causal", "kv_len",
           "kv_start")  # fmt: skip
    c["out"], c["lse"] = torch.ops.mplus.memory_attention(*(c[n] for n in fwd))
    assert bool(torch.isinf(c["lse"]).any())
    dq = check(c, "dead rows")[0]
    assert not bool(dq[torch.isinf(c["lse"]).transpose(1, 2)].any())


# --- the bf16 kernel runs where it should, and its bits do not depend on the thread count ---------------------------
def test_bf16_levels_run_their_own_kernel(cpu_isa):
    """bf16 inputs at avx512_bf16 / amx give other bits than the fp32 kernel (avx512's); fp32 inputs the same bits."""
    if cpu_isa in ("baseline", "avx2") or "avx512" not in _backend.supported_cpu_isas():
        pytest.skip("compared with avx512's fp32 kernel, which the levels below do not run")
    results = {}
    for dtype in (BF16, torch.float32):
        c = _case(1, 20, 20, 4, 2, 64, 100, dtype=dtype, seed=1)
        got = _call(OP, c)
        with _backend.use_cpu_isa("avx512"):
            fp32 = _call(OP, c)
        results[dtype] = all(torch.equal(a, b) for a, b in zip(got, fp32))
    assert results[torch.float32], "fp32 inputs must run the fp32 kernel at every level >= avx512"
    assert results[BF16] == (cpu_isa not in ("avx512_bf16", "amx")), f"{cpu_isa}: bf16 kernel ran where it should not"


@pytest.mark.parametrize(
    ("b", "tq", "group", "m", "tk"), [(1, 40, 8, 130, 150), (1, 33, 2, 1700, 40), (2, 129, 8, 50, 129)]
)
def test_bits_do_not_depend_on_thread_count(b, tq, group, m, tk):
    """1 and 2 threads give the same bits: several heads, key-block splits (1,700 keys), two row passes (1,032 rows)."""
    c = _case(b, tq, tk, 2 * group, 2, 64, m, ranges=True, dtype=BF16, seed=m)
    old = torch.get_num_threads()
    try:
        results = []
        for threads in (1, 2):
            torch.set_num_threads(threads)
            results.append(_call(OP, c))
    finally:
        torch.set_num_threads(old)
    for name, one, two in zip(NAMES, *results):
        assert_equal(two, one, name=f"{name} on 2 threads vs 1")
