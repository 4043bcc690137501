"""``rotate_keys`` (issue 22): memory keys rotated by their RoPE rows once, for a generation's decode steps.

The C++ kernel at every ISA level this CPU runs, the Triton kernel (under the interpreter) and the reference give the
same bits (fp32 products each rounded before the sum, one rounding to the keys' dtype), on any layout of the keys
(strided heads, a shared expand, a last dim with a stride); the reference is within one rounding of a float64
rotation; every bad argument is refused by name before anything runs, by the wrapper and by the raw op.
"""

from __future__ import annotations

import pytest
import torch

from mplus_kernels import _backend, rotate_keys, rotate_keys_reference
from mplus_kernels.testing import assert_equal, rope_rotation64

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
needs_cpp = pytest.mark.skipif(not _backend.cpp_available(), reason="the C++ extension is not built")


def _inputs(b=2, n=37, h=3, d=64, dtype=torch.bfloat16, table=90, seed=0, layout="contiguous"):
    g = torch.Generator().manual_seed(seed)
    if layout == "heads_major":  # a [B, H, N, D] buffer seen as [B, N, H, D]
        k = torch.randn(b, h, n, d, generator=g).to(dtype).transpose(1, 2)
    elif layout == "strided_dim":  # the last dim with stride 2
        k = torch.randn(b, n, h, d, 2, generator=g).to(dtype)[..., 0]
    elif layout == "shared":  # one memory expanded over the batch (stride 0)
        k = torch.randn(1, n, h, d, generator=g).to(dtype).expand(b, -1, -1, -1)
    else:
        k = torch.randn(b, n, h, d, generator=g).to(dtype)
    positions = torch.randperm(table, generator=g)[:n]
    angles = torch.rand(table, d // 2, generator=g) * 6.3
    return k, positions, torch.cos(angles), torch.sin(angles)


@needs_cpp
@pytest.mark.parametrize("layout", ["contiguous", "heads_major", "strided_dim", "shared"])
@pytest.mark.parametrize("d", [64, 128, 256, 10, 96])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_cpp_matches_reference(cpu_isa, dtype, d, layout):
    """Every level: the reference's bits, a contiguous result, the source untouched. D 10 and 96 have halves that
    are not a multiple of the vector width (the padded last pass)."""
    k, positions, cos, sin = _inputs(d=d, dtype=dtype, layout=layout, seed=d)
    before = k.clone()
    got = rotate_keys(k, positions, cos, sin, backend="cpp")
    want = rotate_keys_reference(k, positions, cos, sin)
    assert got.is_contiguous() and got.dtype == dtype and got.shape == k.shape
    assert_equal(got, want, name=f"rotate_keys at {cpu_isa}")
    assert_equal(k, before, name="source keys")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_reference_within_one_rounding(dtype):
    """The reference is the float64 rotation up to the fp32 arithmetic (a few ulps of its terms) and one rounding to
    the dtype (half an ulp of the result)."""
    k, positions, cos, sin = _inputs(n=200, h=4, d=128, dtype=dtype, table=400)
    got = rotate_keys_reference(k, positions, cos, sin).double()
    want, size = rope_rotation64(k, positions, cos, sin)
    half_ulp = {torch.float32: 2.0**-24, torch.bfloat16: 2.0**-8, torch.float16: 2.0**-11}[dtype]
    bound = half_ulp * want.abs() + 3 * 2.0**-24 * size
    excess = (got - want).abs() - bound
    assert excess.max() <= 0, f"{dtype}: {int((excess > 0).sum())} elements beyond one rounding"


@needs_cpp
def test_bits_independent_of_threads():
    k, positions, cos, sin = _inputs(b=1, n=1500, h=8, d=128, table=3000)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = rotate_keys(k, positions, cos, sin, backend="cpp")
    finally:
        torch.set_num_threads(threads)
    assert_equal(rotate_keys(k, positions, cos, sin, backend="cpp"), one, name=f"{threads} threads vs 1")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_triton_matches_reference(dtype):
    """The Triton kernel under the interpreter (no fused multiply-add there either): the reference's bits, but for
    bf16, which the interpreter rounds toward zero when it converts from fp32 (numpy has no bf16): within one ulp
    there (tests/test_cuda.py checks the bits on a GPU)."""
    pytest.importorskip("triton")
    if _backend.triton_unavailable_reason(torch.device("cpu")) is not None:
        pytest.skip("Triton runs on CPU tensors only under the interpreter")
    k, positions, cos, sin = _inputs(n=9, h=3, d=32, dtype=dtype, layout="heads_major")
    got = rotate_keys(k, positions, cos, sin, backend="triton")
    want = rotate_keys_reference(k, positions, cos, sin)
    if dtype != torch.bfloat16:
        assert_equal(got, want, name="triton rotate_keys")
    else:
        exact = rotate_keys_reference(k.float(), positions, cos, sin)  # the fp32 values before the rounding
        err = (got.float() - exact).abs()
        assert (err < 2.0**-7 * exact.abs()).all(), f"{int((err >= 2.0**-7 * exact.abs()).sum())} beyond one ulp"
        assert got.shape == want.shape and got.dtype == want.dtype


def test_triton_tables_of_any_layout_and_clamped_positions():
    """The Triton launcher reads the tables whatever their strides (a transposed sin beside a contiguous cos), and
    clamps a position outside them to the last row in the kernel, as the attention kernel does (device values are
    not checked on the host): never an out-of-bounds read."""
    pytest.importorskip("triton")
    if _backend.triton_unavailable_reason(torch.device("cpu")) is not None:
        pytest.skip("Triton runs on CPU tensors only under the interpreter")
    from mplus_kernels.attention import triton_rotate

    k, positions, cos, sin = _inputs(n=9, h=3, d=32, dtype=torch.float32)
    sin_t = sin.t().contiguous().t()  # the same values, strides (1, P)
    got = triton_rotate.rotate_keys_fwd(k, positions.int(), cos, sin_t)
    assert_equal(got, rotate_keys_reference(k, positions, cos, sin), name="triton, strided sin table")
    past = positions.int().clone()
    past[2] = 90 + 5  # beyond the 90 table rows
    clamped = positions.clone()
    clamped[2] = 89
    got = triton_rotate.rotate_keys_fwd(k, past, cos, sin)
    assert_equal(got, rotate_keys_reference(k, clamped, cos, sin), name="triton, position clamped to the tables")


@needs_cpp
def test_positions_int32_and_empty():
    k, positions, cos, sin = _inputs()
    assert_equal(rotate_keys(k, positions.int(), cos, sin), rotate_keys(k, positions, cos, sin), name="int32")
    empty = rotate_keys(k[:, :0], positions[:0], cos, sin)
    assert empty.shape == (2, 0, 3, 64)


@needs_cpp
def test_meta_and_compile():
    """The fake kernel: the shape and dtype on meta (no values read), and a fullgraph trace."""
    k, positions, cos, sin = _inputs()
    out = rotate_keys(k.to("meta"), positions.to("meta"), cos.to("meta"), sin.to("meta"))
    assert out.device.type == "meta" and out.shape == k.shape and out.dtype == k.dtype
    compiled = torch.compile(lambda *a: rotate_keys(*a), fullgraph=True, backend="eager")
    assert_equal(compiled(k, positions.int(), cos, sin), rotate_keys_reference(k, positions, cos, sin), name="compiled")


BAD = [
    ("k", lambda k, p, c, s: (k[0], p, c, s), ValueError, r"k must be \[B, N, H, D\]"),
    ("k", lambda k, p, c, s: (k.to(torch.int32), p, c, s), TypeError, "k"),
    ("k", lambda k, p, c, s: (k[..., :63], p, c, s), ValueError, "must be even"),
    ("positions", lambda k, p, c, s: (k, p[:-1], c, s), ValueError, r"positions must be \[N=37\]"),
    ("positions", lambda k, p, c, s: (k, p.float(), c, s), TypeError, "positions"),
    ("positions", lambda k, p, c, s: (k, p + 60, c, s), ValueError, r"positions must index the 90 rows"),
    ("positions", lambda k, p, c, s: (k, p - 1, c, s), ValueError, r"positions must index the 90 rows"),
    ("rope_cos", lambda k, p, c, s: (k, p, c[:, :31], s), ValueError, r"rope_cos must be \[P, D/2=32\]"),
    ("rope_sin", lambda k, p, c, s: (k, p, c, s[:89]), ValueError, "rope_sin .* must have rope_cos's shape"),
    ("rope_cos", lambda k, p, c, s: (k, p, c.half(), s), TypeError, "rope_cos"),
    ("k", lambda k, p, c, s: (None, p, c, s), TypeError, "k"),
]


@needs_cpp
@pytest.mark.parametrize("name,make,error,match", BAD, ids=[f"{b[0]}-{i}" for i, b in enumerate(BAD)])
def test_bad_input_refused(name, make, error, match):
    """The wrapper names the argument before anything runs."""
    args = make(*_inputs(d=64))
    with pytest.raises(error, match=match):
        rotate_keys(*args)


@needs_cpp
def test_raw_op_checks_what_it_indexes_with():
    """torch.ops.mplus.rotate_keys itself refuses a position outside the tables, naming it, before writing."""
    k, positions, cos, sin = _inputs()
    bad = positions.int().clone()
    bad[5] = 90
    with pytest.raises(ValueError, match=r"positions\[5\]=90 is outside \[0, 90\)"):
        torch.ops.mplus.rotate_keys(k, bad, cos, sin)
    with pytest.raises(ValueError, match="positions must be a CPU int32"):
        torch.ops.mplus.rotate_keys(k, positions, cos, sin)  # int64


@needs_cpp
def test_gradient_refused():
    k, positions, cos, sin = _inputs(dtype=torch.float32)
    k.requires_grad_(True)
    with pytest.raises(NotImplementedError, match="k requires grad"):
        rotate_keys(k, positions, cos, sin)
    with pytest.raises(NotImplementedError, match="k requires grad"):
        torch.ops.mplus.rotate_keys(k, positions.int(), cos, sin)
    with torch.no_grad():
        rotate_keys(k, positions, cos, sin)


@needs_cpp
def test_opcheck():
    """Schema, the autograd registration (the refusal), the fake kernel and AOT dispatch."""
    k, positions, cos, sin = _inputs(b=1, n=6, h=2, d=32, dtype=torch.float32)
    utils = ["test_schema", "test_autograd_registration", "test_faketensor", "test_aot_dispatch_dynamic"]
    torch.library.opcheck(torch.ops.mplus.rotate_keys.default, (k, positions.int(), cos, sin), test_utils=utils)
