"""Asynchronous gather and transfer of long-term rows, overlapped with compute (DESIGN.md §2.4, SPEC.md §9 P3/P16).

Per layer, M+ needs K0 long-term rows that live on the CPU. The engine runs their retrieval and gather on a worker
thread (the C++ gather releases the GIL and uses every core it is given) while the caller attends to the short-term
memory and the chunk; the two partial attentions are merged through their LSE (``merge_attention_states``).

* CPU: ``submit`` runs the job on one worker thread; ``wait`` returns its result.
* CUDA: the job gathers into a pinned staging buffer on the worker thread, then the host→device copy is queued on a
  side stream with an event; ``wait`` makes the caller's current stream wait for that event (no host sync).
  (No machine of this project has a GPU: the CUDA branch is written to the stream/event contract but not run here.)

``timeline`` records (name, thread, start, end) of every job and of caller spans marked with ``span(name)``, so
overlap can be seen and tested.
"""

from __future__ import annotations

import contextlib
import dataclasses
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import torch


@dataclasses.dataclass(frozen=True)
class Span:
    name: str
    thread: str
    start: float
    end: float

    def overlaps(self, other: Span) -> bool:
        return self.start < other.end and other.start < self.end


class Handle:
    """A submitted transfer: ``wait()`` returns the job's result (on CUDA: moved to the device, stream-ordered)."""

    def __init__(self, future: Future, engine: TransferEngine) -> None:
        self._future = future
        self._engine = engine

    def done(self) -> bool:
        return self._future.done()

    def wait(self) -> Any:
        result, event = self._future.result()
        if event is not None:  # CUDA: order the caller's stream after the side-stream copy
            torch.cuda.current_stream(self._engine.device).wait_event(event)
        return result


class TransferEngine:
    """Runs gathers (and device copies) of long-term rows in the background.

    Args:
        device: where results are needed. ``cpu``: results stay on the host. ``cuda``: every tensor in a job's result
            is copied to the device on a side stream (from pinned memory when the job used :meth:`staging`).
        record_timeline: keep a :class:`Span` per job and per caller ``span``.
    """

    def __init__(self, device: torch.device | str = "cpu", *, record_timeline: bool = False) -> None:
        self.device = torch.device(device)
        if self.device.type not in ("cpu", "cuda"):
            raise ValueError(f"TransferEngine: device {self.device} is not supported (cpu or cuda)")
        if self.device.type == "cuda" and not torch.cuda.is_available():
            raise RuntimeError("TransferEngine: a cuda device was requested but CUDA is not available")
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="mplus-transfer")
        self._side_stream = torch.cuda.Stream(self.device) if self.device.type == "cuda" else None
        self._staging: dict[tuple, torch.Tensor] = {}
        self._lock = threading.Lock()
        self.record_timeline = record_timeline
        self.timeline: list[Span] = []

    # ----------------------------------------------------------------------------------------------- buffers
    def staging(self, key: str, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        """A reusable host buffer (pinned when the engine targets CUDA), one per ``(key, shape, dtype)``.

        Reuse is safe for one job in flight per key: ``wait()`` the previous job that used the key first."""
        k = (key, tuple(shape), dtype)
        with self._lock:
            buf = self._staging.get(k)
            if buf is None:
                buf = torch.empty(shape, dtype=dtype, pin_memory=self.device.type == "cuda")
                self._staging[k] = buf
        return buf

    # ---------------------------------------------------------------------------------------------- timeline
    def _record(self, name: str, start: float, end: float) -> None:
        if self.record_timeline:
            with self._lock:
                self.timeline.append(Span(name, threading.current_thread().name, start, end))

    @contextlib.contextmanager
    def span(self, name: str) -> Iterator[None]:
        """Mark a stretch of the caller's own work in the timeline."""
        start = time.perf_counter()
        try:
            yield
        finally:
            self._record(name, start, time.perf_counter())

    # ------------------------------------------------------------------------------------------------- jobs
    def _to_device(self, result: Any) -> Any:
        if isinstance(result, torch.Tensor):
            return result.to(self.device, non_blocking=True)
        if dataclasses.is_dataclass(result) and not isinstance(result, type):
            return dataclasses.replace(
                result, **{f.name: self._to_device(getattr(result, f.name)) for f in dataclasses.fields(result)}
            )
        if isinstance(result, (list, tuple)):
            return type(result)(self._to_device(x) for x in result)
        if isinstance(result, dict):
            return {k: self._to_device(v) for k, v in result.items()}
        return result

    def _run(self, name: str, fn: Callable[[], Any]) -> tuple[Any, Any]:
        start = time.perf_counter()
        result = fn()
        event = None
        if self._side_stream is not None:
            with torch.cuda.stream(self._side_stream):
                result = self._to_device(result)
                event = torch.cuda.Event()
                event.record(self._side_stream)
        self._record(name, start, time.perf_counter())
        return result, event

    def submit(self, name: str, fn: Callable[[], Any]) -> Handle:
        """Run ``fn`` on the worker thread (then, on CUDA, copy its tensors to the device asynchronously)."""
        return Handle(self._pool.submit(self._run, name, fn), self)

    def close(self) -> None:
        self._pool.shutdown(wait=True)

    def __enter__(self) -> TransferEngine:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
