"""Asynchronous gather and transfer of long-term rows, overlapped with compute (DESIGN.md §2.4, SPEC.md §9 P3/P16).

Per layer, M+ needs K0 long-term rows that live on the CPU. The engine runs their retrieval and gather on a worker
thread (the C++ gather releases the GIL and uses every core it is given) while the caller attends to the short-term
memory and the chunk; the two partial attentions are merged through their LSE (``merge_attention_states``).

* CPU: ``submit`` runs the job on one worker thread; ``wait`` returns its result.
* CUDA: the job is *queued* at once on a side stream (after the caller's stream, whose tensors it reads): retrieval
  and the zero-copy gather of pinned host rows are device kernels, so no host thread is needed; any host tensor in
  the result is copied to the device on that stream. ``wait`` makes the caller's stream wait for the side stream's
  event (no host sync) and marks the result's tensors as used by the caller's stream (caching-allocator safety).
  (No machine of this project has a GPU: the CUDA branch is written to the stream/event contract but not run here.)
* meta (the stand-in for a GPU): the job runs inline; nothing moves.

With ``record_timeline=True``, ``timeline`` records a :class:`Span` (name, thread, start, end on
``time.perf_counter``) per job, so its overlap with the caller's own work (timed on the same clock) can be seen and
tested.
"""

from __future__ import annotations

import dataclasses
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import torch


@dataclasses.dataclass(frozen=True)
class Span:
    """One timed job: its name, the thread that ran it, start and end on ``time.perf_counter``."""

    name: str
    thread: str
    start: float
    end: float


def _walk(result: Any, visit: Callable[[torch.Tensor], Any]) -> Any:
    """Rebuild ``result`` (tensors, dataclasses, lists, tuples, dicts) with ``visit`` applied to every tensor."""
    if isinstance(result, torch.Tensor):
        out = visit(result)
        return result if out is None else out
    if dataclasses.is_dataclass(result) and not isinstance(result, type):
        return dataclasses.replace(
            result, **{f.name: _walk(getattr(result, f.name), visit) for f in dataclasses.fields(result)}
        )
    if isinstance(result, (list, tuple)):
        return type(result)(_walk(x, visit) for x in result)
    if isinstance(result, dict):
        return {k: _walk(v, visit) for k, v in result.items()}
    return result


class Handle:
    """A submitted transfer: ``wait()`` returns the job's result (on CUDA: moved to the device, stream-ordered)."""

    def __init__(self, future: Future, engine: TransferEngine) -> None:
        self._future = future
        self._engine = engine

    def done(self) -> bool:
        return self._future.done()

    def wait(self) -> Any:
        result, event = self._future.result()
        if event is not None:  # CUDA: order the caller's stream after the side-stream work
            stream = torch.cuda.current_stream(self._engine.device)
            stream.wait_event(event)
            _walk(result, lambda t: t.record_stream(stream) if t.is_cuda else None)
        return result


class TransferEngine:
    """Runs gathers (and device copies) of long-term rows in the background.

    Args:
        device: where results are needed. ``cpu``: results stay on the host. ``cuda``: every tensor in a job's result
            is copied to the device on a side stream (asynchronously from host tensors in pinned memory).
        record_timeline: keep a :class:`Span` per job in ``timeline``.
        threaded: on the CPU, run jobs on the worker thread (False: inline, e.g. for Triton kernels under the
            interpreter, which patches ``triton.language`` per launch and so cannot run kernels on two threads).
    """

    def __init__(
        self, device: torch.device | str = "cpu", *, record_timeline: bool = False, threaded: bool = True
    ) -> None:
        self.device = torch.device(device)
        if self.device.type not in ("cpu", "cuda", "meta"):
            raise ValueError(f"TransferEngine: device {self.device} is not supported (cpu, cuda or meta)")
        if self.device.type == "cuda" and not torch.cuda.is_available():
            raise RuntimeError("TransferEngine: a cuda device was requested but CUDA is not available")
        self.threaded = threaded
        threaded = threaded and self.device.type == "cpu"
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="mplus-transfer") if threaded else None
        self._closed = False
        self._side_stream = torch.cuda.Stream(self.device) if self.device.type == "cuda" else None
        self._lock = threading.Lock()
        self.record_timeline = record_timeline
        self.timeline: list[Span] = []

    # ---------------------------------------------------------------------------------------------- timeline
    def _record(self, name: str, start: float, end: float) -> None:
        if self.record_timeline:
            with self._lock:
                self.timeline.append(Span(name, threading.current_thread().name, start, end))

    # ------------------------------------------------------------------------------------------------- jobs
    def _to_device(self, result: Any) -> Any:
        return _walk(result, lambda t: t.to(self.device, non_blocking=True))

    def _run(self, name: str, fn: Callable[[], Any]) -> tuple[Any, Any]:
        start = time.perf_counter()
        event = None
        if self._side_stream is not None:
            self._side_stream.wait_stream(torch.cuda.current_stream(self.device))  # the job reads caller tensors
            with torch.cuda.stream(self._side_stream):
                result = self._to_device(fn())
                event = torch.cuda.Event()
                event.record(self._side_stream)
        else:
            result = fn()
        self._record(name, start, time.perf_counter())
        return result, event

    def submit(self, name: str, fn: Callable[[], Any]) -> Handle:
        """Run ``fn`` on the worker thread (CPU), or queue it on the side stream (CUDA) / run it inline (meta)."""
        if self._closed:
            raise RuntimeError("TransferEngine: submit after close()")
        if not callable(fn):
            raise TypeError(f"TransferEngine.submit: fn must be a callable returning the job's result, got {fn!r}")
        if self._pool is not None:
            return Handle(self._pool.submit(self._run, name, fn), self)
        future: Future = Future()
        try:
            future.set_result(self._run(name, fn))
        except BaseException as exc:  # delivered by wait(), as from the worker thread
            future.set_exception(exc)
        return Handle(future, self)

    def __getstate__(self) -> dict:  # copy.deepcopy / pickle: a new engine with the same settings, no jobs
        return {"device": self.device, "record_timeline": self.record_timeline, "threaded": self.threaded}

    def __setstate__(self, state: dict) -> None:
        self.__init__(state["device"], record_timeline=state["record_timeline"], threaded=state["threaded"])

    def close(self) -> None:
        self._closed = True
        if self._pool is not None:
            self._pool.shutdown(wait=True)

    def __enter__(self) -> TransferEngine:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
