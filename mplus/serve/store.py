"""The state store: memory states by id in a directory, as a snapshot plus a write-ahead log of injects.

A memory state at mplus-8b shapes is up to ~70 GB (docs/serving.md); writing it whole after every inject would
cost seconds to minutes. An inject is instead committed by one small durable record — its token ids and the id the
client gave the request — and the state is snapshotted now and then (on eviction, every ``snapshot_every`` records).
An inject is a deterministic function of the state before it (the state carries its own drop generator), so the
snapshot plus the records after it *is* the state: any replica can rebuild it, bit for bit, by replaying them.

Layout of ``<root>/<memory id>/``:

- ``snapshot-<v>.safetensors`` (``MemoryState.save``) and ``snapshot-<v>.json`` (the version and the request ids
  seen up to it): the state after ``v`` committed injects; ``v = 0`` at :meth:`MemoryStore.create`;
- ``log/<v>.json``: the inject that made version ``v`` from ``v - 1`` (``ids``, ``request_id``, and ``check``: the
  SHA-256 of the delta memory the inject computed, which every replay must reproduce);
- ``lock``: the writers' lock (``flock``). A writer holds it exclusively from reading the head to its record's
  rename, so versions are assigned one at a time, in one order: every history is a serial one. The kernel drops an
  ``flock`` when its process dies, so a killed replica never leaves a stale lock. Readers take it shared.

Every file is written to a temporary name, flushed to disk (``fsync``) and renamed (then the directory is flushed):
a crash leaves either the old set of files or the new one, never half a record or half a snapshot. A snapshot is
valid once its ``.safetensors`` exists (its ``.json`` is renamed first). Compaction removes records and snapshots
older than the newest snapshot, under the exclusive lock.

This module needs no Ray: :class:`mplus.serve.server.MemoryServer` and the Ray Serve deployment build on it, and
the tests exercise it directly. ``flock`` holds across processes of one machine, and across machines on a
filesystem whose locks do (NFSv4, Lustre, CephFS); the store is a directory on such a filesystem.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import re
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from ..memory.state import MemoryState

__all__ = ["InjectRecord", "MemoryBusyError", "MemoryNotFoundError", "MemoryStore", "Snapshot", "check_memory_id"]

ID_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
VERSION_DIGITS = 12
RECENT_REQUESTS = 4096  # request ids a snapshot remembers, so a retried inject is recognised after compaction


class MemoryNotFoundError(LookupError):
    """No state of that id in the store (HTTP 404)."""


class MemoryBusyError(TimeoutError):
    """The state's lock was not acquired in time: another writer holds it (HTTP 409)."""


def check_memory_id(memory_id: object, what: str = "memory id") -> str:
    """A memory id names a directory: 1–128 characters of ``[A-Za-z0-9._-]``, starting with a letter or digit."""
    if not isinstance(memory_id, str) or not ID_RE.fullmatch(memory_id):
        raise ValueError(
            f"{what} must be 1-128 characters of letters, digits, '.', '_' and '-', starting with a letter or a "
            f"digit, got {memory_id!r}"
        )
    return memory_id


@dataclass(frozen=True)
class InjectRecord:
    """One committed inject: the token ids that made ``version`` from ``version - 1``."""

    version: int
    ids: list[int]
    request_id: str | None = None
    check: str | None = None  # the SHA-256 of the inject's delta memory, which a replay must reproduce

    def to_json(self) -> str:
        return json.dumps(
            {"version": self.version, "ids": self.ids, "request_id": self.request_id, "check": self.check}
        )

    @classmethod
    def from_json(cls, text: str, where: str) -> InjectRecord:
        try:
            d = json.loads(text)
            record = cls(int(d["version"]), [int(t) for t in d["ids"]], d.get("request_id"), d.get("check"))
        except (ValueError, KeyError, TypeError) as exc:
            raise ValueError(f"MemoryStore: {where} is not an inject record ({type(exc).__name__}: {exc})") from None
        return record


@dataclass
class Snapshot:
    """What :meth:`MemoryStore.read` returns: a state at ``version`` (``None`` when the caller's own copy is recent
    enough) and the records after it, in order."""

    state: MemoryState | None
    version: int
    records: list[InjectRecord] = field(default_factory=list)

    @property
    def head(self) -> int:
        return self.records[-1].version if self.records else self.version


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_durably(path: Path, text: str) -> None:
    tmp = path.with_name(f".tmp-{os.getpid()}-{path.name}")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


