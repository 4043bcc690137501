"""What one serving replica does, without Ray: a model, the states it holds, and the store they come from.

:class:`MemoryServer` is the whole serving logic — bring a state in by id, inject, generate, let a state go — with
the store (:mod:`mplus.serve.store`) as the single source of truth. The Ray Serve deployment
(:mod:`mplus.serve.app`) only routes requests to it; the tests drive it directly too.

**One writer per memory id.** Ray Serve routes a memory id to a replica that holds it on a best-effort basis: under
load, two replicas can hold the same id. An inject is therefore a transaction on the store, not on a replica's copy:

1. take the id's exclusive lock in the store (``flock``: one holder across every process and replica);
2. bring the replica's copy up to the store's head by replaying the records it has not applied (another replica's
   injects), so the inject runs on exactly the committed state;
3. apply the inject to the copy, then append its record to the log (durable when the call returns: committed);
4. release the lock.

Versions are thus assigned one at a time under one lock: the history of a state is the serial order of its log,
whatever replicas served it. A generate first catches its copy up to the head it reads from the store (a directory
listing), so it sees every inject committed before it arrived. When an inject fails halfway (a bad chunk of a long
document, a full disk while appending), the copy is dropped and rebuilt from the store on the next request: a copy
never holds what the store does not.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from .._sync import MemoryLock
from ..memory import serialization
from ..memory.state import MemoryState
from ..model import MPlusForCausalLM
from .store import MemoryStore, Writer, check_memory_id

__all__ = ["GenerateOptions", "MemoryServer", "ReplayMismatchError", "Resident"]

log = logging.getLogger("mplus.serve")

SAMPLING_KEYS = ("do_sample", "temperature", "top_p", "top_k")


class ReplayMismatchError(RuntimeError):
    """A replayed inject computed another delta than the one its record was committed with: the copy is dropped."""


@dataclass(frozen=True)
class GenerateOptions:
    """The options of one generate request that decide whether it can share a batch with another: requests of one
    memory and equal options run as one ``generate`` call (each row cut at its own ``max_new_tokens``)."""

    do_sample: bool = False
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 50

    @classmethod
    def parse(cls, request: dict) -> GenerateOptions:
        opts = {k: request[k] for k in SAMPLING_KEYS if k in request}
        try:
            out = cls(**opts)
        except TypeError as exc:
            raise ValueError(f"generate: {exc}") from None
        if not isinstance(out.do_sample, bool):
            raise ValueError(f"generate: do_sample must be true or false, got {out.do_sample!r}")
        return out


class Resident:
    """A state a replica holds: its copy, the store version the copy is at, and the replica-local lock that keeps a
    generate from reading the copy while an inject or a catch-up changes it. ``close`` (Ray Serve's LRU calls it as
    ``__del__``) snapshots the copy when the store's newest snapshot is older, once."""

    def __init__(self, server: MemoryServer, memory_id: str, state: MemoryState, version: int) -> None:
        self.server, self.memory_id, self.state, self.version = server, memory_id, state, version
        self.lock = MemoryLock()
        self.closed = False
        self._close_once = threading.Lock()
        # Ray Serve's multiplexer calls `model.__del__()` on LRU eviction when the object has one. An attribute of
        # the instance, not a method of the class: the garbage collector never calls it, so a dropped Resident writes
        # nothing, and the eviction snapshots once (`close` is idempotent if Ray calls it again).
        self.__del__ = self.close

    def close(self) -> bool:
        """Let the state go (after a snapshot of it, when useful); returns whether a snapshot was written.
        Idempotent, and never raises: the log already holds every committed inject, so a snapshot is an
        optimisation (a faster load, a shorter log), not what makes an inject durable."""
        with self._close_once:
            if self.closed:
                return False
            self.closed = True
            try:
                # the store's lock first, then the copy's: the order an inject takes them in
                with self.server.store.writer(self.memory_id) as writer, self.lock.read():
                    return self.state is not None and writer.snapshot(self.state, self.version)
            except Exception as exc:  # logged: eviction must not fail a request, and nothing is lost
                log.warning("mplus.serve: no snapshot of %r at eviction (%s: %s)", self.memory_id,
                            type(exc).__name__, exc)  # fmt: skip
                return False
            finally:
                with self.lock.write():  # a request that got this Resident before the eviction reads it again
                    self.state = None


