"""Retriever scoring + top-K: parity of every backend with the reference (scores, selected sets), the deterministic
tie rule on engineered ties, split key ranges, degenerate sizes, bad inputs, backend selection, opcheck, memory."""

from __future__ import annotations

import pytest
import torch

import mplus_kernels as mk
from mplus_kernels import BackendUnavailableError
from mplus_kernels.retrieval import retrieval_scores_reference, select_topk_ascending
from mplus_kernels.testing import assert_close, assert_equal, measure_peak_memory, peak_memory_available

K0 = 2560  # M+ retrieves 2,560 long-term rows per layer
K0_TINY = 16  # the Triton interpreter is slow: tiny K0 and S there
SCORE_ATOL = 2e-5  # every backend computes fp32 scores from the same inputs; only summation order/exp differ
DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def _inputs(t, s1, s2, ds, dtype, seed, scale=1.0):
    """q·k ~ N(0, scale²): scores spread over (0, 1) rather than all near 0.5."""
    gen = torch.Generator().manual_seed(seed)
    std = scale / ds**0.25
    q = (torch.randn(t, ds, generator=gen) * std).to(dtype)
    k1 = (torch.randn(s1, ds, generator=gen) * std).to(dtype)
    k2 = None if s2 is None else (torch.randn(s2, ds, generator=gen) * std).to(dtype)
    return q, k1, k2


def _check_against_reference(indices, scores, q, k1, k2, k):
    """Exact-in-spirit parity: valid ascending indices, scores within SCORE_ATOL of the fp32 reference, and the
    selected set equal to the reference's wherever the reference's boundary is not a near-tie."""
    ref_all = retrieval_scores_reference(q, k1, keys2=k2)
    total = ref_all.numel()
    k0 = min(k, total)
    assert indices.dtype == torch.int64 and scores.dtype == torch.float32
    assert indices.shape == (k0,) and scores.shape == (k0,), f"got {indices.shape}, {scores.shape}, expected ({k0},)"
    if k0 == 0:
        return
    assert bool((indices[1:] > indices[:-1]).all()), "indices must be strictly ascending"
    assert int(indices[0]) >= 0 and int(indices[-1]) < total
    assert_close(scores, ref_all[indices], atol=SCORE_ATOL, rtol=0, name="scores of the selected keys")
    ref_idx, _ = mk.retrieve_topk_reference(q, k1, k, keys2=k2)
    ordered = ref_all.sort(descending=True).values
    tau = float(ordered[k0 - 1])
    gap = float(ordered[k0 - 1] - ordered[k0]) if k0 < total else float("inf")
    if gap > 2 * SCORE_ATOL:
        assert_equal(indices, ref_idx, name="selected indices (no near-tie at the boundary)")
    else:  # near-tie: any choice inside the band is right, nothing outside it
        chosen = torch.zeros(total, dtype=torch.bool)
        chosen[indices] = True
        assert bool((ref_all[chosen] >= tau - 2 * SCORE_ATOL).all()), "a selected key scores clearly below the k-th"
        assert bool((ref_all[~chosen] <= tau + 2 * SCORE_ATOL).all()), "a dropped key scores clearly above the k-th"


def _run(backend, q, k1, k, k2=None):
    return mk.retrieve_topk(q, k1, k, keys2=k2, backend=backend)


# ------------------------------------------------------------------------------------------------------------------
# Parity
# ------------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", ["cpp", "reference"])
@pytest.mark.parametrize("t", [1, 5, 300])
@pytest.mark.parametrize("s", [0, 1, K0 - 1, K0, 10_001])
@pytest.mark.parametrize("dtype", DTYPES)
def test_parity_m_plus_shapes(backend, t, s, dtype):
    q, k1, _ = _inputs(t, s, None, 256, dtype, seed=t * 7 + s)
    _check_against_reference(*_run(backend, q, k1, K0), q, k1, None, K0)


@pytest.mark.parametrize("t", [1, 5, 300])
@pytest.mark.parametrize("s", [0, 1, K0_TINY - 1, K0_TINY, 301])
@pytest.mark.parametrize("dtype", DTYPES)  # bf16 runs through the interpreter-only fp32 upcast
def test_parity_triton_interpreter(t, s, dtype):
    q, k1, _ = _inputs(t, s, None, 64, dtype, seed=t * 7 + s)
    _check_against_reference(*_run("triton", q, k1, K0_TINY), q, k1, None, K0_TINY)


