"""The bf16 levels' own kernels: memory attention on bf16 matrix products (csrc/cpu/attention_prefill_bf16.h on
csrc/cpu/bf16_gemm.h: vdpbf16ps at avx512_bf16, ATen's brgemm at amx) and the decode's vdpbf16ps P.V
(csrc/cpu/attention_decode.h), against the fp32 reference with the tolerances every level meets (tests/
test_attention_cpu.py's ``check``: FlashAttention's rule for bf16 outputs, 1e-4 on the LSE).

Every test runs once per ISA level (the ``cpu_isa`` fixture): at avx512_bf16 and amx it exercises the code above, at
the other levels the same shapes through the fp32 kernels; a level this CPU lacks is reported as skipped, with the
feature it lacks (``mplus_kernels.cpu_isa_missing``). The shapes cross the bf16 kernels' tiles: blocks of 64 keys,
row groups of 48 rows, head dims padded to 32, rotated memory keys split into two bf16 halves (whose sum the LSE
tolerance needs: one bf16 rounding of a rotated key moves the LSE by ~1e-3), pairs of keys in the decode's P.V.
"""

from __future__ import annotations

import math

import pytest
import torch

from mplus_kernels import _backend
from mplus_kernels.testing import assert_equal
from tests.test_attention_cpu import attention, check, make_case, static_cache

if not _backend.cpp_available():  # a missing build is a failure, not a skip
    raise ImportError(f"the C++ extension did not load: {_backend.cpp_import_error()}")

pytestmark = pytest.mark.usefixtures("cpu_isa")  # every test once per ISA level (conftest.py)

BF16 = torch.bfloat16


# --- prefill: blocks of 64 keys, row groups of 48 rows (G x queries), head dims padded to 32 ----------------------
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("m", [1, 63, 64, 65, 300])
@pytest.mark.parametrize(("tq", "group"), [(9, 1), (12, 4), (13, 8), (63, 4), (129, 1)])
def test_prefill_tiles(tq, group, m, causal):
    """Row counts around the 48-row groups (9, 48, 104, 252, 129) and memory lengths around the 64-key blocks; one
    memory key (the LSE is then the rotation's precision alone)."""
    args = make_case(2, tq, tq, m, group, 1, 128, BF16, gen_seed=tq * 5 + m)
    check(args, 1 / math.sqrt(128), causal, name=f"Tq={tq} G={group} M={m} causal={causal}")


@pytest.mark.parametrize("use_pos", [True, False])
@pytest.mark.parametrize("d", [8, 40, 64, 96, 256])
def test_prefill_head_dims(d, use_pos):
    """Head dims below, at and between multiples of 32 (the products' K is padded to 32 with zeros); memory keys
    rotated (two bf16 halves) or used as given (bf16 as they are)."""
    args = make_case(1, 20, 23, 70, 8, 2, d, BF16, use_pos=use_pos, gen_seed=d)
    check(args, 1 / math.sqrt(d), True, name=f"D={d} pos={use_pos}")


@pytest.mark.parametrize("scale", [0.02, 1.0, 4.0])
def test_prefill_large_scores(scale):
    """Large and tiny softmax scales: the running max moves within and across blocks, p rounds to 0 or stays 1."""
    args = make_case(1, 70, 70, 130, 4, 1, 64, BF16, gen_seed=7)
    check(args, scale, True, name=f"scale={scale}")


@pytest.mark.parametrize(
    ("ends", "starts"), [([90, 41, 0], None), ([90, 41, 64], [0, 7, 64]), ([2, 90, 33], [1, 33, 0])]
)
def test_prefill_kv_ranges(ends, starts):
    """A static cache: each row's valid chunk keys, causality aligned to the row's end; NaN rows outside never read."""
    args = make_case(3, 40, 90, 37, 8, 2, 64, BF16, gen_seed=3)
    args, kv = static_cache(args, ends, starts)
    out, lse = check(args, 0.125, True, kv=kv, name="kv ranges")
    assert not lse.isnan().any()


