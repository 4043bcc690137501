"""Shared benchmark plumbing: every result records its provider, shape, dtype, peak extra memory and the machine.

Two runs of the same files:
* ``pytest benchmarks/ --benchmark-only`` (``make bench-full``): every benchmark;
* ``--bench-quick`` (``make bench``): the representative subset ``QUICK`` — every op family and the model at M+
  shapes, the slow pure-PyTorch references of the model-level benchmarks left to the full run — with fewer rounds
  where a call site says so (``quick_rounds``).
At the start the run prints how many benchmarks it selected and the expected total (``benchmarks/expected_s.json``:
seconds per benchmark, setup included, on the 2-core development machine), then one progress line per benchmark.
``--bench-update-expected`` writes this run's times into that table (for the mode that ran).

Conventions the report (``benchmarks/report.py``) relies on:
* ``benchmark.group`` names one comparison (same inputs for every provider in the group), and every provider of a
  group runs the same number of rounds (``run_benchmark`` refuses a provider whose rounds differ from the group's);
* ``benchmark.extra_info["provider"]`` names the implementation; the fused one is ``"mplus"``; ``variant`` (optional)
  says in words what a provider's setting is (e.g. a buffer reused or allocated per call);
* ``benchmark.extra_info["peak_extra_bytes"]`` is never measured inside the timing: in a separate call, or, for calls
  of a second or more, around the timed rounds (the meter's reset in pytest-benchmark's ``setup``, its read in its
  ``teardown``, both outside the timed region) — the maximum over the rounds. Other metrics (``tflops``, ``gbps``,
  ``gflops``) are optional; ``moved_bytes`` (bytes read + written once) turns into ``gbps`` from the measured median.
* every record carries the machine: ``machine`` (host, cores, memory), ``cpu`` (model name and the vector extensions
  that matter here), ``cpu_isa`` (the ISA level the C++ CPU kernels ran at), ``fp32_peak_gflops`` (the machine's
  measured fp32 peak, see ``fp32_peak_gflops``) and ``read_bw_gbps`` (its measured read bandwidth, see
  ``read_bandwidth_gbps``); the report turns ``tflops``/``gflops`` into a fraction of the first and ``gbps`` into a
  fraction of the second.
* ``MPLUS_BENCH_ISAS=all`` (or a comma list of levels) adds one provider ``mplus@<level>`` per other ISA level this
  CPU runs, on the same inputs, next to ``mplus`` (the best level, or the one ``MPLUS_CPU_ISA`` forces).
Benchmarks never assert on time.
"""

from __future__ import annotations

import contextlib
import fnmatch
import functools
import json
import os
import platform
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

import mplus_kernels as mk
from mplus_kernels.testing import (
    fp32_peak_gflops,
    measure_peak_memory,
    peak_memory_available,
    provider_isa,
    status_kib,
)

os.environ.setdefault("TRITON_INTERPRET", "0")

EXPECTED = Path(__file__).with_name("expected_s.json")
METER_IN_ROUNDS_S = 1.0  # a call at least this long has its peak memory metered around its timed rounds