@pytest.mark.parametrize("backend", ["cpp", "triton", "reference"])
@pytest.mark.parametrize(("s1", "s2", "k"), [(0, 7, 3), (7, 0, 3), (5, 9, 6), (0, 0, 4), (40, 33, 70), (300, 101, 25)])
def test_split_key_ranges(backend, s1, s2, k):
    q, k1, k2 = _inputs(9, s1, s2, 64, torch.float32, seed=s1 * 31 + s2)
    _check_against_reference(*_run(backend, q, k1, k, k2), q, k1, k2, k)


@pytest.mark.parametrize("backend", ["cpp", "triton", "reference"])
@pytest.mark.parametrize("k", [0, 1, 50, 10_000])
def test_k_edge_cases(backend, k):
    """k = 0 returns nothing; k > S returns every key (no fixed-k limit); k = 1 picks the best."""
    q, k1, k2 = _inputs(3, 37, 12, 32, torch.float32, seed=k)
    idx, sc = _run(backend, q, k1, k, k2)
    _check_against_reference(idx, sc, q, k1, k2, k)
    if k >= 49:
        assert_equal(idx, torch.arange(49), name="k > S returns all keys")


def test_cpp_large_k_and_odd_widths():
    """Any k (no 2,048 cap), odd ds (tails of every vector loop), T around the 16/32-query block sizes."""
    for t, s, ds, k in [(16, 9_001, 33, 6_000), (17, 5_003, 255, 4_097), (33, 3_001, 7, 2_999), (64, 1_000, 1, 10)]:
        for dtype in (torch.float32, torch.bfloat16):
            q, k1, _ = _inputs(t, s, None, ds, dtype, seed=t + s + ds)
            _check_against_reference(*_run("cpp", q, k1, k), q, k1, None, k)


@pytest.mark.parametrize("dtype", DTYPES)
def test_cpp_parity_at_every_isa_level(cpu_isa, dtype):
    """Each ISA variant of the C++ scoring kernel (4 / 8 / 16 fp32 lanes, one or two vectors of queries per block),
    forced at run time: T not a multiple of the lane count (padded lanes, a wholly padded vector at T 33), ds not a
    multiple of it (1, 7, 33), ds 0, two key ranges with partial tiles and work units."""
    assert mk.cpu_isa() == cpu_isa  # the conftest fixture switched the level for this test
    for t, s1, s2, ds, k in [
        (1, 50, 0, 1, 7),
        (3, 200, 45, 7, 60),
        (5, 61, 130, 33, 90),
        (9, 97, 1, 16, 40),
        (17, 301, 77, 33, 100),
        (33, 150, 149, 256, 120),
        (300, 1_000, 333, 64, 400),
    ]:
        q, k1, k2 = _inputs(t, s1, s2 or None, ds, dtype, seed=t * 13 + s1 + ds)
        _check_against_reference(*_run("cpp", q, k1, k, k2), q, k1, k2, k)
    q, k1, k2 = torch.empty(7, 0, dtype=dtype), torch.empty(11, 0, dtype=dtype), torch.empty(5, 0, dtype=dtype)
    idx, sc = _run("cpp", q, k1, 6, k2)  # ds = 0: every score 0.5, the lowest indices
    assert_equal(idx, torch.arange(6), name="ds = 0 indices")
    assert_equal(sc, torch.full((6,), 0.5), name="ds = 0 scores")


@pytest.mark.parametrize("backend", ["cpp", "triton"])
def test_generic_and_aligned_layouts(backend):
    """Row-strided views are used in place, a non-unit inner stride is copied; odd ds takes Triton's generic path."""
    gen = torch.Generator().manual_seed(3)
    base = torch.randn(120, 70, generator=gen) * 0.4
    q = torch.randn(6, 40, generator=gen) * 0.4
    keys_row_strided = base[:, 3:43]  # stride (70, 1): not 16-byte aligned rows
    keys_inner_strided = torch.randn(40, 2 * 80, generator=gen)[:, ::2].T * 0.4  # [80, 40], stride (1, 160)
    for keys in (keys_row_strided, keys_inner_strided):
        _check_against_reference(*_run(backend, q, keys, 17), q, keys, None, 17)


