"""Shared benchmark plumbing: every result records its provider, shape, dtype and peak extra memory.

Conventions the report (``benchmarks/report.py``) relies on:
* ``benchmark.group`` names one comparison (same inputs for every provider in the group);
* ``benchmark.extra_info["provider"]`` names the implementation; the fused one is ``"mplus"``;
* ``benchmark.extra_info["peak_extra_bytes"]`` is measured in a separate call (``measure_peak_memory``), never
  during timing; other metrics (``tflops``, ``gbps``, ``gflops``) are optional; ``moved_bytes`` (bytes read +
  written once) turns into ``gbps`` from the measured median.
* ``benchmark.extra_info["cpu_isa"]`` is the ISA level the C++ CPU kernels ran at, and ``fp32_peak_gflops`` the
  machine's measured fp32 peak (see ``fp32_peak_gflops``); the report turns ``tflops``/``gflops`` into a fraction of it.
* ``MPLUS_BENCH_ISAS=all`` (or a comma list of levels) adds one provider ``mplus@<level>`` per other ISA level this
  CPU runs, on the same inputs, next to ``mplus`` (the best level, or the one ``MPLUS_CPU_ISA`` forces).
Benchmarks never assert on time.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

import pytest
import torch

import mplus_kernels as mk
from mplus_kernels.testing import fp32_peak_gflops, measure_peak_memory, peak_memory_available, provider_isa

os.environ.setdefault("TRITON_INTERPRET", "0")


def pytest_report_header(config):  # noqa: ARG001
    return (
        f"mplus benchmarks: torch {torch.__version__}, {torch.get_num_threads()} threads, {os.cpu_count()} cpus, "
        f"CPU kernels at ISA level {mk.cpu_isa()} (this CPU runs {', '.join(mk.supported_cpu_isas())}), "
        f"measured fp32 peak {fp32_peak_gflops():.0f} GFLOP/s"
    )


def run_benchmark(
    benchmark: Any,
    fn: Callable[[], Any],
    *,
    group: str,
    provider: str,
    shape: str,
    dtype: torch.dtype | str,
    rounds: int = 5,
    warmup_rounds: int = 1,
    measure_memory: bool = True,
    **extra: Any,
) -> Any:
    """Time ``fn`` with pytest-benchmark (median over ``rounds``) and record the conventions above."""
    benchmark.group = group
    level = provider_isa(provider)
    if level is not None:  # the same call at another ISA level of the C++ kernels
        inner = fn

        def fn():
            with mk.use_cpu_isa(level):
                return inner()

    info = {
        "provider": provider,
        "shape": shape,
        "dtype": str(dtype).replace("torch.", ""),
        "cpu_isa": level or mk.cpu_isa(),
        "fp32_peak_gflops": fp32_peak_gflops(),
        **extra,
    }
    if measure_memory and peak_memory_available():
        fn()  # warm caches and lazy initialisation out of the memory measurement
        _, info["peak_extra_bytes"] = measure_peak_memory(fn)
    benchmark.extra_info.update(info)
    result = benchmark.pedantic(fn, rounds=rounds, iterations=1, warmup_rounds=warmup_rounds)
    median = benchmark.stats.stats.median
    if "moved_bytes" in extra:  # bandwidth from the measured median
        benchmark.extra_info["gbps"] = extra["moved_bytes"] / median / 1e9
    if "tokens_per_s_tokens" in extra:
        benchmark.extra_info["tokens_per_s"] = extra["tokens_per_s_tokens"] / median
    return result


@pytest.fixture
def bench(benchmark):
    """``bench(fn, group=..., provider=..., shape=..., dtype=..., rounds=..., **extra)``."""

    def _run(fn, **kwargs):
        return run_benchmark(benchmark, fn, **kwargs)

    return _run
