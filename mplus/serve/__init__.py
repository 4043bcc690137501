"""Serving M+ beyond one process: memory states by id in a store, served by Ray Serve replicas (docs/serving.md).

- :mod:`mplus.serve.store` — :class:`MemoryStore`: states by id as a snapshot plus a write-ahead log of injects,
  with a per-id lock; no Ray needed.
- :mod:`mplus.serve.server` — :class:`MemoryServer`: one replica's logic (bring a state in, inject as a transaction
  on the store, generate batched), no Ray needed.
- :mod:`mplus.serve.app` — :func:`deployment`: the Ray Serve application (``pip install -e .[serve]``).
"""

from __future__ import annotations

from typing import Any

from .server import GenerateOptions, MemoryServer, ReplayMismatchError, Resident
from .store import InjectRecord, MemoryBusyError, MemoryNotFoundError, MemoryStore, check_memory_id

__all__ = [
    "GenerateOptions",
    "InjectRecord",
    "MemoryBusyError",
    "MemoryNotFoundError",
    "MemoryServer",
    "MemoryStore",
    "ReplayMismatchError",
    "Resident",
    "check_memory_id",
    "deployment",
]


def __getattr__(name: str) -> Any:
    # the Ray Serve application imports ray, an optional extra: loaded when asked for, so that the store and the
    # server work without it
    if name == "deployment":
        from .app import deployment

        return deployment
    raise AttributeError(f"module 'mplus.serve' has no attribute {name!r}")
