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