# The representative subset of `make bench` (--bench-quick), as patterns over "<file>::<test id>" (``*`` and ``?`` are
# wildcards, brackets literal): every op family at the M+ shapes of the README's highlights (bf16, the model dtype)
# with all its peers, and the model-level benchmarks with mplus, the official computation and a plain Llama (their
# pure-PyTorch references, which dominated the full run, are left to it, but for inject, where the reference is cheap).
QUICK = (
    "bench_attention.py::test_memory_attention[1-bf16-*]",  # decode, Tq 1: every provider
    "bench_attention.py::test_decode_rotated_memory[bf16-*]",  # decode as the model runs it (keys rotated)
    "bench_attention.py::test_shared_memory_decode[bf16-*]",  # decode of a batch over one memory (serving)
    "bench_attention.py::test_rotate_keys[*]",  # the rotation a generation does once per layer at its prefill
    "bench_attention.py::test_memory_attention[2048-bf16-official]",  # prefill, Tq 2048 (flex: in the full run)
    "bench_attention.py::test_memory_attention[2048-bf16-sdpa_gqa]",
    "bench_attention.py::test_memory_attention[2048-bf16-mplus*]",
    "bench_attention_backward.py::test_attention_backward[*-bf16]",
    "bench_memory_update.py::test_official_cat",
    "bench_memory_update.py::test_torch_inplace",
    "bench_memory_update.py::test_mplus",
    "bench_retrieval.py::test_retrieval[153600-bf16-2048-*]",  # the LTM cap, a 2,048-token prompt
    "bench_retrieval.py::test_retriever_scores_fwd_bwd[bf16-*]",
    "bench_ltm.py::*",
    "bench_model.py::test_inject[*]",
    *(
        f"bench_model.py::test_{phase}[{p}]"
        for phase in ("prefill", "decode")
        for p in ("mplus", "official_sdpa", "llama_sdpa")
    ),
    *(f"bench_serving.py::test_shared_memory_batch[{p}-4-*]" for p in ("mplus", "official_sdpa", "llama_sdpa")),
    *(f"bench_serving.py::test_two_memories[{p}-*]" for p in ("mplus", "official_sdpa", "llama_sdpa")),
    *(f"bench_training.py::test_training_step[{p}-bf16-autocast]" for p in ("mplus", "official_sdpa", "llama_sdpa")),
    "bench_distributed.py::*",  # 1 vs 2 ranks, DDP and FSDP2: small, ~30 s
)


def matches(key: str, pattern: str) -> bool:
    """Whether ``<file>::<test id>`` matches a ``QUICK`` pattern (``*``, ``?``; brackets literal)."""
    return fnmatch.fnmatchcase(key, pattern.replace("[", "[[]"))


def quick_selected(key: str) -> bool:
    """Whether ``<file>::<test id>`` is in the quick subset."""
    return any(matches(key, pattern) for pattern in QUICK)


_MODE: dict[str, Any] = {"quick": False}
_ROUNDS: dict[str, tuple[int, str]] = {}  # group -> (rounds, first provider): every provider gets the same
_BENCH = pytest.StashKey[Any]()


def pytest_addoption(parser):
    group = parser.getgroup("mplus benchmarks")
    group.addoption("--bench-quick", action="store_true", help="run the representative subset (make bench)")
    group.addoption(
        "--bench-update-expected",
        action="store_true",
        help="write this run's seconds per benchmark into benchmarks/expected_s.json (under the mode that ran)",
    )


def pytest_configure(config):
    _MODE["quick"] = bool(config.getoption("--bench-quick", False))


def pytest_report_header(config):  # noqa: ARG001
    return (
        f"mplus benchmarks: torch {torch.__version__}, {torch.get_num_threads()} threads, {os.cpu_count()} cpus, "
        f"CPU {cpu_name()}, kernels at ISA level {mk.cpu_isa()} (this CPU runs {', '.join(mk.supported_cpu_isas())}), "
        f"measured fp32 peak {fp32_peak_gflops():.0f} GFLOP/s, read bandwidth {read_bandwidth_gbps():.1f} GB/s"
    )


# --- the machine -----------------------------------------------------------------------------------------------------
def _cpuinfo() -> dict[str, str]:
    """The first processor's fields of /proc/cpuinfo (empty where there is none)."""
    try:
        with open("/proc/cpuinfo") as f:
            block = f.read().split("\n\n", 1)[0]
    except OSError:
        return {}
    return {k.strip(): v.strip() for k, _, v in (line.partition(":") for line in block.splitlines())}


@functools.cache
def cpu_name() -> str:
    """The CPU's model name and the vector extensions the kernels and their peers use, e.g. ``AMD EPYC (avx2,
    avx512f, avx512_bf16, avx512_vnni; no amx)``."""
    info = _cpuinfo()
    name = info.get("model name") or platform.processor() or platform.machine()
    flags = set(info.get("flags", "").split())
    if not flags:
        return name
    have = [f for f in ("avx2", "fma", "avx512f", "avx512_bf16", "avx512_fp16", "avx512_vnni") if f in flags]
    amx = sorted(f for f in flags if f.startswith("amx"))
    return f"{name} ({', '.join(have) or 'no avx2'}; {', '.join(amx) if amx else 'no amx'})"