class MemoryStore:
    """Memory states by id under ``root`` (created if missing). ``lock_timeout_s``: how long a writer or reader waits
    for a state's lock before :class:`MemoryBusyError`."""

    def __init__(self, root: str | os.PathLike, *, lock_timeout_s: float = 30.0) -> None:
        if not isinstance(root, (str, os.PathLike)):
            raise TypeError(f"MemoryStore: root must be a directory path, got {type(root).__name__}")
        self.root = Path(root)
        if self.root.exists() and not self.root.is_dir():
            raise ValueError(f"MemoryStore: root {self.root} exists and is not a directory")
        self.root.mkdir(parents=True, exist_ok=True)
        self.lock_timeout_s = float(lock_timeout_s)

    # ------------------------------------------------------------------------------------------------ naming
    def folder(self, memory_id: str) -> Path:
        return self.root / check_memory_id(memory_id)

    def exists(self, memory_id: str) -> bool:
        return bool(self._snapshots(self.folder(memory_id)))

    def ids(self) -> list[str]:
        """The ids of the states in the store, sorted."""
        return sorted(p.name for p in self.root.iterdir() if ID_RE.fullmatch(p.name) and self._snapshots(p))

    def _require(self, memory_id: str) -> Path:
        folder = self.folder(memory_id)
        if not self._snapshots(folder):
            raise MemoryNotFoundError(
                f"memory id {memory_id!r} is not in the store {self.root} (create it first: nothing is created "
                "unless asked)"
            )
        return folder

    @staticmethod
    def _snapshots(folder: Path) -> list[int]:
        if not folder.is_dir():
            return []
        return sorted(int(p.stem.split("-")[1]) for p in folder.glob("snapshot-*.safetensors"))

    @staticmethod
    def _record_versions(folder: Path) -> list[int]:
        log = folder / "log"
        return sorted(int(p.stem) for p in log.glob("*.json") if p.stem.isdigit()) if log.is_dir() else []

    @staticmethod
    def _name(v: int) -> str:
        return f"{v:0{VERSION_DIGITS}d}"

    # ------------------------------------------------------------------------------------------------ locking
    @contextlib.contextmanager
    def _locked(self, folder: Path, exclusive: bool, timeout_s: float | None = None) -> Iterator[None]:
        timeout_s = self.lock_timeout_s if timeout_s is None else timeout_s
        folder.mkdir(parents=True, exist_ok=True)
        fd = os.open(folder / "lock", os.O_RDWR | os.O_CREAT, 0o644)
        try:
            deadline = time.monotonic() + timeout_s
            while True:
                try:
                    fcntl.flock(fd, (fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH) | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    if time.monotonic() >= deadline:
                        raise MemoryBusyError(
                            f"memory id {folder.name!r} is being written elsewhere: its lock in {folder} was not "
                            f"acquired within {timeout_s:g} s"
                        ) from None
                    time.sleep(0.005)
            yield
        finally:
            os.close(fd)  # closing the descriptor drops the flock

    # ------------------------------------------------------------------------------------------------ reading
    def head(self, memory_id: str) -> int:
        """The newest committed version (a directory listing: no lock, no file read)."""
        return self._head(self._require(memory_id))

    @staticmethod
    def _head(folder: Path) -> int:
        return max(MemoryStore._snapshots(folder)[-1], *MemoryStore._record_versions(folder), 0)

    def read(self, memory_id: str, *, since: int | None = None) -> Snapshot:
        """The state: the newest snapshot and the records after it; with ``since`` (the version of a copy the caller
        holds), only the records after ``since`` and no state, when the log still has them all."""
        folder = self._require(memory_id)
        with self._locked(folder, exclusive=False):
            return self._read_locked(folder, since)

    def _read_locked(self, folder: Path, since: int | None) -> Snapshot:
        snaps, versions = self._snapshots(folder), self._record_versions(folder)
        base = snaps[-1]
        if since is not None and since >= base:
            # every record after `since` is still in the log (compaction keeps those after the newest snapshot)
            return Snapshot(None, since, self._records(folder, [v for v in versions if v > since], since))
        state = MemoryState.load(str(folder / f"snapshot-{self._name(base)}.safetensors"))
        return Snapshot(state, base, self._records(folder, [v for v in versions if v > base], base))

    def _records(self, folder: Path, versions: list[int], after: int) -> list[InjectRecord]:
        if versions and versions != list(range(after + 1, after + 1 + len(versions))):
            raise ValueError(f"MemoryStore: the log of {folder.name!r} has a gap after version {after}: {versions}")
        out = []
        for v in versions:
            path = folder / "log" / f"{self._name(v)}.json"
            record = InjectRecord.from_json(path.read_text(), str(path))
            if record.version != v:
                raise ValueError(f"MemoryStore: {path} holds version {record.version}")
            out.append(record)
        return out

    def request_ids(self, memory_id: str) -> set[str]:
        """The request ids of the injects this state remembers (the log's and the newest snapshot's)."""
        folder = self._require(memory_id)
        with self._locked(folder, exclusive=False):
            return set(self._request_ids(folder))

    def _request_ids(self, folder: Path, upto: int | None = None) -> list[str]:
        """The request ids the newest snapshot remembers, then those of the records after it (up to version
        ``upto``), in commit order."""
        base = self._snapshots(folder)[-1]
        meta = json.loads((folder / f"snapshot-{self._name(base)}.json").read_text())
        versions = [v for v in self._record_versions(folder) if v > base and (upto is None or v <= upto)]
        records = self._records(folder, versions, base)
        return list(meta.get("request_ids", [])) + [r.request_id for r in records if r.request_id is not None]

    # ------------------------------------------------------------------------------------------------ writing
    def create(self, memory_id: str, state: MemoryState, *, exist_ok: bool = False) -> bool:
        """Store ``state`` as version 0 of ``memory_id``; returns whether it was created. An existing id is an error
        unless ``exist_ok`` (then nothing changes). The state should carry its own drop generator
        (``model.new_memory(seed=...)``): replay draws from it."""
        if not isinstance(state, MemoryState):
            raise TypeError(f"MemoryStore.create: state must be a MemoryState, got {type(state).__name__}")
        if state.generator is None:
            raise ValueError(
                "MemoryStore.create: the state draws its drops from torch's global generator, which no replica can "
                "replay: give it its own (model.new_memory(seed=...))"
            )
        folder = self.folder(memory_id)
        with self._locked(folder, exclusive=True):
            if self._snapshots(folder):
                if exist_ok:
                    return False
                raise FileExistsError(f"MemoryStore.create: memory id {memory_id!r} already exists in {self.root}")
            self._write_snapshot(folder, state, 0, [])
        return True

    @contextlib.contextmanager
    def writer(self, memory_id: str, *, timeout_s: float | None = None) -> Iterator[Writer]:
        """The exclusive writer of ``memory_id`` for the block (:class:`MemoryBusyError` after ``timeout_s``)."""
        folder = self._require(memory_id)
        with self._locked(folder, exclusive=True, timeout_s=timeout_s):
            yield Writer(self, folder)

    def snapshot(self, memory_id: str, state: MemoryState, version: int) -> bool:
        """Store ``state`` (the state at ``version``) as a snapshot and compact the log; returns whether a file was
        written. Idempotent: a no-op when a snapshot at ``version`` or newer exists."""
        with self.writer(memory_id) as w:
            return w.snapshot(state, version)

    def _write_snapshot(self, folder: Path, state: MemoryState, version: int, seen: list[str]) -> None:
        """``seen``: the request ids up to ``version`` in commit order; the snapshot keeps the most recent."""
        name = f"snapshot-{self._name(version)}"
        meta = {"version": version, "request_ids": seen[-RECENT_REQUESTS:]}
        _write_durably(folder / f"{name}.json", json.dumps(meta))
        tmp = folder / f".tmp-{os.getpid()}-{name}.safetensors"
        state.save(str(tmp))
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, folder / f"{name}.safetensors")
        _fsync_dir(folder)


