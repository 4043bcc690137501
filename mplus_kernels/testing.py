"""Shared test helpers: the tolerance policy, a verbose ``assert_close``, and a peak-memory meter.

Tolerance policy (one table for the whole package):
* bookkeeping (indices, positions, ages, copied rows): exact, ``torch.equal``;
* arithmetic kernels vs the fp32 reference: ``TOLERANCES[dtype]`` (atol, rtol) below;
* attention-like reductions: FlashAttention's rule, ``|kernel − ref_fp32| ≤ 2·|ref_lowp − ref_fp32| + atol_floor``
  (:func:`assert_within_reference_error`): the kernel may be no worse than twice the reference's own error when the
  reference runs in the same low precision.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import gc
import os
import time
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from . import _backend

TOLERANCES: dict[torch.dtype, tuple[float, float]] = {
    torch.float64: (1e-10, 1e-10),
    torch.float32: (1e-5, 1e-5),
    torch.float16: (1e-3, 1e-3),
    torch.bfloat16: (1e-2, 1.6e-2),
}


def tolerance(dtype: torch.dtype) -> tuple[float, float]:
    return TOLERANCES[dtype]


def _describe_mismatch(actual: Tensor, expected: Tensor, bad: Tensor, limit: int = 5) -> str:
    a, e = actual.double(), expected.double()
    diff = (a - e).abs()
    finite = torch.isfinite(diff)
    max_abs = float(diff[finite].max()) if finite.any() else float("nan")
    denom = float(e.pow(2).mean().sqrt()) or 1.0
    rel_rms = float((a - e)[finite].pow(2).mean().sqrt()) / denom if finite.any() else float("nan")
    idx = bad.nonzero()[:limit]
    firsts = ", ".join(f"{tuple(i.tolist())}: {float(a[tuple(i)]):.6g} vs {float(e[tuple(i)]):.6g}" for i in idx)
    return (
        f"{int(bad.sum())} of {bad.numel()} elements differ; max abs error {max_abs:.3g}, "
        f"relative RMS error {rel_rms:.3g}; first mismatches (index: actual vs expected): {firsts}"
    )


def assert_close(
    actual: Tensor,
    expected: Tensor,
    *,
    atol: float | None = None,
    rtol: float | None = None,
    dtype: torch.dtype | None = None,
    name: str = "tensor",
) -> None:
    """``|actual − expected| ≤ atol + rtol·|expected|`` elementwise (NaN equal to NaN), with a readable failure.

    ``atol``/``rtol`` default to ``TOLERANCES[dtype or actual.dtype]``.
    """
    if actual.shape != expected.shape:
        raise AssertionError(f"{name}: shape {list(actual.shape)} != expected {list(expected.shape)}")
    d_atol, d_rtol = TOLERANCES.get(dtype or actual.dtype, (0.0, 0.0))
    atol = d_atol if atol is None else atol
    rtol = d_rtol if rtol is None else rtol
    a, e = actual.detach().cpu().double(), expected.detach().cpu().double()
    both_nan = a.isnan() & e.isnan()
    bad = ~((a - e).abs() <= atol + rtol * e.abs()) & ~both_nan
    if bad.any():
        raise AssertionError(f"{name} (atol={atol:g}, rtol={rtol:g}): {_describe_mismatch(a, e, bad)}")


def assert_equal(actual: Tensor, expected: Tensor, *, name: str = "tensor") -> None:
    """Exact equality (shape, dtype and every element), with a readable failure."""
    if actual.shape != expected.shape or actual.dtype != expected.dtype:
        raise AssertionError(
            f"{name}: {actual.dtype} {list(actual.shape)} != expected {expected.dtype} {list(expected.shape)}"
        )
    a, e = actual.detach().cpu(), expected.detach().cpu()
    bad = ~((a == e) | (a.isnan() & e.isnan())) if a.is_floating_point() else a != e
    if bad.any():
        raise AssertionError(f"{name} must match exactly: {_describe_mismatch(a, e, bad)}")


def assert_within_reference_error(
    actual: Tensor, ref: Tensor, ref_lowp: Tensor, *, factor: float = 2.0, atol_floor: float = 1e-5, name: str = "out"
) -> None:
    """FlashAttention's rule: ``max|actual − ref| ≤ factor·max|ref_lowp − ref| + atol_floor``.

    ``ref`` is the reference computed in fp32 from the same (low-precision) inputs, ``ref_lowp`` the same reference
    computed in the inputs' low precision.
    """
    a, r, rl = actual.detach().cpu().double(), ref.detach().cpu().double(), ref_lowp.detach().cpu().double()
    err = float((a - r).abs().max()) if a.numel() else 0.0
    ref_err = float((rl - r).abs().max()) if a.numel() else 0.0
    bound = factor * ref_err + atol_floor
    if not err <= bound:
        bad = (a - r).abs() > bound
        raise AssertionError(
            f"{name}: max error {err:.3g} exceeds {factor}× the reference's own low-precision error {ref_err:.3g} "
            f"(+{atol_floor:g}); {_describe_mismatch(a, r, bad)}"
        )


def rope_rotation64(k: Tensor, positions: Tensor, cos: Tensor, sin: Tensor) -> tuple[Tensor, Tensor]:
    """``k [..., N, H, D]`` rotated by the table rows ``positions [N]`` in float64 (rotate_half's convention), and the
    size of its terms (``|a cos| + |b sin|`` per element): a bound on the fp32 arithmetic's error is a few ulps of it.
    """
    d = k.shape[-1]
    c, s = cos[positions.long()].double()[:, None, :], sin[positions.long()].double()[:, None, :]
    a, b = k[..., : d // 2].double(), k[..., d // 2 :].double()
    want = torch.cat([a * c - b * s, b * c + a * s], -1)
    size = torch.cat([(a * c).abs() + (b * s).abs(), (b * c).abs() + (a * s).abs()], -1)
    return want, size


def nan_like(t: Tensor) -> Tensor:
    """An output buffer filled with NaN (or the int minimum), so unwritten elements are caught."""
    if t.is_floating_point():
        return torch.full_like(t, float("nan"))
    return torch.full_like(t, torch.iinfo(t.dtype).min)


# --------------------------------------------------------------------------------------------------------------------
# Peak memory on the CPU. torch's CPU allocator keeps no statistics, so the meter reads the process's resident-set
# high-water mark (VmHWM), after resetting it through /proc/self/clear_refs. glibc is told to serve every allocation
# of 128 KiB or more with mmap and to return it on free, so freed tensors leave RSS at once and the next measurement
# sees fresh pages. The result counts pages actually touched (a torch.empty never written costs nothing).
# --------------------------------------------------------------------------------------------------------------------
_M_MMAP_THRESHOLD = -3
_libc: Any = None


def _setup_malloc() -> None:
    global _libc
    if _libc is None:
        _libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        _libc.mallopt(_M_MMAP_THRESHOLD, 128 * 1024)


def status_kib(field: str) -> int:
    """A ``/proc/self/status`` field in KiB (``VmRSS``, ``VmHWM``): what the peak-memory measurements read."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def peak_memory_available() -> bool:
    return os.path.exists("/proc/self/clear_refs") and os.access("/proc/self/clear_refs", os.W_OK)


def measure_peak_memory(fn: Callable[[], Any]) -> tuple[Any, int]:
    """Run ``fn()`` and return ``(result, peak_extra_bytes)``: the resident-memory peak during the call above the
    resident memory at its start (what ``fn`` allocated and touched, including its outputs)."""
    if not peak_memory_available():
        raise RuntimeError("peak memory needs a writable /proc/self/clear_refs (Linux)")
    _setup_malloc()
    gc.collect()
    _libc.malloc_trim(0)
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset VmHWM to the current RSS
    base = status_kib("VmRSS")
    result = fn()
    peak = status_kib("VmHWM")
    return result, max(0, peak - base) * 1024


# --- benchmarks: ISA variants of the C++ kernels, and the machine's fp32 peak --------------------------------------


def mplus_providers(name: str = "mplus") -> list[str]:
    """``[name]``, plus ``name@<level>`` for every other ISA level that ``MPLUS_BENCH_ISAS`` asks for (``all``: every
    level this CPU runs; else a comma list; unset: none)."""
    asked = os.environ.get("MPLUS_BENCH_ISAS", "").strip().lower()
    if not asked:
        return [name]
    supported = _backend.supported_cpu_isas()
    levels = supported if asked == "all" else [lvl.strip() for lvl in asked.split(",") if lvl.strip()]
    for lvl in levels:
        if lvl not in supported:
            raise ValueError(f"MPLUS_BENCH_ISAS: level {lvl!r} is not one this CPU runs ({', '.join(supported)})")
    return [name] + [f"{name}@{lvl}" for lvl in levels if lvl != _backend.cpu_isa()]


def provider_isa(provider: str) -> str | None:
    """The ISA level a ``name@<level>`` provider runs at (None for any other provider)."""
    return provider.split("@", 1)[1] if "@" in provider else None


@functools.cache
def fp32_peak_gflops() -> float:
    """The machine's fp32 peak as measured here: the best of 5 fp32 [2048 x 2048] @ [2048 x 2048] matmuls on all
    intra-op threads (torch's BLAS reaches ~90% of the FMA units' peak on x86), in GFLOP/s. A measured, not a
    datasheet, peak: the fraction the report gives is of what this machine delivers on dense fp32 FMAs."""
    a, b = torch.randn(2048, 2048), torch.randn(2048, 2048)
    torch.mm(a, b)
    best = float("inf")
    for _ in range(5):
        t0 = time.perf_counter()
        torch.mm(a, b)
        best = min(best, time.perf_counter() - t0)
    return 2 * 2048**3 / best / 1e9