def _bytes(t: torch.Tensor) -> memoryview:
    """A tensor's bytes as they are in memory, on the host (what the checks and digests hash)."""
    return t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().data


def default_seed(memory_id: str) -> int:
    """The drop generator's seed of a state created without one: stable per id, different across ids."""
    return int.from_bytes(hashlib.sha256(memory_id.encode()).digest()[:8], "little") >> 1


class MemoryServer:
    """A model serving memory states from ``store``. ``tokenizer``: for text requests (``None``: token ids only).
    ``snapshot_every``: an inject whose version is that many past the newest snapshot also writes one."""

    def __init__(
        self, model: MPlusForCausalLM, store: MemoryStore, tokenizer: Any = None, *, snapshot_every: int = 64
    ) -> None:
        if not isinstance(model, MPlusForCausalLM):
            raise TypeError(f"MemoryServer: model must be an MPlusForCausalLM, got {type(model).__name__}")
        if not isinstance(store, MemoryStore):
            raise TypeError(f"MemoryServer: store must be a MemoryStore, got {type(store).__name__}")
        if not isinstance(snapshot_every, int) or snapshot_every < 1:
            raise ValueError(f"MemoryServer: snapshot_every={snapshot_every!r} must be an int >= 1")
        self.model, self.store, self.tokenizer, self.snapshot_every = model, store, tokenizer, snapshot_every
        self.model.eval()

    # ------------------------------------------------------------------------------------------------ states
    def create(self, memory_id: str, *, seed: int | None = None, exist_ok: bool = False) -> dict:
        """A new state ``memory_id`` in the store: a copy of the model's memory with its own drop generator (seeded
        ``seed``, default from the id). Nothing else creates one."""
        check_memory_id(memory_id)
        if seed is not None and (not isinstance(seed, int) or isinstance(seed, bool) or seed < 0):
            raise ValueError(f"create: seed must be an int >= 0, got {seed!r}")
        seed = default_seed(memory_id) if seed is None else seed
        created = self.store.create(memory_id, self.model.new_memory(seed=seed), exist_ok=exist_ok)
        return {"memory_id": memory_id, "created": created, "version": self.store.head(memory_id)}

    def load(self, memory_id: str) -> Resident:
        """Bring ``memory_id`` in from the store (its newest snapshot, then the records after it, replayed)."""
        snap = self.store.read(memory_id)
        state = self._place(snap.state, memory_id)
        resident = Resident(self, memory_id, state, snap.version)
        self._replay(resident, snap.records)
        return resident

    def _place(self, state: MemoryState, memory_id: str) -> MemoryState:
        state = state.to(self.model.compute_device)
        try:
            state.check_usable(self.model.memory, self.model.compute_device, f"memory id {memory_id!r}", inject=True)
        except ValueError as exc:
            raise ValueError(f"{exc} (its files: {self.store.folder(memory_id)})") from None
        return state

    def _replay(self, resident: Resident, records) -> None:
        for record in records:
            if record.version != resident.version + 1:
                raise ValueError(f"replay of {resident.memory_id!r}: record {record.version} after {resident.version}")
            check = self._inject(resident, record.ids)
            if record.check is not None and check != record.check:
                raise ReplayMismatchError(
                    f"replay of {resident.memory_id!r} version {record.version}: the inject computed another delta "
                    "memory than the replica that committed it (sha256 "
                    f"{check[:12]}... vs {record.check[:12]}...). Injects replay bit for bit only on the same build, "
                    "device kind and thread count (MKL's GEMM bits depend on the thread count): give every replica of "
                    "a deployment the same (deployment(num_threads=...)), or snapshot_every=1 so that no replica "
                    "replays another's inject"
                )
            resident.version = record.version

    def _inject(self, resident: Resident, ids: list[int]) -> str:
        """Inject ``ids`` into the copy; the SHA-256 of the delta memory it computed (the record's check)."""
        context = torch.tensor([ids], dtype=torch.long, device=self.model.compute_device)
        delta = self.model.inject(context, memory=resident.state, progress=False)
        return hashlib.sha256(_bytes(delta)).hexdigest()

    def catch_up(self, resident: Resident, writer: Writer | None = None) -> None:
        """Bring ``resident``'s copy to the store's head (the injects other replicas committed since it was read);
        a copy older than the store's newest snapshot, or dropped after a failure, is read again. The store is read
        before the copy is locked (an inject takes the store's lock first: one order, no deadlock)."""
        while True:
            head = writer.head if writer is not None else self.store.head(resident.memory_id)
            with resident.lock.read():
                since = resident.version if resident.state is not None else None
            if since == head:
                return
            snap = writer.read(since) if writer is not None else self.store.read(resident.memory_id, since=since)
            with resident.lock.write():
                if (resident.version if resident.state is not None else None) != since:
                    continue  # another thread moved the copy meanwhile: look again
                try:
                    if snap.state is not None:
                        resident.state, resident.version = self._place(snap.state, resident.memory_id), snap.version
                    self._replay(resident, snap.records)
                except BaseException:
                    resident.state = None  # half caught up: read again next time
                    raise
            return

    @contextlib.contextmanager
    def reading(self, resident: Resident) -> Iterator[MemoryState]:
        """``resident``'s copy, at least as new as the store's head when called, not changed during the block."""
        self.catch_up(resident)
        with resident.lock.read():
            yield resident.state

    def digest(self, resident: Resident) -> dict:
        """``resident``'s version and a SHA-256 of its whole state (every tensor of its memory file, the drop
        generator included): replicas and a reload agree on a version exactly when these agree."""
        with self.reading(resident) as state:
            h = hashlib.sha256()
            for name, t in sorted(serialization.state_tensors(state).items()):
                h.update(f"{name}:{t.dtype}:{list(t.shape)};".encode())
                h.update(_bytes(t))
            return {"memory_id": resident.memory_id, "version": resident.version, "sha256": h.hexdigest()}

    # ------------------------------------------------------------------------------------------------ requests
    def token_ids(self, request: dict, what: str, *, batch: bool) -> tuple[list[list[int]], bool]:
        """The token ids of a request: ``ids`` (a list of ints, or with ``batch`` a list of such lists), or
        ``text`` (a string, or with ``batch`` a list of strings) through the tokenizer; and whether it was text."""
        if not isinstance(request, dict):
            raise TypeError(f"{what}: the request must be a dict (JSON object), got {type(request).__name__}")
        if ("ids" in request) == ("text" in request):
            raise ValueError(f"{what}: give exactly one of 'ids' (token ids) and 'text'")
        vocab = self.model.config.vocab_size
        if "text" in request:
            texts = request["text"]
            texts = [texts] if isinstance(texts, str) and batch else texts
            if self.tokenizer is None:
                raise ValueError(f"{what}: this deployment's model has no tokenizer: send 'ids' (token ids)")
            if not (isinstance(texts, str) if not batch else isinstance(texts, list) and texts and
                    all(isinstance(t, str) for t in texts)):  # fmt: skip
                raise ValueError(f"{what}: 'text' must be a string{' or a list of strings' if batch else ''}")
            rows = [texts] if not batch else texts
            # a prompt starts with the tokenizer's special tokens (BOS); an injected document is plain text
            ids = [self.tokenizer(t, add_special_tokens=batch)["input_ids"] for t in rows]
            is_text = True
        else:
            ids = request["ids"]
            ids = [ids] if not batch or (isinstance(ids, list) and ids and isinstance(ids[0], int)) else ids
            is_text = False
        if not isinstance(ids, list) or not ids:
            raise ValueError(
                f"{what}: 'ids' must be a non-empty list of token ids{' (or of such lists)' if batch else ''}"
            )
        for i, row in enumerate(ids):
            if not isinstance(row, list) or not row or not all(type(t) is int for t in row):
                raise ValueError(f"{what}: ids row {i} must be a non-empty list of ints, got {str(row)[:80]}")
            lo, hi = min(row), max(row)
            if lo < 0 or hi >= vocab:
                raise ValueError(f"{what}: ids row {i} holds ids in [{lo}, {hi}], outside the vocabulary [0, {vocab})")
        return ids, is_text

    def inject(self, resident: Resident, ids: list[int], request_id: str | None = None) -> dict:
        """Write ``ids`` into ``resident``'s state as one committed inject (the transaction of the module docstring).
        A ``request_id`` already in the state's log or recent snapshot is not applied again (``applied: False``):
        a client may retry an inject whose answer it lost."""
        if request_id is not None and (not isinstance(request_id, str) or not 0 < len(request_id) <= 256):
            raise ValueError(f"inject: request_id must be a string of 1-256 characters, got {request_id!r}")
        with self.store.writer(resident.memory_id) as writer:
            if request_id is not None and request_id in writer.request_ids():
                return {"memory_id": resident.memory_id, "version": writer.head, "applied": False}
            self.catch_up(resident, writer)
            with resident.lock.write():
                try:
                    check = self._inject(resident, ids)
                    record = writer.append(ids, request_id, check)
                except BaseException:
                    resident.state = None  # the copy may hold what the store does not: read it again
                    raise
                resident.version = record.version
                if record.version - writer.newest_snapshot >= self.snapshot_every:
                    writer.snapshot(resident.state, resident.version)
        return {"memory_id": resident.memory_id, "version": record.version, "applied": True}

    def generate(
        self, resident: Resident, rows: Sequence[list[int]], options: GenerateOptions, max_new_tokens: Sequence[int]
    ) -> tuple[list[list[int]], int]:
        """Generate for ``rows`` (prompts, any lengths: left-padded into one batch) over ``resident``'s state; row
        ``i`` stops at ``max_new_tokens[i]`` tokens or its end-of-sequence token. Returns each row's new tokens and
        the store version the state was at."""
        b, width = len(rows), max(len(r) for r in rows)
        pad = self._pad_id()
        ids = torch.full((b, width), pad, dtype=torch.long)
        mask = torch.zeros((b, width), dtype=torch.long)
        for i, r in enumerate(rows):
            ids[i, width - len(r) :] = torch.tensor(r)
            mask[i, width - len(r) :] = 1
        device = self.model.compute_device
        kwargs: dict[str, Any] = {"do_sample": options.do_sample}
        if options.do_sample:
            kwargs.update(temperature=options.temperature, top_p=options.top_p, top_k=options.top_k)
        with self.reading(resident) as state:
            out = self.model.generate(
                ids.to(device), attention_mask=mask.to(device), memory=state, max_new_tokens=max(max_new_tokens),
                pad_token_id=pad, **kwargs,
            )  # fmt: skip
            version = resident.version
        eos = self._eos_ids()
        new = []
        for i, n in enumerate(max_new_tokens):
            row = out[i, width : width + n].tolist()
            for j, t in enumerate(row):
                if t in eos:
                    row = row[: j + 1]
                    break
            new.append(row)
        return new, version

    def decode(self, rows: list[list[int]]) -> list[str]:
        return [self.tokenizer.decode(r, skip_special_tokens=True) for r in rows]

    def _eos_ids(self) -> set[int]:
        eos = self.model.generation_config.eos_token_id
        if eos is None and self.tokenizer is not None:
            eos = self.tokenizer.eos_token_id
        return set(eos if isinstance(eos, list) else [] if eos is None else [eos])

    def _pad_id(self) -> int:
        for source in (self.tokenizer, self.model.generation_config):
            if source is not None and getattr(source, "pad_token_id", None) is not None:
                return int(source.pad_token_id)
        eos = sorted(self._eos_ids())
        return eos[0] if eos else 0
