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