@functools.cache
def machine_name() -> str:
    """Host, logical CPUs, memory and OS, e.g. ``vm: 2 cpus, 23.4 GiB, Linux x86_64``."""
    mem = ""
    with contextlib.suppress(ValueError, OSError, AttributeError):  # sysconf names the platform lacks
        mem = f", {os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES') / 2**30:.1f} GiB"
    return f"{platform.node()}: {os.cpu_count()} cpus{mem}, {platform.system()} {platform.machine()}"


@functools.cache
def read_bandwidth_gbps() -> float:
    """The machine's read bandwidth as measured here: the best of 5 sums of a 512 MiB fp32 tensor (16× the
    development machine's 32 MiB L3, so it streams from memory) on all intra-op threads, in GB/s. Measured once per
    session, like ``fp32_peak_gflops``; the report gives each ``gbps`` (bytes read + written once / median) as a
    fraction of it."""
    x = torch.ones(128 * 2**20)
    x.sum()
    best = float("inf")
    for _ in range(5):
        t0 = time.perf_counter()
        x.sum()
        best = min(best, time.perf_counter() - t0)
    return x.numel() * x.element_size() / best / 1e9


# --- the run: selection, expected total, progress --------------------------------------------------------------------
def _key(item: pytest.Item) -> str:
    return f"{item.path.name}::{item.name}"


def _expected() -> dict[str, Any]:
    try:
        with open(EXPECTED) as f:
            return json.load(f)
    except (OSError, ValueError):
        return {}


def _mode() -> str:
    return "quick" if _MODE["quick"] else "full"


def _fmt_min(seconds: float) -> str:
    return f"{int(seconds // 60)}:{int(seconds % 60):02d}"


def pytest_collection_modifyitems(config, items):
    if not _MODE["quick"]:
        return
    keep = [i for i in items if quick_selected(_key(i))]
    dropped = [i for i in items if i not in keep]
    if dropped:
        config.hook.pytest_deselected(items=dropped)
    items[:] = keep


def pytest_collection_finish(session):
    table = _expected()
    expected = {**table.get("full", {}), **table.get(_mode(), {})}
    keys = [_key(i) for i in session.items]
    known = [expected[k] for k in keys if k in expected]
    total = sum(known)
    _MODE.update(expected=expected, total=total, n=len(keys), done=0, t0=time.perf_counter())
    what = "the quick subset (make bench)" if _MODE["quick"] else "the full suite (make bench-full)"
    unknown = len(keys) - len(known)
    _write(
        session.config,
        f"mplus benchmarks, {what}: {len(keys)} benchmarks, expected total ~{total / 60:.0f} min "
        f"(benchmarks/expected_s.json: the 2-core development machine"
        + (f"; {unknown} without an estimate" if unknown else "")
        + ")",
    )


def _write(config, line: str) -> None:
    reporter = config.pluginmanager.get_plugin("terminalreporter")
    if reporter is not None:
        if getattr(getattr(reporter, "_tw", None), "width_of_current_line", 0):
            reporter.write("\n")  # after -q's dots: a line of its own
        reporter.write_line(line)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_call(item):
    bench = getattr(item, "funcargs", {}).get("benchmark")
    if bench is not None:
        item.stash[_BENCH] = bench
    yield


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item, nextitem):  # noqa: ARG001
    t0 = time.perf_counter()
    yield
    took = time.perf_counter() - t0
    bench = item.stash.get(_BENCH, None)
    if bench is not None:
        bench.extra_info["wall_s"] = took
    if "n" not in _MODE:
        return
    _MODE["done"] += 1
    _MODE.setdefault("times", {})[_key(item)] = took
    elapsed = time.perf_counter() - _MODE["t0"]
    exp = _MODE["expected"].get(_key(item))
    _write(
        item.config,
        f"[{_MODE['done']}/{_MODE['n']}] {_key(item)} took {took:.1f} s"
        + (f" (expected {exp:.{0 if exp >= 10 else 1}f} s)" if exp is not None else "")
        + f", elapsed {_fmt_min(elapsed)} of ~{_fmt_min(_MODE['total'])}",
    )


def pytest_sessionfinish(session):
    if not session.config.getoption("--bench-update-expected", False) or not _MODE.get("times"):
        return
    table = _expected()
    section = table.setdefault(_mode(), {})
    section.update({k: round(v, 1) for k, v in _MODE["times"].items()})
    table[_mode()] = dict(sorted(section.items()))
    with open(EXPECTED, "w") as f:
        json.dump(table, f, indent=1)
        f.write("\n")


