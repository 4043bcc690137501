"""Timing, peak memory, budgets and guarded recording for the GPU benchmarks (one :class:`Recorder` per family)."""

from __future__ import annotations

import json
import math
import statistics
import time
import traceback
from collections.abc import Callable
from typing import Any

import torch

L2_FLUSH_BYTES = 256 << 20  # larger than any current L2 (H100/H200: 50 MiB)


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


class Recorder:
    """Runs the cases of one family within a time budget and appends one JSON line per result to ``path``.

    ``measure`` never raises: a failing case is recorded with its error. Once the CUDA context is lost (an error
    that a ``torch.cuda.synchronize()`` reproduces, e.g. an illegal address), later cases are recorded as skipped.
    """

    def __init__(self, family: str, path: str | None, budget_s: float, *, quick: bool = False) -> None:
        self.family = family
        self.path = path
        self.quick = quick
        self.deadline = time.monotonic() + budget_s
        self.records: list[dict[str, Any]] = []
        self.context_lost: str | None = None
        self._flush = torch.empty(L2_FLUSH_BYTES, dtype=torch.int8, device="cuda")

    # ------------------------------------------------------------------------------------------------ budget
    def remaining(self) -> float:
        return self.deadline - time.monotonic()

    def write(self, record: dict[str, Any]) -> dict[str, Any]:
        record = {"family": self.family, **record}
        self.records.append(record)
        line = json.dumps(record, default=str)
        print(line, flush=True)
        if self.path:
            with open(self.path, "a") as f:
                f.write(line + "\n")
        return record

    def note(self, group: str, **info: Any) -> None:
        """A record that is not a timing (e.g. why a peer is absent)."""
        self.write({"group": group, "provider": "-", "note": True, **info})

    # ------------------------------------------------------------------------------------------------ timing
    def _time_events(self, fn: Callable[[], Any], reps: int, flush: bool) -> list[float]:
        starts = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
        ends = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
        for i in range(reps):
            if flush:
                self._flush.zero_()
            starts[i].record()
            fn()
            ends[i].record()
        torch.cuda.synchronize()
        return [s.elapsed_time(e) for s, e in zip(starts, ends)]

    def _time_wall(self, fn: Callable[[], Any], reps: int, flush: bool) -> list[float]:
        times = []
        for _ in range(reps):
            if flush:
                self._flush.zero_()
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            fn()
            torch.cuda.synchronize()
            times.append((time.perf_counter() - t0) * 1e3)
        return times

    def time_ms(
        self, fn: Callable[[], Any], *, timer: str = "events", target_s: float = 0.5, flush: bool = True
    ) -> dict[str, Any]:
        """Median of N timed calls (ms) after a warm-up; N so that the timed part takes about ``target_s``."""
        if self.quick:
            target_s = min(target_s, 0.15)
        timed = self._time_wall if timer == "wall" else self._time_events
        estimate = statistics.median(timed(fn, 2, flush))  # also the warm-up
        reps = int(min(200, max(5, target_s * 1e3 / max(estimate, 1e-3))))
        if estimate > 200:  # a slow peer: a few calls are enough
            reps = 3
        times = timed(fn, reps, flush)
        times.sort()
        return {
            "median_ms": statistics.median(times),
            "min_ms": times[0],
            "p20_ms": times[int(0.2 * (len(times) - 1))],
            "p80_ms": times[int(0.8 * (len(times) - 1))],
            "reps": reps,
            "timer": timer,
        }

    @staticmethod
    def peak_extra_bytes(fn: Callable[[], Any]) -> tuple[Any, int]:
        """``(fn(), bytes allocated at the peak of the call above what was allocated at its start)``."""
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        out = fn()
        torch.cuda.synchronize()
        return out, torch.cuda.max_memory_allocated() - base

    # ------------------------------------------------------------------------------------------------ one case
    def measure(
        self,
        group: str,
        provider: str,
        make: Callable[[], Callable[[], Any]],
        *,
        shape: str,
        dtype: torch.dtype | str,
        moved_bytes: int | None = None,
        flops: int | None = None,
        check: Callable[[Any], dict[str, Any]] | None = None,
        timer: str = "events",
        min_budget_s: float = 2.0,
        flush: bool = True,
        **extra: Any,
    ) -> Any:
        """Build the callable (``make()``: compilation, input preparation; timed as ``setup_s``), run it once for
        peak memory and ``check(out)`` (extra fields, e.g. the difference from mplus), then time it.

        Returns the output of the checked call, or None when the case failed or was skipped."""
        record: dict[str, Any] = {
            "group": group,
            "provider": provider,
            "shape": shape,
            "dtype": dtype if isinstance(dtype, str) else dtype_name(dtype),
            **extra,
        }
        if self.context_lost:
            self.write({**record, "skipped": f"CUDA context lost earlier ({self.context_lost})"})
            return None
        if self.remaining() < min_budget_s:
            self.write({**record, "skipped": f"time budget of the family spent ({self.remaining():.1f} s left)"})
            return None
        out = None
        try:
            t0 = time.perf_counter()
            fn = make()
            out, record["peak_extra_bytes"] = self.peak_extra_bytes(fn)
            record["setup_s"] = round(time.perf_counter() - t0, 3)  # make() + the first (compiling) call
            if check is not None:
                record.update(check(out))
            record.update(self.time_ms(fn, timer=timer, flush=flush))
            seconds = record["median_ms"] / 1e3
            if moved_bytes is not None:
                record["moved_bytes"] = moved_bytes
                record["gbps"] = moved_bytes / seconds / 1e9
            if flops is not None:
                record["flops"] = flops
                record["tflops"] = flops / seconds / 1e12
        except Exception as exc:  # recorded; the next case runs
            record["error"] = f"{type(exc).__name__}: {str(exc).strip()[:2000]}"
            record["traceback"] = traceback.format_exc(limit=6)[-4000:]
            out = None
            self._check_context(f"{group} {provider}")
        self.write(record)
        return out

    def _check_context(self, where: str) -> None:
        try:
            torch.cuda.synchronize()
            torch.cuda.empty_cache()
        except Exception as exc:  # an asynchronous error poisons the context: nothing after it can be trusted
            self.context_lost = f"after {where}: {type(exc).__name__}: {str(exc).strip()[:300]}"


def max_abs_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    if a.shape != b.shape:
        raise ValueError(f"shapes differ: {list(a.shape)} vs {list(b.shape)}")
    d = (a.float() - b.float()).abs().max()
    value = float(d)
    return value if math.isfinite(value) else float("nan")
