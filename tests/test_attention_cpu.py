"""The C++ CPU kernels of memory attention and of the exact merge (csrc/cpu/attention.cpp), called directly through
``torch.ops.mplus`` and compared with the fp32 reference (mplus_kernels/attention/reference.py).

Tolerances: fp32 outputs with ``assert_close`` (TOLERANCES[fp32]); bf16/fp16 outputs with FlashAttention's rule
(``assert_within_reference_error``: no worse than twice the reference's own error when it runs in that precision);
LSE (always fp32 arithmetic inside the kernel) against the fp32 reference at 1e-4.
The kernel has two paths — "decode" (G*Tq <= 8 rows per KV head and D in {64, 128, 256}, split-KV) and "prefill"
(rows in vector lanes, 32-key tiles) — and the shapes below exercise both, with tails in every blocked dimension.
"""

from __future__ import annotations

import contextlib
import math

import pytest
import torch

import mplus_kernels  # noqa: F401  (loads the extension: registers the ops and their CPU kernels)
from mplus_kernels import _backend
from mplus_kernels.attention.reference import memory_attention_reference, merge_attention_states_reference
from mplus_kernels.testing import assert_close, assert_equal, assert_within_reference_error

if not _backend.cpp_available():  # a missing build is a failure, not a skip
    raise ImportError(f"the C++ extension did not load: {_backend.cpp_import_error()}")

pytestmark = pytest.mark.usefixtures("cpu_isa")  # every test once per ISA level this CPU runs (conftest.py)

attention = torch.ops.mplus.memory_attention
merge = torch.ops.mplus.merge_attention_states
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
LSE_TOL = 1e-4


