"""The transfer engine: results are correct, and the background gather really overlaps the caller's compute."""

from __future__ import annotations

import threading
import time

import pytest
import torch

import mplus_kernels as mk
from mplus.memory.transfer import Span, TransferEngine


def test_results_and_errors_come_back():
    src = torch.randn(1000, 64)
    index = torch.randint(0, 1000, (128,))
    with TransferEngine() as engine:
        out = torch.empty(128, 64)
        handle = engine.submit("gather", lambda: mk.gather_rows_(out, src, src[:0], index))
        assert torch.equal(handle.wait(), src[index])
        failing = engine.submit("bad", lambda: mk.gather_rows_(out, src, src[:0], index + 1000))
        with pytest.raises(ValueError, match="outside"):
            failing.wait()


def test_gather_overlaps_caller_compute():
    """While the caller multiplies matrices, the worker gathers 2,560 rows × 4,096 (bf16) from a 50k-row store."""
    torch.manual_seed(0)
    store = torch.randn(50_000, 4096).to(torch.bfloat16)
    index = torch.randperm(50_000)[:2560]
    a = torch.randn(512, 512)  # one matmul takes a few ms: many fit inside the gather job
    # The engine times its jobs (its timeline); the caller times its own matmuls on the same clock (perf_counter),
    # as the engine's span() did before it was dropped (the package never used it): the same spans, the same checks.
    caller: list[Span] = []
    with TransferEngine(record_timeline=True) as engine:
        out = torch.empty(2560, 4096, dtype=torch.bfloat16)

        def job():
            for _ in range(40):  # 40 gathers of 20 MiB: long enough to span many caller matmuls
                mk.gather_rows_(out, store, store[:0], index)
            return out

        handle = engine.submit("ltm-gather", job)
        deadline = time.perf_counter() + 30
        while not handle.done() and time.perf_counter() < deadline:
            start = time.perf_counter()
            a = torch.tanh(a @ a) * 0.5
            caller.append(Span("caller-matmul", threading.current_thread().name, start, time.perf_counter()))
        result = handle.wait()
    assert torch.equal(result, store[index])
    gather = next(s for s in engine.timeline if s.name == "ltm-gather")
    assert all(s.thread != gather.thread for s in caller)
    # the caller finished whole matmuls while the gather job was running: their spans lie inside the gather's
    inside = [s for s in caller if gather.start <= s.start and s.end <= gather.end]
    assert len(inside) >= 3, (gather, caller)


def test_cuda_engine_refuses_without_cuda():
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    with pytest.raises(RuntimeError, match="CUDA is not available"):
        TransferEngine("cuda")
    with pytest.raises(ValueError, match="not supported"):
        TransferEngine("mps")


def test_meta_engine_runs_inline_and_refuses_after_close():
    """On the meta stand-in for a GPU, jobs run inline on the caller's thread (device kernels need no worker);
    their errors arrive through wait(), as from the worker thread; a closed engine refuses new work."""
    engine = TransferEngine("meta", record_timeline=True)
    x = torch.empty(4, 8, device="meta")
    out = engine.submit("job", lambda: x @ x.T).wait()
    assert out.device.type == "meta" and out.shape == (4, 4)
    assert engine.timeline[0].thread == threading.current_thread().name
    failing = engine.submit("bad", lambda: 1 / 0)
    with pytest.raises(ZeroDivisionError):
        failing.wait()
    engine.close()
    with pytest.raises(RuntimeError, match="after close"):
        engine.submit("late", lambda: x)
    cpu = TransferEngine("cpu")
    cpu.close()
    with pytest.raises(RuntimeError, match="after close"):
        cpu.submit("late", lambda: x)