@pytest.mark.parametrize("backend", ["cpp", "triton"])
@pytest.mark.filterwarnings("ignore:overflow encountered in exp:RuntimeWarning")  # interpreter: exp(-x) = inf -> 0
def test_saturated_sigmoid(backend):
    """|q·k| up to ~100: sigmoid saturates at 0 and 1 without overflow/NaN in the vectorised exp."""
    q, k1, _ = _inputs(20, 500, None, 64, torch.float32, seed=11, scale=30.0)
    idx, sc = _run(backend, q, k1, 40)
    assert bool(torch.isfinite(sc).all())
    _check_against_reference(idx, sc, q, k1, None, 40)


def test_reference_providers_agree():
    """The chunked provider equals the reference; the official-style one agrees up to its bf16 quantisation."""
    q, k1, k2 = _inputs(50, 3_000, 700, 256, torch.float32, seed=5)
    ref_idx, ref_sc = mk.retrieve_topk_reference(q, k1, 300, keys2=k2)
    idx, sc = mk.retrieve_topk_chunked(q, k1, 300, keys2=k2, chunk_elems=50 * 97)  # 97 keys per chunk: ragged tail
    # Exact index equality between two summation orders (fp32 BLAS tiles vs float64) holds only without a near-tie at
    # the boundary: scores agree within 1e-6, so a gap of more than 2e-6 makes the selection the same on any BLAS.
    ordered = retrieval_scores_reference(q, k1, keys2=k2).sort(descending=True).values
    assert float(ordered[299] - ordered[300]) > 2e-6, "set-up: the 300th and 301st scores must not nearly tie"
    assert_equal(idx, ref_idx, name="chunked indices")
    assert_close(sc, ref_sc, atol=1e-6, rtol=0, name="chunked scores")
    off_idx, off_sc = mk.official_retrieve_reference(q, k1, 300, keys2=k2)  # fp32 inputs: fp32 everywhere
    _check_against_reference(off_idx, off_sc, q, k1, k2, 300)
    qb, kb, k2b = q.bfloat16(), k1.bfloat16(), k2.bfloat16()
    off_idx, off_sc = mk.official_retrieve_reference(qb, kb, 300, keys2=k2b)
    exact = retrieval_scores_reference(qb, kb, keys2=k2b)
    assert off_idx.shape == (300,) and bool((off_idx[1:] > off_idx[:-1]).all())
    assert_close(off_sc, exact[off_idx], atol=4e-3, rtol=0, name="official bf16 scores")  # 2^-8 steps near 0.5


def test_select_topk_ascending_tie_rule():
    gen = torch.Generator().manual_seed(0)
    scores = torch.randint(0, 6, (1_000,), generator=gen).float()  # heavy ties everywhere
    for k in (0, 1, 37, 500, 999, 1_000, 1_500):
        order = torch.sort(scores, descending=True, stable=True).indices[: min(k, 1_000)].sort().values
        idx, sc = select_topk_ascending(scores, k)
        assert_equal(idx, order, name=f"select k={k}")
        assert_equal(sc, scores[order], name=f"scores k={k}")


# ------------------------------------------------------------------------------------------------------------------
# Deterministic ties
# ------------------------------------------------------------------------------------------------------------------
def _exact_values(shape, gen, dtype, max_int=4, scale=2.0**-3):
    """Small integers times a power of two (here multiples of 1/8 in [-1/2, 1/2]): exact in bf16, fp16 and fp32, and
    so is every product (a multiple of 2^-6 below 2^-2) and every partial sum of up to 2^20 of them. So any summation
    order gives the same bits: BLAS kernels of any vector width (the Triton interpreter's fp32 ``tl.dot`` is numpy's
    BLAS, whose AVX2 kernels round identical columns differently by tile position), any tiling, any backend."""
    return (torch.randint(-max_int, max_int + 1, shape, generator=gen) * scale).to(dtype)


