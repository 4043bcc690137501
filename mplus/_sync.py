"""The model's memory lock: many readers (forwards, generations, saves) or one writer (inject, load) at a time.

Reentrant in both directions a caller needs: a thread that holds the lock (read or write) may take it again for
reading (``generate`` → ``forward``), and the writer may take it again for writing. A waiting writer blocks new
readers from other threads, so a stream of generations cannot starve an ``inject``.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator


class MemoryLock:
    def __init__(self) -> None:
        self._cond = threading.Condition(threading.Lock())
        self._readers: dict[int, int] = {}  # thread id -> read depth
        self._writer: int | None = None
        self._write_depth = 0
        self._writers_waiting = 0

    @contextlib.contextmanager
    def read(self) -> Iterator[None]:
        me = threading.get_ident()
        with self._cond:
            if self._writer != me and me not in self._readers:
                while self._writer is not None or self._writers_waiting:
                    self._cond.wait()
            self._readers[me] = self._readers.get(me, 0) + 1
        try:
            yield
        finally:
            with self._cond:
                self._readers[me] -= 1
                if not self._readers[me]:
                    del self._readers[me]
                    self._cond.notify_all()

    @contextlib.contextmanager
    def write(self) -> Iterator[None]:
        me = threading.get_ident()
        with self._cond:
            if self._writer != me:
                if me in self._readers:
                    raise RuntimeError(
                        "mplus: the memory cannot be changed from inside a read of it (e.g. inject from a "
                        "generate callback or streamer): change it after the call returns"
                    )
                self._writers_waiting += 1
                try:
                    while self._writer is not None or self._readers:
                        self._cond.wait()
                finally:
                    self._writers_waiting -= 1
                self._writer = me
            self._write_depth += 1
        try:
            yield
        finally:
            with self._cond:
                self._write_depth -= 1
                if not self._write_depth:
                    self._writer = None
                    self._cond.notify_all()

    def held_for_writing(self) -> bool:
        """Whether the calling thread holds the write lock."""
        with self._cond:
            return self._writer == threading.get_ident()

    def __getstate__(self) -> dict:  # copy.deepcopy / pickle: a copy gets its own, free lock
        return {}

    def __setstate__(self, state: dict) -> None:
        self.__init__()