# --- one benchmark ---------------------------------------------------------------------------------------------------
def run_benchmark(
    benchmark: Any,
    fn: Callable[[], Any],
    *,
    group: str,
    provider: str,
    shape: str,
    dtype: torch.dtype | str,
    rounds: int = 5,
    quick_rounds: int | None = None,
    warmup_rounds: int = 1,
    measure_memory: bool = True,
    meter_in_rounds: bool | None = None,
    **extra: Any,
) -> Any:
    """Time ``fn`` with pytest-benchmark (median over ``rounds``; ``quick_rounds`` under ``--bench-quick``) and record
    the conventions above.

    Untimed calls before the rounds: ``warmup_rounds`` (at least one when the memory is measured: lazy initialisation
    stays out of the peak), then, for the memory, one separate call — or none when the warm-up took
    ``METER_IN_ROUNDS_S`` or more (or ``meter_in_rounds=True``): the timed rounds are metered instead, outside their
    timing. So a slow reference costs ``1 + rounds`` calls, not ``3 + rounds``."""
    benchmark.group = group
    if _MODE["quick"] and quick_rounds is not None:
        rounds = quick_rounds
    first = _ROUNDS.setdefault(group, (rounds, provider))
    if first[0] != rounds:
        raise ValueError(
            f"run_benchmark: group {group!r}: provider {provider!r} asks for {rounds} rounds, {first[1]!r} ran "
            f"{first[0]}: every provider of a comparison gets the same number of rounds"
        )
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
        "machine": machine_name(),
        "cpu": cpu_name(),
        "fp32_peak_gflops": fp32_peak_gflops(),
        "read_bw_gbps": read_bandwidth_gbps(),
        "bench_mode": _mode(),
        **extra,
    }
    measuring = measure_memory and peak_memory_available()
    first_call = 0.0
    for _ in range(max(warmup_rounds, 1 if measuring and not meter_in_rounds else 0)):
        t0 = time.perf_counter()
        fn()  # warm caches and lazy initialisation (out of the timing and of the memory measurement)
        first_call = max(first_call, time.perf_counter() - t0)
    setup = teardown = None
    if measuring:
        if meter_in_rounds or (meter_in_rounds is None and first_call >= METER_IN_ROUNDS_S):
            peaks: list[int] = []
            setup, teardown = _round_meter(peaks)
        else:
            _, info["peak_extra_bytes"] = measure_peak_memory(fn)
    benchmark.extra_info.update(info)
    result = benchmark.pedantic(fn, rounds=rounds, iterations=1, warmup_rounds=0, setup=setup, teardown=teardown)
    if setup is not None:
        benchmark.extra_info["peak_extra_bytes"] = max(peaks)
    median = benchmark.stats.stats.median
    if "moved_bytes" in extra:  # bandwidth from the measured median
        benchmark.extra_info["gbps"] = extra["moved_bytes"] / median / 1e9
    if "tokens_per_s_tokens" in extra:
        benchmark.extra_info["tokens_per_s"] = extra["tokens_per_s_tokens"] / median
    return result


def _round_meter(peaks: list[int]) -> tuple[Callable[[], None], Callable[..., None]]:
    """pytest-benchmark ``setup``/``teardown`` that meter each timed round's peak extra memory into ``peaks``, outside
    the timed region: ``setup`` resets the resident-memory high-water mark as ``measure_peak_memory`` does (it runs
    it on a no-op: collect, trim, reset) and reads the resident memory; ``teardown`` reads the high-water mark."""
    base: list[int] = []

    def setup() -> None:
        measure_peak_memory(lambda: None)
        base.append(status_kib("VmRSS"))

    def teardown(*_args: Any, **_kwargs: Any) -> None:
        peaks.append(max(0, status_kib("VmHWM") - base.pop()) * 1024)

    return setup, teardown


@pytest.fixture
def bench(benchmark):
    """``bench(fn, group=..., provider=..., shape=..., dtype=..., rounds=..., **extra)``."""

    def _run(fn, **kwargs):
        return run_benchmark(benchmark, fn, **kwargs)

    return _run
