"""Two-source row gather (long-term-memory retrieval): every backend against the reference, bad inputs."""

from __future__ import annotations

import pytest
import torch

import mplus_kernels as mk
from mplus_kernels.gather import gather_rows_reference_
from mplus_kernels.testing import assert_equal, nan_like

BACKENDS = ["cpp", "triton", "reference"]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(
    ("n_a", "n_b", "rows", "feat"),
    [(0, 5, 3, (7,)), (9, 0, 9, (1,)), (33, 17, 40, (3, 5)), (1, 1, 0, (4,)), (100, 29, 64, (130,))],
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64, torch.int32])
def test_matches_reference(backend, n_a, n_b, rows, feat, dtype):
    gen = torch.Generator().manual_seed(n_a * 7 + rows)
    a = (torch.randn(n_a, *feat, generator=gen) * 100).to(dtype)
    b = (torch.randn(n_b, *feat, generator=gen) * 100).to(dtype)
    index = torch.randint(0, n_a + n_b, (rows,), generator=gen)  # repeats allowed, any order
    out = nan_like(torch.empty(rows, *feat, dtype=dtype))
    expected = torch.empty_like(out)
    gather_rows_reference_(expected, a, b, index)
    mk.gather_rows_(out, a, b, index, backend=backend)
    assert_equal(out, expected, name="gathered rows")
    assert_equal(expected, torch.cat([a, b])[index], name="reference vs cat + index")


@pytest.mark.parametrize("backend", BACKENDS)
def test_strided_sources_and_output(backend):
    """Sources may be row slices of bigger buffers (LTM capacity buffers, the [L, C, d] cache)."""
    big_a, big_b = torch.randn(50, 8), torch.randn(3, 20, 8)
    a, b = big_a[:30], big_b[1, 5:12]
    staging = torch.full((2, 16, 8), float("nan"))
    out = staging[1, :10]
    index = torch.tensor([36, 0, 29, 30, 5, 35, 1, 2, 33, 31])
    mk.gather_rows_(out, a, b, index, backend=backend)
    assert_equal(out, torch.cat([a, b])[index], name="rows")
    assert staging[0].isnan().all() and staging[1, 10:].isnan().all(), "nothing outside out is written"


@pytest.mark.parametrize(
    ("case", "error", "match"),
    [
        ("range", ValueError, r"index range \[0, 12\] is outside \[0, 12\)"),
        ("negative", ValueError, r"index range \[-1, 3\]"),
        ("feature", ValueError, r"src_b \[4, 3\] must be \[N, 2\]"),
        ("dtype", ValueError, r"src_a is torch.float64"),
        ("index_len", ValueError, r"index must be \[R=3\]"),
        ("index_dtype", TypeError, r"index must be an integer tensor"),
        ("device", ValueError, r"src_b is torch.float32 on meta"),
    ],
)
def test_bad_input(case, error, match):
    a, b, out, index = torch.randn(8, 2), torch.randn(4, 2), torch.zeros(3, 2), torch.tensor([0, 3, 11])
    if case == "range":
        index = torch.tensor([0, 3, 12])
    elif case == "negative":
        index = torch.tensor([0, 3, -1])
    elif case == "feature":
        b = torch.randn(4, 3)
    elif case == "dtype":
        a = a.double()
    elif case == "index_len":
        index = index[:2]
    elif case == "index_dtype":
        index = index.float()
    elif case == "device":
        b = b.to("meta")
    with pytest.raises(error, match=match):
        mk.gather_rows_(out, a, b, index)
    assert (out == 0).all(), "nothing written on bad input"


def test_opcheck():
    torch.library.opcheck(
        torch.ops.mplus.gather_rows_.default,
        (torch.zeros(3, 4), torch.randn(5, 4), torch.randn(2, 4), torch.tensor([6, 0, 4])),
    )


