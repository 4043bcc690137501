"""Test session set-up: Triton runs under the CPU interpreter when there is no CUDA device.

TRITON_INTERPRET must be set before triton is imported (``@triton.jit`` reads it when a kernel is defined), so it is
set here, at collection time, before any test module imports a kernel.
"""

from __future__ import annotations

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


def pytest_report_header(config):  # noqa: ARG001
    from mplus_kernels import _backend

    return (
        f"mplus: torch {torch.__version__}, device {DEVICE}, TRITON_INTERPRET={os.environ.get('TRITON_INTERPRET')}, "
        f"cpp backend {'built' if _backend.cpp_available() else 'MISSING: ' + str(_backend.cpp_import_error())}"
    )


def _cpu_isa_levels() -> list:
    """Every ISA level of the C++ kernels; one this CPU (or its OS, or this torch build) cannot run is skipped with the
    reason, the missing feature: reported as not run, never as passed."""
    from mplus_kernels import _backend

    if not _backend.cpp_available():
        return ["baseline"]
    skip = lambda level: pytest.mark.skip(reason=f"{level} not run: {_backend.cpu_isa_missing(level)}")  # noqa: E731
    return [level if ok else pytest.param(level, marks=skip(level)) for level, ok in _backend.cpu_isa_levels()]


def pytest_generate_tests(metafunc):
    # Tests that use the `cpu_isa` fixture (directly or through `pytestmark = pytest.mark.usefixtures("cpu_isa")`)
    # run once per ISA level of the C++ kernels: every level this CPU executes runs (every CI machine, x86-64 with AVX2
    # at least, covers the baseline and AVX2 variants; an AVX-512 machine avx512, a Zen 4 avx512_bf16, a Sapphire
    # Rapids amx too), and every other level is reported as skipped, with the CPU feature it lacks.
    if "cpu_isa" in metafunc.fixturenames:
        metafunc.parametrize("cpu_isa", _cpu_isa_levels(), indirect=True)


@pytest.fixture
def cpu_isa(request):
    """The ISA level the C++ CPU kernels run at during the test (restored after it)."""
    from mplus_kernels import _backend

    if not _backend.cpp_available():
        yield request.param
        return
    with _backend.use_cpu_isa(request.param):
        yield request.param