def _tied_keys(s1, s2, ds, dtype, seed, num_protos=6):
    """Keys that are copies of a few prototypes with well-separated scores, shuffled over both ranges. Queries and
    prototypes hold exact values (see ``_exact_values``): every q·k is exact in fp32 whatever the summation order,
    so copies of one prototype tie exactly in every backend, at every position."""
    gen = torch.Generator().manual_seed(seed)
    q = _exact_values((7, ds), gen, dtype)
    for _ in range(100):  # redraw until the prototype scores are well separated (a handful of draws at most)
        protos = _exact_values((num_protos, ds), gen, dtype)
        proto_scores = torch.sigmoid(q.double() @ protos.double().T).mean(0)
        if float(proto_scores.sort().values.diff().min()) > 1e-3:
            break
    else:
        raise AssertionError("set-up: no draw of prototypes with well separated scores")
    which = torch.randint(0, num_protos, (s1 + s2,), generator=gen)
    keys = protos[which]
    return q, keys[:s1].contiguous(), keys[s1:].contiguous(), which, proto_scores


@pytest.mark.parametrize("backend", ["cpp", "triton", "reference"])
@pytest.mark.parametrize(
    ("s1", "s2", "groups_before"), [(60, 0, 2), (31, 29, 2), (0, 45, 1), (50, 50, 0), (70, 30, 4), (1500, 1100, 2)]
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_ties_go_to_the_lower_index(backend, s1, s2, groups_before, dtype):
    """k falls inside a group of identical keys: the group's lowest indices (across both ranges) are kept."""
    q, k1, k2, which, proto_scores = _tied_keys(s1, s2, 32, dtype, seed=s1 + 3 * s2 + groups_before)
    best_protos = proto_scores.argsort(descending=True)
    sizes = torch.bincount(which, minlength=proto_scores.numel())[best_protos]
    k = int(sizes[:groups_before].sum()) + max(1, int(sizes[groups_before]) // 2)
    assert k < int(sizes[: groups_before + 1].sum()), "set-up: k must fall strictly inside a group"
    best_first = torch.sort(-proto_scores[which], stable=True).indices  # stable: equal scores keep index order
    expected = best_first[:k].sort().values

    idx, sc = _run(backend, q, k1, k, k2 if s2 else None)
    assert_equal(idx, expected, name="indices under the lower-index tie rule")
    for p in which[idx].unique():  # copies of one key get bit-identical scores
        group = sc[which[idx] == p]
        assert bool((group == group[0]).all()), f"copies of prototype {int(p)} scored differently: {group.tolist()}"


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_triton_selection_across_many_blocks(monkeypatch, dtype):
    """Small selection blocks: the radix passes, the block-offset scan (several steps) and the ranked writes cross
    many block boundaries, with ties straddling them."""
    from mplus_kernels.retrieval import triton_impl

    monkeypatch.setattr(triton_impl, "SELECT_BLOCK", 64)
    monkeypatch.setattr(triton_impl, "SCAN_BLOCK", 4)
    q, k1, k2, which, proto_scores = _tied_keys(700, 333, 16, dtype, seed=4)
    best_first = torch.sort(-proto_scores[which], stable=True).indices
    for k in (1, 300, 517, 1000):
        idx, sc = _run("triton", q, k1, k, k2)
        assert_equal(idx, best_first[:k].sort().values, name=f"k={k}")
    q, k1, k2 = _inputs(3, 900, 150, 16, dtype, seed=8)
    _check_against_reference(*_run("triton", q, k1, 400, k2), q, k1, k2, 400)


def test_all_keys_identical():
    gen = torch.Generator().manual_seed(0)
    keys = _exact_values((1, 256), gen, torch.float32).repeat(5_000, 1)  # exact q·k: one score in any summation order
    q = _exact_values((4, 256), gen, torch.float32)
    for backend in ("cpp", "reference"):
        idx, _ = mk.retrieve_topk(q, keys, K0, backend=backend)
        assert_equal(idx, torch.arange(K0), name=f"{backend}: all ties -> the lowest indices")


def test_cpp_is_independent_of_thread_count(cpu_isa):
    """At every ISA level (the avx512_bf16 one scores bf16 on vdpbf16ps): the same bits with 1 and 2+ threads, and a
    key repeated at another position (another tile, work unit and range) scores bit-identically."""
    assert mk.cpu_isa() == cpu_isa
    q, k1, k2 = _inputs(100, 4_001, 999, 256, torch.bfloat16, seed=9)
    k2[500] = k1[17]
    k2[998] = k1[4_000]
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = torch.ops.mplus.retrieve_topk(q, k1, k2, 700)
        torch.set_num_threads(max(2, threads))
        many = torch.ops.mplus.retrieve_topk(q, k1, k2, 700)
    finally:
        torch.set_num_threads(threads)
    assert_equal(one[0], many[0], name="indices")
    assert_equal(one[1], many[1], name="scores (bitwise)")
    full = torch.ops.mplus.retrieve_topk(q, k1, k2, 4_001 + 999)[1]  # every key's score, by index
    assert_equal(full[4_001 + 500], full[17], name="a repeated key's score (bitwise)")
    assert_equal(full[4_001 + 998], full[4_000], name="a repeated key's score (bitwise)")


# ------------------------------------------------------------------------------------------------------------------
# Bad inputs, backends, registration, memory
# ------------------------------------------------------------------------------------------------------------------
def _good():
    return torch.randn(4, 8), torch.randn(10, 8), torch.randn(3, 8)


@pytest.mark.parametrize("backend", ["cpp", "triton", "reference"])
@pytest.mark.parametrize(
    ("case", "error", "match"),
    [
        (lambda q, k, k2: (q[0], k, None, 2), ValueError, r"queries must be a 2-D \[T, ds\] tensor, got 1-D \[8\]"),
        (lambda q, k, k2: (q, k[None], None, 2), ValueError, r"keys must be a 2-D \[S1, ds\] tensor, got 3-D"),
        (lambda q, k, k2: (q, k[:, :5], None, 2), ValueError, r"keys \[10, 5\] has key width 5.*ds=8"),
        (lambda q, k, k2: (q, k, k2[:, :6], 2), ValueError, r"keys2 \[3, 6\] has key width 6.*\[S2, 8\]"),
        (lambda q, k, k2: (q, k, k2, -1), ValueError, r"k must be >= 0, got -1"),
        (lambda q, k, k2: (q, k, k2, 2.0), TypeError, r"k must be an int, got float"),
        (lambda q, k, k2: (q, k, k2, True), TypeError, r"k must be an int, got bool"),
        (lambda q, k, k2: (q, k.double(), None, 2), TypeError, r"keys must be bfloat16, float16 or float32"),
        (lambda q, k, k2: (q, k.half(), None, 2), TypeError, r"keys has dtype torch.float16, queries have"),
        (lambda q, k, k2: (q, k, k2.bfloat16(), 2), TypeError, r"keys2 has dtype torch.bfloat16"),
        (lambda q, k, k2: (q.long(), k, None, 2), TypeError, r"queries must be bfloat16, float16 or float32"),
        (lambda q, k, k2: (q[:0], k, None, 2), ValueError, r"queries must have at least one row"),
        (lambda q, k, k2: (q.tolist(), k, None, 2), TypeError, r"queries must be a torch.Tensor, got list"),
        (lambda q, k, k2: (q, k.to("meta"), None, 2), ValueError, r"keys is on meta, queries on cpu"),
        (lambda q, k, k2: (q, k, k2.to("meta"), 2), ValueError, r"keys2 is on meta, queries on cpu"),
    ],
)
def test_bad_input_raises_before_launch(backend, case, error, match):
    q, k, k2, kk = case(*_good())
    with pytest.raises(error, match=match):
        mk.retrieve_topk(q, k, kk, keys2=k2, backend=backend)


@pytest.mark.parametrize(
    ("case", "error", "match"),
    [
        (lambda q, k, k2: (q, k.bfloat16(), None, 2), TypeError, r"keys has dtype BFloat16, queries have Float"),
        (lambda q, k, k2: (q, k, k2.half(), 2), TypeError, r"keys2 has dtype Half, queries have Float"),
        (
            lambda q, k, k2: (q, k, torch.randn(3, 4), 2),
            ValueError,
            r"keys2 must be \[S, ds=8\] like queries \[4, 8\], got \[3, 4\]",
        ),
        (
            lambda q, k, k2: (q, k[None], None, 2),
            ValueError,
            r"keys must be \[S, ds=8\] like queries \[4, 8\], got \[1, 10, 8\]",
        ),
        (lambda q, k, k2: (q, k[:, 0], None, 2), ValueError, r"keys must be \[S, ds=8\]"),
        (lambda q, k, k2: (q[0], k, None, 2), ValueError, r"queries must be \[T >= 1, ds\], got \[8\]"),
        (lambda q, k, k2: (q[:0], k, None, 2), ValueError, r"queries must be \[T >= 1, ds\], got \[0, 8\]"),
        (
            lambda q, k, k2: (q.double(), k.double(), None, 2),
            TypeError,
            r"queries must be bfloat16, float16 or float32, got Double",
        ),
        (
            lambda q, k, k2: (q.long(), k.long(), None, 2),
            TypeError,
            r"queries must be bfloat16, float16 or float32, got Long",
        ),
        (lambda q, k, k2: (q, k, None, -3), ValueError, r"k must be >= 0, got -3"),
        (lambda q, k, k2: (None, k, None, 2), TypeError, r"queries must be a tensor, got None"),
        (lambda q, k, k2: (q, None, None, 2), TypeError, r"keys must be a tensor, got None"),
    ],
)
def test_cpp_kernel_checks_its_inputs(case, error, match):
    """Direct calls to the C++ op (bypassing the Python checks) fail with the wrappers' error classes (ValueError,
    TypeError for a dtype or None), not a crash, and touch nothing (the op has no index inputs: it checks the shapes
    and dtypes it assumes)."""
    good = _good()
    before = [t.clone() for t in good]
    with pytest.raises(error, match=match):
        torch.ops.mplus.retrieve_topk(*case(*good))
    for i, (b, a) in enumerate(zip(before, good)):
        assert_equal(a, b, name=f"input {i} after a rejected call")


@pytest.mark.parametrize("backend", ["cpp", "triton", "reference"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_zero_width_keys(backend, dtype):
    """ds = 0 (every q·k = 0): all scores are 0.5 and the lowest indices win; the C++ kernel used to divide by ds."""
    q, k1, k2 = torch.empty(20, 0, dtype=dtype), torch.empty(7, 0, dtype=dtype), torch.empty(3, 0, dtype=dtype)
    idx, sc = _run(backend, q, k1, 4, k2)
    assert_equal(idx, torch.arange(4), name="indices")
    assert_equal(sc, torch.full((4,), 0.5), name="scores")


def test_backend_dispatch(monkeypatch):
    from mplus_kernels.retrieval import op

    calls = []
    real = op.retrieve_topk_reference
    monkeypatch.setattr(op, "retrieve_topk_reference", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    q, k, _ = _good()
    monkeypatch.setenv("MPLUS_BACKEND", "reference")
    mk.retrieve_topk(q, k, 3)
    assert calls == [1]
    mk.retrieve_topk(q, k, 3, backend="cpp")  # the per-call argument wins
    assert calls == [1]
    with pytest.raises(ValueError, match="backend='bogus'"):
        mk.retrieve_topk(q, k, 3, backend="bogus")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(BackendUnavailableError, match="retrieve_topk: the triton backend cannot run"):
        mk.retrieve_topk(q, k, 3, backend="triton")


@pytest.mark.parametrize("with_keys2", [False, True])
def test_opcheck(with_keys2):
    q, k, k2 = _good()
    torch.library.opcheck(torch.ops.mplus.retrieve_topk.default, (q, k, k2 if with_keys2 else None, 5))
    torch.library.opcheck(torch.ops.mplus.retrieve_topk.default, (q, k[:2], None, 5))  # k > S


def test_torch_compile_traces_the_op():
    q, k, k2 = _good()

    @torch.compile(backend="aot_eager", fullgraph=True)
    def top(q, k, k2):
        idx, sc = torch.ops.mplus.retrieve_topk(q, k, k2, 6)
        return idx, sc * 2

    idx, sc = top(q, k, k2)
    ref_idx, ref_sc = torch.ops.mplus.retrieve_topk(q, k, k2, 6)
    assert_equal(idx, ref_idx, name="compiled indices")
    assert_equal(sc, ref_sc * 2, name="compiled scores")


@pytest.mark.skipif(not peak_memory_available(), reason="needs /proc/self/clear_refs")
def test_cpp_peak_memory_is_o_s():
    """S = 200k, T = 256: the [T, S] fp32 matrix would be 200 MiB; the fused op needs the [S] scores + O(T·ds)."""
    q, k1, _ = _inputs(256, 200_000, None, 256, torch.bfloat16, seed=1)
    mk.retrieve_topk(q[:4], k1[:1000], K0)  # warm-up: thread pool, first-touch of the allocator
    _, peak = measure_peak_memory(lambda: mk.retrieve_topk(q, k1, K0))
    assert peak < 4 * 2**20, f"peak extra memory {peak / 2**20:.2f} MiB, expected ~1 MiB (scores + packed queries)"