# ------------------------------------------------------------------------------------------------------------------
# The raw C++ op checks what it indexes with (DESIGN.md §2.5): direct calls, no Python validation in front
# ------------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("case", "match"),
    [
        (
            "index_too_big",
            r"index \[3\] has index\[2\]=12, expected rows of \[src_a; src_b\] in \[0, Na \+ Nb = 8 \+ 4",
        ),
        ("index_negative", r"index\[0\]=-1, expected rows of \[src_a; src_b\] in \[0, "),
        ("index_far_out", r"index\[1\]=4611686018427387904"),
        ("index_int32", r"index must be a contiguous CPU int64 \[R=3\] tensor, got Int"),
        ("index_len", r"index must be a contiguous CPU int64 \[R=3\] tensor, got Long \[2\]"),
        ("index_strided", r"index must be a contiguous CPU int64"),
        ("src_shape", r"src_b \[4, 1, 2\] must be \[N, \*F\] with the row shape of out \[3, 2\]"),
        ("src_transposed_row", r"src_a \[8, 2, 1\] must be \[N, \*F\]"),  # same row bytes, other shape
        ("src_dtype", r"src_a has dtype Double, out has Float"),
        ("src_not_dense", r"src_b \[4, 2\] must have contiguous rows \(dims >= 1\), got strides \[4, 2\]"),
        ("out_stride0", r"out \[3, 2\] with strides \[0, 1\] has overlapping rows"),
        ("out_overlapping_rows", r"out \[3, 2\] with strides \[1, 1\] has overlapping rows"),
        ("out_aliases_src", r"out \[3, 2\] \(strides \[2, 1\]\) and src_a \[8, 2\] \(strides \[2, 1\]\) share memory"),
    ],
)
def test_raw_op_rejects_malformed_input_and_writes_nothing(case, match):
    gen = torch.Generator().manual_seed(0)
    a, b, index = torch.randn(8, 2, generator=gen), torch.randn(4, 2, generator=gen), torch.tensor([0, 3, 11])
    out = torch.full((3, 2), float("nan"))
    if case == "index_too_big":
        index = torch.tensor([0, 3, 12])
    elif case == "index_negative":
        index = torch.tensor([-1, 3, 11])
    elif case == "index_far_out":
        index = torch.tensor([0, 2**62, 1])
    elif case == "index_int32":
        index = index.int()
    elif case == "index_len":
        index = index[:2]
    elif case == "index_strided":
        index = torch.tensor([0, 9, 3, 9, 11, 9])[::2]
    elif case == "src_shape":
        b = b[:, None]
    elif case == "src_transposed_row":
        a = a[:, :, None]
    elif case == "src_dtype":
        a = a.double()
    elif case == "src_not_dense":
        b = torch.randn(4, 4, generator=gen)[:, ::2]
    elif case == "out_stride0":
        out = torch.full((1, 2), float("nan")).expand(3, 2)
    elif case == "out_overlapping_rows":
        out = torch.full((4,), float("nan")).as_strided((3, 2), (1, 1))
    elif case == "out_aliases_src":
        out = a[5:]
    before = [t.clone() for t in (out, a, b, index)]
    error = TypeError if case == "src_dtype" else ValueError  # TORCH_CHECK_TYPE / TORCH_CHECK_VALUE
    with pytest.raises(error, match=match):
        torch.ops.mplus.gather_rows_(out, a, b, index)
    for i, (x, y) in enumerate(zip(before, (out, a, b, index))):
        assert_equal(y, x, name=f"input {i} after a rejected raw call ({case})")


def test_raw_op_checks_index_even_for_empty_rows():
    """Zero-byte rows move nothing, but an out-of-range index is still a malformed call."""
    with pytest.raises(ValueError, match=r"index\[1\]=5"):
        torch.ops.mplus.gather_rows_(torch.empty(2, 0), torch.empty(3, 0), torch.empty(1, 0), torch.tensor([0, 5]))


def test_raw_op_accepts_disjoint_views_of_one_buffer():
    """out and a source may be disjoint rows of one buffer (here interleaved: their byte spans intersect, their rows
    do not); stride-0 (expand()ed) sources are read-only and fine."""
    buf = torch.randn(24, 3)
    src, out = buf[::2], buf[1::2][:4]
    expected = src[[11, 0, 4, 4]]
    torch.ops.mplus.gather_rows_(out, src, torch.randn(1, 3).expand(5, 3), torch.tensor([11, 0, 4, 4]))
    assert_equal(out, expected, name="rows gathered into the same buffer")
    shared = torch.randn(1, 3).expand(5, 3)
    torch.ops.mplus.gather_rows_(out, src[:0], shared, torch.tensor([4, 0, 2, 1]))
    assert_equal(out, shared[:4], name="rows of a stride-0 source")