class Writer:
    """The holder of a state's exclusive lock (:meth:`MemoryStore.writer`)."""

    def __init__(self, store: MemoryStore, folder: Path) -> None:
        self.store, self.folder = store, folder
        for tmp in folder.glob(".tmp-*"):  # a writer that died mid-write left it; nobody else writes now
            tmp.unlink(missing_ok=True)
        for tmp in (folder / "log").glob(".tmp-*"):
            tmp.unlink(missing_ok=True)

    @property
    def head(self) -> int:
        return MemoryStore._head(self.folder)

    @property
    def newest_snapshot(self) -> int:
        return MemoryStore._snapshots(self.folder)[-1]

    def read(self, since: int | None = None) -> Snapshot:
        return self.store._read_locked(self.folder, since)

    def request_ids(self) -> set[str]:
        return set(self.store._request_ids(self.folder))

    def append(self, ids: list[int], request_id: str | None = None, check: str | None = None) -> InjectRecord:
        """Commit one inject as version ``head + 1``: durable when this returns."""
        record = InjectRecord(self.head + 1, [int(t) for t in ids], request_id, check)
        log = self.folder / "log"
        log.mkdir(exist_ok=True)
        _write_durably(log / f"{MemoryStore._name(record.version)}.json", record.to_json())
        return record

    def snapshot(self, state: MemoryState, version: int) -> bool:
        snaps = MemoryStore._snapshots(self.folder)
        if snaps[-1] >= version:
            return False
        if version > self.head:
            raise ValueError(f"MemoryStore.snapshot: version {version} is past the head {self.head}")
        self.store._write_snapshot(self.folder, state, version, self.store._request_ids(self.folder, upto=version))
        for v in MemoryStore._record_versions(self.folder):  # compaction: the snapshot holds them now
            if v <= version:
                (self.folder / "log" / f"{MemoryStore._name(v)}.json").unlink()
        for v in snaps:
            for suffix in (".safetensors", ".json"):
                (self.folder / f"snapshot-{MemoryStore._name(v)}{suffix}").unlink(missing_ok=True)
        return True