def rope_tables(p: int, d: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Llama-style tables [P, D/2] (theta 500000), fp32."""
    inv = 1.0 / (500000.0 ** (torch.arange(0, d, 2, dtype=torch.float32) / d))
    ang = torch.arange(p, dtype=torch.float32)[:, None] * inv[None]
    return ang.cos(), ang.sin()


def make_case(b, tq, tk, m, hq, hkv, d, dtype, *, use_pos=True, gen_seed=0):
    """Inputs of one call: q, k, v, mem_k, mem_v (None when m is None), mem_pos (a random permutation of slot
    positions, as after memory updates), rope tables."""
    g = torch.Generator().manual_seed(gen_seed)
    rnd = lambda *s: torch.randn(*s, generator=g).to(dtype)  # noqa: E731
    q, k, v = rnd(b, tq, hq, d), rnd(b, tk, hkv, d), rnd(b, tk, hkv, d)
    mem_k = mem_v = pos = cos = sin = None
    if m is not None:
        mem_k, mem_v = rnd(b, m, hkv, d), rnd(b, m, hkv, d)
        if use_pos:
            cos, sin = rope_tables(m + tk + 16, d)
            pos = torch.randperm(m + 16, generator=g)[:m].to(torch.int32)
    return q, k, v, mem_k, mem_v, pos, cos, sin


@contextlib.contextmanager
def one_thread():
    """The references run on one thread: on a CPU shared with other jobs, multi-threaded ATen ops spin-wait at every
    barrier and slow the whole file ten-fold. The kernels keep the default threads (their parallel paths are tested)."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(old)


def reference(*args, **kwargs):
    with one_thread():
        return memory_attention_reference(*args, **kwargs)


def check(args, scale, causal, *, kv=(None, None), name=""):
    """Run the kernel on ``args`` (and ``kv = (kv_len, kv_start)``) and compare out and lse with the reference;
    return (out, lse)."""
    q = args[0]
    out, lse = attention(*args, scale, causal, *kv)
    ref, ref_lse = reference(*args, softmax_scale=scale, causal=causal, kv_len=kv[0], kv_start=kv[1])
    assert out.dtype == q.dtype and out.shape == q.shape and out.is_contiguous()
    assert lse.dtype == torch.float32 and lse.shape == (q.shape[0], q.shape[2], q.shape[1])
    assert not out.isnan().any(), f"{name}: NaN in out"
    if q.dtype == torch.float32:
        assert_close(out, ref, name=f"{name} out")
    else:
        ref_lowp, _ = reference(
            *args, softmax_scale=scale, causal=causal, kv_len=kv[0], kv_start=kv[1], compute_dtype=q.dtype
        )
        assert_within_reference_error(out, ref, ref_lowp, name=f"{name} out")
    check_lse(lse, ref_lse, name=f"{name} lse")
    return out, lse


def check_lse(lse, ref_lse, *, name="lse"):
    """Same -inf pattern (rows that see no key), finite values within LSE_TOL."""
    assert_equal(torch.isneginf(lse), torch.isneginf(ref_lse), name=f"{name} -inf pattern")
    finite = torch.isfinite(ref_lse)
    assert_close(lse[finite], ref_lse[finite], atol=LSE_TOL, rtol=LSE_TOL, name=name)


# --- the main grid: query lengths x memory lengths x GQA ratios x dtypes (batch 2, one KV head: Hq = G) -----------
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("group", [1, 4, 8])
@pytest.mark.parametrize("m", [0, 1, 100, 1001])
@pytest.mark.parametrize("tq", [1, 7, 64, 129])
def test_matches_reference(tq, m, group, dtype):
    d = 128 if (tq + m) % 2 else 64  # both head dims across the grid
    args = make_case(2, tq, tq, m, group, 1, d, dtype, gen_seed=tq * 7 + m)
    check(args, 1 / math.sqrt(d), True, name=f"Tq={tq} M={m} G={group} D={d}")


# --- options: head dim, causal or not, memory rotated or used as given --------------------------------------------
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("use_pos", [True, False])
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("d", [64, 128])
@pytest.mark.parametrize("tq", [3, 40])
def test_options(tq, d, causal, use_pos, dtype):
    args = make_case(1, tq, tq, 77, 8, 2, d, dtype, use_pos=use_pos, gen_seed=d + tq)
    check(args, 0.7 / math.sqrt(d), causal, name=f"D={d} causal={causal} pos={use_pos}")


@pytest.mark.parametrize("d", [8, 40, 96, 256])
@pytest.mark.parametrize("tq", [1, 20])
def test_other_head_dims(tq, d):
    """D = 256 takes the decode path; 8, 40, 96 always the prefill one (40: the PV tile pads the head dim)."""
    args = make_case(1, tq, tq + 3, 50, 4, 1, d, torch.float32, gen_seed=d)
    check(args, 1 / math.sqrt(d), True, name=f"D={d}")


# --- chunk length != query length ------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("m", [0, 50])
@pytest.mark.parametrize(
    ("tq", "tk", "group"),
    [
        (1, 37, 4),  # decode over a cache: Tk > Tq
        (2, 2, 4),  # 8 rows: decode path with a causal mask inside the chunk
        (3, 9, 1),
        (5, 64, 8),
        (64, 200, 4),
        (70, 30, 2),  # Tq > Tk: the first 40 queries see no chunk key
        (9, 1, 8),
        (16, 0, 4),  # empty chunk
        (1, 0, 8),
    ],
)
def test_chunk_length_differs(tq, tk, group, m, dtype):
    args = make_case(1, tq, tk, m, 2 * group, 2, 64, dtype, gen_seed=tq * 31 + tk)
    check(args, 0.125, True, name=f"Tq={tq} Tk={tk}")


def test_rows_without_keys():
    """No memory, Tq > Tk, causal: queries t < Tq - Tk see nothing -> out exactly 0, lse -inf; the others match."""
    tq, tk = 12, 4
    args = make_case(1, tq, tk, None, 8, 2, 64, torch.float32)
    out, lse = check(args, 0.125, True, name="rows without keys")
    assert_equal(out[:, : tq - tk], torch.zeros_like(out[:, : tq - tk]), name="out of rows without keys")
    assert torch.isneginf(lse[..., : tq - tk]).all() and torch.isfinite(lse[..., tq - tk :]).all()


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_no_keys_at_all(dtype):
    q = torch.randn(2, 5, 4, 64).to(dtype)
    empty = torch.empty(2, 0, 2, 64, dtype=dtype)
    out, lse = attention(q, empty, empty, empty, empty, torch.empty(0, dtype=torch.int32), None, None, 0.1, True)
    assert_equal(out, torch.zeros_like(q), name="out")
    assert torch.isneginf(lse).all() and lse.shape == (2, 4, 5)


def test_empty_queries():
    args = make_case(1, 0, 0, 10, 4, 2, 64, torch.float32)
    out, lse = attention(*args, 0.125, True)
    assert out.shape == (1, 0, 4, 64) and lse.shape == (1, 4, 0)


# --- layouts: strided views of preallocated buffers ------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("tq", [1, 33])
def test_non_contiguous_inputs(tq, dtype):
    """q a head-strided view, k/v the valid rows of a preallocated KV cache, memory a slice of a slot pool, expanded
    over the batch (stride 0); a transposed rope table and an int32 view with a stride for mem_pos."""
    b, hq, hkv, d, tk, m = 2, 8, 2, 64, tq + 5, 90
    qbuf = torch.randn(b, tq, 2 * hq, d).to(dtype)
    cache = torch.randn(2, b, 128, hkv, d).to(dtype)  # [k|v, B, Tmax, Hkv, D]
    pool = torch.randn(1, 2 * m, hkv, d).to(dtype)
    q, k, v = qbuf[:, :, ::2], cache[0, :, 3 : 3 + tk], cache[1, :, 3 : 3 + tk]
    mem_k, mem_v = pool[:, :m].expand(b, -1, -1, -1), pool[:, m:].expand(b, -1, -1, -1)
    cos, sin = rope_tables(2 * m, d)
    cos = cos.t().contiguous().t()  # same values, column-major
    pos = torch.randperm(2 * m).to(torch.int32)[::2]
    assert not (q.is_contiguous() or k.is_contiguous() or mem_k.is_contiguous() or pos.is_contiguous())
    args = (q, k, v, mem_k, mem_v, pos, cos, sin)
    out, lse = check(args, 0.125, True, name="strided")
    dense = tuple(x.contiguous() for x in args)
    out_d, lse_d = attention(*dense, 0.125, True)
    assert_equal(out, out_d, name="strided vs dense out")
    assert_equal(lse, lse_d, name="strided vs dense lse")


def test_last_dim_strided_is_copied():
    """A view whose last dim is not dense (not a layout the kernels read) still gives the right answer."""
    args = list(make_case(1, 9, 9, 20, 4, 2, 64, torch.float32))
    args[0] = torch.randn(1, 9, 4, 128)[..., ::2]
    check(tuple(args), 0.125, True, name="last dim strided")


# --- static KV cache: per-row valid chunk keys [kv_start, kv_len), causality aligned to each row's end ------------
def static_cache(args, ends, starts):
    """``args`` with the k/v rows outside each batch row's ``[starts[b], ends[b])`` set to NaN (never to be read), and
    the int32 ``(kv_len, kv_start)`` pair (None where ``ends``/``starts`` is None)."""
    q, k, v, *rest = args
    b, cap = k.shape[:2]
    end = torch.tensor(ends if ends is not None else [cap] * b, dtype=torch.int32)
    start = torch.tensor(starts if starts is not None else [0] * b, dtype=torch.int32)
    j = torch.arange(cap)[None, :]
    garbage = ((j < start[:, None]) | (j >= end[:, None]))[:, :, None, None]
    k, v = k.masked_fill(garbage, float("nan")), v.masked_fill(garbage, float("nan"))
    return (q, k, v, *rest), (None if ends is None else end, None if starts is None else start)


# per batch row (B = 3): (kv_len, kv_start); None = the default (Tk, 0)
KV_ROWS = [
    ([90, 41, 0], None),  # full, partial, empty
    ([90, 41, 64], [0, 7, 64]),  # left padding; kv_start = kv_len: memory only
    (None, [3, 0, 89]),  # kv_start alone (kv_len = Tk)
    ([2, 90, 33], [1, 33, 0]),  # fewer keys than queries in row 0
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("m", [0, 37])
@pytest.mark.parametrize(("tq", "group"), [(1, 1), (1, 4), (2, 4), (7, 1), (40, 4)])  # decode path: G*Tq <= 8
@pytest.mark.parametrize(("ends", "starts"), KV_ROWS)
def test_kv_ranges_match_reference(ends, starts, tq, group, m, causal, dtype):
    """Decode (split-KV) and prefill paths with a different valid range per batch row, GQA 1 and 4, with and
    without memory: the NaN rows outside the ranges are never read."""
    args = make_case(3, tq, 90, m, 2 * group, 2, 64, dtype, gen_seed=tq + m + group)
    args, kv = static_cache(args, ends, starts)
    out, lse = check(args, 0.125, causal, kv=kv, name=f"kv Tq={tq} G={group} M={m}")
    assert not lse.isnan().any()


@pytest.mark.parametrize(("tq", "group"), [(1, 8), (2, 4), (33, 2)])
def test_kv_empty_range_sees_only_memory(tq, group):
    """kv_len = 0 or kv_start = kv_len: the row attends to its memory alone (as with an empty chunk); with no memory
    it sees nothing: out exactly 0, lse -inf."""
    q, k, v, mem_k, mem_v, pos, cos, sin = make_case(2, tq, 50, 20, 2 * group, 2, 64, torch.float32)
    (q, k, v, *_), kv = static_cache((q, k, v), [0, 30], [0, 30])
    out, lse = attention(q, k, v, mem_k, mem_v, pos, cos, sin, 0.125, True, *kv)
    none = k[:, :0]
    mem_o, mem_l = attention(q, none, none, mem_k, mem_v, pos, cos, sin, 0.125, True)
    assert_close(out, mem_o, name="memory only out")
    check_lse(lse, mem_l, name="memory only lse")
    out, lse = attention(q, k, v, None, None, None, None, None, 0.125, True, *kv)
    assert_equal(out, torch.zeros_like(out), name="nothing visible: out")
    assert torch.isneginf(lse).all()


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize(("tq", "group"), [(1, 8), (2, 4)])
def test_kv_ranges_split_kv_decode(tq, group, dtype):
    """Split-KV over a long memory and a static cache: each row splits its own keys (memory + valid chunk keys)."""
    args = make_case(3, tq, 300, 2000, group, 1, 128, dtype, gen_seed=group)
    args, kv = static_cache(args, [300, 17, 150], [0, 0, 150])
    check(args, 1 / math.sqrt(128), True, kv=kv, name=f"split-KV kv Tq={tq} G={group}")


# --- split-KV decode and merging --------------------------------------------------------------------------------------
# Decode splits a row's keys into splits of ~1024 keys (by the shape alone), so these 3,300-key cases take the merge
# path of split-KV whatever the thread count.
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize(("tq", "group"), [(1, 8), (1, 4), (2, 4), (8, 1)])
def test_decode_split_kv(tq, group, dtype):
    args = make_case(1, tq, 300, 3000, group, 1, 128, dtype, gen_seed=group)
    check(args, 1 / math.sqrt(128), True, name=f"split-KV Tq={tq} G={group}")


# Decode over memory keys given rotated (what the model's decode steps read) or rotated in the kernel, at every head
# dim: bf16 keys without RoPE are scored on vdpbf16ps at the avx512_bf16 level; M 77 and 1001 end the memory inside a
# pass of keys, so one pass mixes rotated memory keys and chunk keys.
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("use_pos", [True, False])
@pytest.mark.parametrize(("m", "tk"), [(77, 9), (1001, 1300), (3000, 64)])
@pytest.mark.parametrize(("d", "group"), [(64, 8), (128, 4), (256, 2)])
def test_decode_memory_rotated_or_not(d, group, m, tk, use_pos, dtype):
    args = make_case(2, 1, tk, m, 2 * group, 2, d, dtype, use_pos=use_pos, gen_seed=m + d)
    check(args, 1 / math.sqrt(d), True, name=f"decode D={d} G={group} M={m} pos={use_pos}")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize(("b", "tq", "group", "m"), [(1, 1, 4, 5000), (2, 2, 4, 2500), (1, 64, 4, 700), (3, 1, 1, 40)])
def test_bits_do_not_depend_on_thread_count(b, tq, group, m, dtype):
    """Decode (split-KV) and prefill give the same bits on 1, 2 and 3 threads: splits and reduction order follow the
    shape, never the machine."""
    args = make_case(b, tq, 100, m, 2 * group, 2, 128, dtype, gen_seed=m)
    old = torch.get_num_threads()
    try:
        results = []
        for threads in (1, 2, 3):
            torch.set_num_threads(threads)
            results.append(attention(*args, 1 / math.sqrt(128), True))
    finally:
        torch.set_num_threads(old)
    for threads, (out, lse) in zip((2, 3), results[1:], strict=True):
        assert_equal(out, results[0][0], name=f"out on {threads} threads vs 1")
        assert_equal(lse, results[0][1], name=f"lse on {threads} threads vs 1")


# Batch rows that share one memory (an expand, batch stride 0: how the model serves a memory state to a batch) are
# decoded up to 32 query rows at a time, reading each memory key once for all of them; their chunk keys stay per row.
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("m", [40, 2500])
@pytest.mark.parametrize(
    ("b", "tq", "group", "ends"),
    [
        (9, 1, 4, [5, 0, 1300, 1, 2, 3, 4, 5, 700]),  # 8 rows a group: a group of 8 and one of 1
        (5, 2, 4, None),  # 4 rows a group
        (3, 1, 8, [0, 0, 0]),  # memory only
        (2, 1, 2, [1300, 64]),  # a chunk long enough for two splits
    ],
)
def test_shared_memory_decode(b, tq, group, ends, m, dtype):
    """The shared memory's result matches the reference, has the bits of a dense copy of the memory (the same
    arithmetic per row, alone or with others) and does not depend on the thread count."""
    q, k, v, mem_k, mem_v, pos, cos, sin = make_case(b, tq, 1300, m, 2 * group, 2, 128, dtype, gen_seed=b + m)
    shared = (q, k, v, mem_k[:1].expand_as(mem_k), mem_v[:1].expand_as(mem_v), pos, cos, sin)
    args, kv = static_cache(shared, ends, None)
    assert args[3].stride(0) == 0
    out, lse = check(args, 1 / math.sqrt(128), True, kv=kv, name=f"shared memory B={b} Tq={tq} G={group}")
    dense = tuple(x.contiguous() if x is not None else None for x in args)
    out_d, lse_d = attention(*dense, 1 / math.sqrt(128), True, *kv)
    assert_equal(out, out_d, name="shared vs dense memory out")
    assert_equal(lse, lse_d, name="shared vs dense memory lse")
    old = torch.get_num_threads()
    try:
        torch.set_num_threads(3)
        out_3, lse_3 = attention(*args, 1 / math.sqrt(128), True, *kv)
    finally:
        torch.set_num_threads(old)
    assert_equal(out_3, out, name="out on 3 threads")
    assert_equal(lse_3, lse, name="lse on 3 threads")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_merge_of_parts_equals_single_call(dtype):
    """attention over [mem ; chunk] == merge(attention over mem only, attention over the chunk only)."""
    q, k, v, mem_k, mem_v, pos, cos, sin = make_case(2, 21, 21, 150, 8, 2, 128, dtype)
    none = torch.empty(2, 0, 2, 128, dtype=dtype)
    whole, lse = attention(q, k, v, mem_k, mem_v, pos, cos, sin, 0.09, True)
    a, lse_a = attention(q, none, none, mem_k, mem_v, pos, cos, sin, 0.09, True)
    b, lse_b = attention(q, k, v, None, None, None, None, None, 0.09, True)
    merged, merged_lse = merge(a, lse_a, b, lse_b)
    check_lse(merged_lse, lse, name="merged lse")
    if dtype == torch.float32:
        assert_close(merged, whole, name="merged out")
    else:  # the parts are rounded to the dtype before merging: within a few ulps
        assert_close(merged.float(), whole.float(), atol=4e-3 if dtype == torch.bfloat16 else 1e-3, rtol=2e-2)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_merge_matches_reference(dtype):
    b, t, h, d = 2, 13, 6, 72
    out_a, out_b = torch.randn(b, t, h, d).to(dtype), torch.randn(b, t, h, d).to(dtype)
    lse_a, lse_b = 3 * torch.randn(b, h, t), 3 * torch.randn(b, h, t)
    lse_a[0, 0, :4] = float("-inf")  # part a saw no key
    lse_b[0, 0, 2:6] = float("-inf")  # ... part b neither (2, 3): both -inf -> out 0, lse -inf
    out_a[0, :4, 0] = 0
    out_b[0, 2:6, 0] = 0
    out, lse = merge(out_a, lse_a, out_b, lse_b)
    ref, ref_lse = merge_attention_states_reference(out_a, lse_a, out_b, lse_b)
    assert out.dtype == dtype and out.shape == (b, t, h, d)
    assert_close(out.float(), ref.float(), dtype=dtype, name="merged out")
    check_lse(lse, ref_lse, name="merged lse")
    assert_equal(out[0, 2:4, 0], torch.zeros_like(out[0, 2:4, 0]), name="rows with no key in either part")


def test_merge_strided_inputs():
    """out_* as [B, H, T, D] buffers seen transposed, lse_* as [B, T, H] transposed."""
    b, t, h, d = 1, 7, 4, 64
    out_a, out_b = torch.randn(b, h, t, d).transpose(1, 2), torch.randn(b, h, t, d).transpose(1, 2)
    lse_a, lse_b = torch.randn(b, t, h).transpose(1, 2), torch.randn(b, t, h).transpose(1, 2)
    out, lse = merge(out_a, lse_a, out_b, lse_b)
    ref, ref_lse = merge_attention_states_reference(out_a, lse_a, out_b, lse_b)
    assert_close(out, ref, name="out")
    assert_close(lse, ref_lse, name="lse")


# --- registration -----------------------------------------------------------------------------------------------------
def _has_fake(op: str) -> bool:
    from torch._library.simple_registry import singleton

    return singleton.find(op).fake_impl.kernel is not None


@pytest.mark.parametrize("kv", [False, True], ids=["full", "kv_len+kv_start"])
@pytest.mark.parametrize("tq", [1, 20])
def test_opcheck_memory_attention(tq, kv):
    args = (*make_case(2, tq, tq + 6, 40, 4, 2, 64, torch.float32), 0.125, True)
    if kv:
        args = (*args, torch.tensor([tq + 6, tq], dtype=torch.int32), torch.tensor([2, 0], dtype=torch.int32))
    utils = ["test_schema", "test_autograd_registration"]
    if _has_fake("mplus::memory_attention"):  # registered by mplus_kernels/attention/op.py
        utils += ["test_faketensor", "test_aot_dispatch_dynamic"]
    torch.library.opcheck(attention, args, test_utils=utils)


def test_opcheck_merge():
    args = (torch.randn(1, 5, 4, 32), torch.randn(1, 4, 5), torch.randn(1, 5, 4, 32), torch.randn(1, 4, 5))
    utils = ["test_schema", "test_autograd_registration"]
    if _has_fake("mplus::merge_attention_states"):
        utils += ["test_faketensor", "test_aot_dispatch_dynamic"]
    torch.library.opcheck(merge, args, test_utils=utils)


def test_rejects_bad_inputs():
    q, k, v, mem_k, mem_v, pos, cos, sin = make_case(1, 4, 4, 10, 4, 2, 64, torch.float32)
    with pytest.raises(ValueError, match="multiple of Hkv"):
        attention(q, k[:, :, :1].expand(1, 4, 3, 64), v, mem_k, mem_v, pos, cos, sin, 0.1, True)
    with pytest.raises(ValueError, match="mem_pos values"):
        attention(q, k, v, mem_k, mem_v, pos + 1000, cos, sin, 0.1, True)
    with pytest.raises(TypeError, match="k has dtype Double, expected q's dtype Float"):
        attention(q, k.double(), v, mem_k, mem_v, pos, cos, sin, 0.1, True)
    with pytest.raises(ValueError, match="mem_pos must be a CPU int32"):
        attention(q, k, v, mem_k, mem_v, pos.long(), cos, sin, 0.1, True)
    with pytest.raises(ValueError, match=r"mem_pos values must lie in \[0, \d+\)"):
        attention(q, k, v, mem_k, mem_v, pos - 1000, cos, sin, 0.1, True)


@pytest.mark.parametrize(
    ("kv_len", "kv_start", "match"),
    [
        ([5], None, r"batch row 0 needs 0 <= kv_start <= kv_len <= Tk=4, got kv_start=0, kv_len=5"),
        ([-1], None, r"batch row 0 needs .* kv_len=-1"),
        (None, [5], r"batch row 0 needs .* got kv_start=5, kv_len=4"),
        ([2], [3], r"got kv_start=3, kv_len=2"),
        (None, [-2], r"got kv_start=-2, kv_len=4"),
    ],
)
def test_raw_op_range_checks_kv_values(kv_len, kv_start, match):
    """A raw torch.ops call with kv values outside the cache raises (what the kernel indexes with is checked)."""
    args = make_case(1, 4, 4, 10, 4, 2, 64, torch.float32)
    kv = [None if x is None else torch.tensor(x, dtype=torch.int32) for x in (kv_len, kv_start)]
    with pytest.raises(ValueError, match=match):
        attention(*args, 0.1, True, *kv)


def test_raw_op_rejects_bad_kv_tensors():
    args = make_case(2, 4, 4, 10, 4, 2, 64, torch.float32)
    with pytest.raises(ValueError, match=r"kv_len must be a CPU int32 \[B=2\] tensor, got Long"):
        attention(*args, 0.1, True, torch.tensor([4, 4]), None)
    with pytest.raises(ValueError, match=r"kv_start must be a CPU int32 \[B=2\] tensor"):
        attention(*args, 0.1, True, None, torch.zeros(3, dtype=torch.int32))