def test_prefill_non_contiguous_inputs():
    """Head-strided q, k/v rows of a preallocated cache, a memory expanded over the batch: the packing reads rows
    through their strides (the same bits as dense inputs)."""
    b, tq, hq, hkv, d, m = 2, 33, 8, 2, 64, 90
    qbuf = torch.randn(b, tq, 2 * hq, d).to(BF16)
    cache = torch.randn(2, b, 128, hkv, d).to(BF16)
    pool = torch.randn(1, 2 * m, hkv, d).to(BF16)
    q, k, v = qbuf[:, :, ::2], cache[0, :, 3 : 3 + tq], cache[1, :, 3 : 3 + tq]
    mem_k, mem_v = pool[:, :m].expand(b, -1, -1, -1), pool[:, m:].expand(b, -1, -1, -1)
    _, _, _, _, _, pos, cos, sin = make_case(1, 1, 1, m, 1, 1, d, BF16)
    args = (q, k, v, mem_k, mem_v, pos, cos, sin)
    out, lse = check(args, 0.125, True, name="strided")
    out_d, lse_d = attention(*(x.contiguous() for x in args), 0.125, True)
    assert_equal(out, out_d, name="strided vs dense out")
    assert_equal(lse, lse_d, name="strided vs dense lse")


# --- decode: P.V on pairs of keys ----------------------------------------------------------------------------------
@pytest.mark.parametrize("m", [0, 1, 2, 63, 65, 1100])
@pytest.mark.parametrize(("tq", "tk", "group"), [(1, 1, 1), (1, 3, 4), (1, 37, 8), (2, 5, 4), (8, 9, 1)])
def test_decode_key_pairs(tq, tk, group, m):
    """Odd and even key counts per block (the last pair's second key a zero row), one split or several (1100 + Tk
    keys: split-KV with its merge)."""
    args = make_case(1, tq, tk, m, group, 1, 128, BF16, gen_seed=m + tk)
    check(args, 1 / math.sqrt(128), True, name=f"decode Tq={tq} Tk={tk} G={group} M={m}")


@pytest.mark.parametrize("d", [64, 256])
def test_decode_head_dims(d):
    args = make_case(2, 1, 17, 300, 4, 2, d, BF16, gen_seed=d)
    check(args, 1 / math.sqrt(d), True, name=f"decode D={d}")


# --- bits independent of the thread count ----------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("b", "tq", "group", "m"), [(1, 300, 4, 200), (2, 64, 8, 90), (1, 1, 4, 4100), (2, 2, 4, 1500)]
)
def test_bits_do_not_depend_on_thread_count(b, tq, group, m):
    """Prefill (several query blocks: several tasks) and split-KV decode: 1 and 2 threads give the same bits."""
    args = make_case(b, tq, tq + 11, m, 2 * group, 2, 128, BF16, gen_seed=m)
    old = torch.get_num_threads()
    try:
        results = []
        for threads in (1, 2):
            torch.set_num_threads(threads)
            results.append(attention(*args, 1 / math.sqrt(128), True))
    finally:
        torch.set_num_threads(old)
    assert_equal(results[1][0], results[0][0], name="out on 2 threads vs 1")
    assert_equal(results[1][1], results[0][1], name="lse on 2 threads vs 1")


# --- bad input, at every level ----------------------------------------------------------------------------------------
def test_rejects_bad_inputs():
    q, k, v, mem_k, mem_v, pos, cos, sin = make_case(1, 4, 4, 10, 4, 2, 64, BF16)
    with pytest.raises(TypeError, match="k has dtype Half, expected q's dtype BFloat16"):
        attention(q, k.half(), v, mem_k, mem_v, pos, cos, sin, 0.1, True)
    with pytest.raises(TypeError, match="mem_v has dtype Float, expected q's dtype BFloat16"):
        attention(q, k, v, mem_k, mem_v.float(), pos, cos, sin, 0.1, True)
    with pytest.raises(ValueError, match="multiple of Hkv"):
        attention(q[:, :, :3], k, v, mem_k, mem_v, pos, cos, sin, 0.1, True)
    with pytest.raises(ValueError, match=r"mem_pos values must lie in \[0, \d+\)"):
        attention(q, k, v, mem_k, mem_v, pos + 1000, cos, sin, 0.1, True)
    with pytest.raises(ValueError, match="head dim 1100"):
        big = torch.zeros(1, 1, 1, 1100, dtype=BF16)
        attention(big, big, big, None, None, None, None, None, 0.1, True)
