"""M+ on Ray Serve: a deployment that holds the model once per replica and memory states by id.

Ray Serve does the engine's work — replicas, routing, HTTP, batching — and mplus adds nothing of that kind:

- **Routing by memory id:** Ray Serve's model multiplexing. The memory id is the multiplexed model id (a handle's
  ``.options(multiplexed_model_id=...)``, or the HTTP header ``serve_multiplexed_model_id``); the loader
  (``@serve.multiplexed``) brings the state in from the store, and Ray Serve keeps up to ``max_states_per_replica``
  per replica, least recently used first out (the eviction hook snapshots the state: :class:`~.server.Resident`).
- **Batching:** ``@serve.batch`` gathers generate requests; Ray Serve splits a batch by multiplexed id, so one batch
  is one memory, run as one ``generate(ids [B, T], attention_mask, memory=state)`` per set of sampling options.
- **One writer per id:** not routing (Ray Serve's is best effort) but the store's lock and log
  (:mod:`mplus.serve.server`): a state held by two replicas is written by one at a time, each on the committed state.

Every request runs its model and store work on the replica's one worker thread (the model computes one call at a
time anyway); the event loop stays free for Ray Serve's routing and health checks. Requests are validated before
they queue: a bad request costs no state load.

The HTTP routes (POST, JSON bodies; the memory id in the ``serve_multiplexed_model_id`` header):
``/generate`` (``{"ids": [[...]], "max_new_tokens": 32}`` or ``{"text": "...", ...}``), ``/inject``
(``{"ids": [...]}`` or ``{"text": ...}``, optional ``"request_id"``), ``/create`` (``{"seed": 0, "exist_ok":
false}``), and GET ``/memories`` (the store's ids). Errors answer 400 (bad request), 404 (unknown memory id), 409
(the id is being written elsewhere and its lock did not come in time), with ``{"error": ...}``.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import json
import os
import weakref
from dataclasses import dataclass
from typing import Any

import torch

try:
    from ray import serve
except ImportError as exc:  # the optional extra
    raise ImportError("mplus.serve needs Ray Serve: pip install -e .[serve] (or pip install 'ray[serve]')") from exc

from ..cli import DTYPES, load_model
from .server import GenerateOptions, MemoryServer, Resident
from .store import MemoryBusyError, MemoryNotFoundError, MemoryStore, check_memory_id

__all__ = ["deployment"]

DEFAULT_MAX_NEW_TOKENS = 32


@dataclass
class _Generation:
    resident: Resident
    rows: list[list[int]]
    options: GenerateOptions
    max_new_tokens: int


def _max_new_tokens(request: dict, max_length: int) -> int:
    n = request.get("max_new_tokens", DEFAULT_MAX_NEW_TOKENS)
    if type(n) is not int or not 1 <= n < max_length:
        raise ValueError(f"generate: max_new_tokens must be an int in [1, {max_length}), got {n!r}")
    return n


class _Replica:
    """The body of the deployment (the class :func:`deployment` decorates): one model, one store, one worker."""

    def __init__(self, model: str, store: str, load: dict[str, Any], server: dict[str, Any], batch: dict) -> None:
        if server.get("num_threads") is not None:  # before anything computes: the record checks depend on it
            torch.set_num_threads(server["num_threads"])
        server = {k: v for k, v in server.items() if k != "num_threads"}
        dtype = DTYPES[load.pop("dtype", "float32")]
        device = load.pop("device", None) or ("cuda" if torch.cuda.is_available() else "cpu")
        mplus_model, tokenizer = load_model(model, dtype=dtype, device=device, quiet=True, **load)
        self.server = MemoryServer(mplus_model, MemoryStore(store, lock_timeout_s=server.pop("lock_timeout_s")),
                                   tokenizer, **server)  # fmt: skip
        self._pool = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="mplus-serve")
        self._loaded: weakref.WeakValueDictionary[str, Resident] = weakref.WeakValueDictionary()
        self._generate_batch.set_max_batch_size(batch["max_batch_size"])
        self._generate_batch.set_batch_wait_timeout_s(batch["batch_wait_timeout_s"])

    async def _run(self, fn, *args, **kwargs):
        return await asyncio.get_running_loop().run_in_executor(self._pool, lambda: fn(*args, **kwargs))

    def _memory_id(self) -> str:
        memory_id = serve.get_multiplexed_model_id()
        if not memory_id:
            raise ValueError(
                "no memory id: call through handle.options(multiplexed_model_id=ID) or send the HTTP header "
                "serve_multiplexed_model_id: ID"
            )
        return check_memory_id(memory_id)

    async def get_state(self, memory_id: str) -> Resident:  # decorated with @serve.multiplexed by `deployment`
        resident = await self._run(self.server.load, memory_id)
        self._loaded[memory_id] = resident  # weakly: Ray Serve's LRU owns it
        return resident

    # ------------------------------------------------------------------------------------------------ API
    async def generate(self, request: dict) -> dict:
        """New tokens for each prompt row of ``request`` over the request's memory (``ids``: a list of token ids or
        a list of such rows; or ``text``: a string or a list; ``max_new_tokens``; ``do_sample``, ``temperature``,
        ``top_p``, ``top_k``). Answers ``{"ids": [[...]], "text": [...] (text requests), "version": v}``."""
        rows, is_text = self.server.token_ids(request, "generate", batch=True)
        options = GenerateOptions.parse(request)
        n = _max_new_tokens(request, self.server.model.max_length)
        longest = max(len(r) for r in rows)
        if longest + n > self.server.model.max_length:
            raise ValueError(
                f"generate: a prompt of {longest} tokens + max_new_tokens={n} exceed the model's max_length="
                f"{self.server.model.max_length}"
            )
        resident = await self.get_state(self._memory_id())
        result = await self._generate_batch(_Generation(resident, rows, options, n))
        if isinstance(result, Exception):  # the batch handler hands each request its group's error
            raise result
        new, version = result
        out: dict[str, Any] = {"ids": new, "version": version}
        if is_text:
            out["text"] = self.server.decode(new)
        return out

    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.01)
    async def _generate_batch(self, items: list[_Generation]) -> list[tuple[list[list[int]], int]]:
        """One memory's requests (Ray Serve splits batches by multiplexed id): one generate per set of options."""
        groups: dict[tuple[int, GenerateOptions], list[int]] = {}
        for i, item in enumerate(items):
            groups.setdefault((id(item.resident), item.options), []).append(i)
        results: list[Any] = [None] * len(items)
        for members in groups.values():
            rows = [r for i in members for r in items[i].rows]
            limits = [items[i].max_new_tokens for i in members for _ in items[i].rows]
            first = items[members[0]]
            try:
                new, version = await self._run(self.server.generate, first.resident, rows, first.options, limits)
            except Exception as exc:  # each request of the group gets the error
                for i in members:
                    results[i] = exc
                continue
            at = 0
            for i in members:
                results[i] = (new[at : at + len(items[i].rows)], version)
                at += len(items[i].rows)
        return results

    async def inject(self, request: dict) -> dict:
        """Write ``ids`` (a list of token ids) or ``text`` into the request's memory as one committed inject;
        ``request_id`` (optional) makes a retry safe. Answers ``{"memory_id", "version", "applied"}``."""
        (ids,), _ = self.server.token_ids(request, "inject", batch=False)
        unknown = set(request) - {"ids", "text", "request_id"}
        if unknown:
            raise ValueError(f"inject: unknown keys {sorted(unknown)} (takes ids or text, and request_id)")
        resident = await self.get_state(self._memory_id())
        return await self._run(self.server.inject, resident, ids, request.get("request_id"))

    async def create(self, request: dict | None = None) -> dict:
        """A new memory state (the model's memory, its own drop generator: ``seed``, default from the id) under the
        request's memory id; ``exist_ok``. Nothing else creates one."""
        request = request or {}
        unknown = set(request) - {"seed", "exist_ok"}
        if unknown:
            raise ValueError(f"create: unknown keys {sorted(unknown)} (takes seed and exist_ok)")
        memory_id = self._memory_id()
        return await self._run(
            self.server.create, memory_id, seed=request.get("seed"), exist_ok=bool(request.get("exist_ok", False))
        )

    async def digest(self, request: dict | None = None) -> dict:
        """The request's memory as this replica holds it: ``{"memory_id", "version", "sha256"}`` (operators compare
        replicas with it; the tests compare a reload with the state before its eviction)."""
        resident = await self.get_state(self._memory_id())
        return await self._run(self.server.digest, resident)

    async def memories(self) -> list[str]:
        return await self._run(self.server.store.ids)

    async def replica_info(self) -> dict:
        """This replica's process id and the ids it holds (tests and operators)."""
        held = {k: r.version for k, r in list(self._loaded.items()) if not r.closed}
        return {"pid": os.getpid(), "held": held}

    # ------------------------------------------------------------------------------------------------ HTTP
    async def __call__(self, http_request) -> Any:
        from starlette.responses import JSONResponse  # starlette comes with ray[serve]

        route = http_request.url.path.rstrip("/").rsplit("/", 1)[-1]
        try:
            if http_request.method == "GET" and route == "memories":
                return JSONResponse({"memories": await self.memories()})
            if http_request.method != "POST" or route not in ("generate", "inject", "create"):
                return JSONResponse({"error": f"no route {http_request.method} {http_request.url.path}"}, 404)
            try:
                body = json.loads(await http_request.body() or b"{}")
            except json.JSONDecodeError as exc:
                raise ValueError(f"{route}: the body is not JSON ({exc})") from None
            return JSONResponse(await getattr(self, route)(body))
        except MemoryNotFoundError as exc:
            return JSONResponse({"error": str(exc)}, 404)
        except (MemoryBusyError, FileExistsError) as exc:
            return JSONResponse({"error": str(exc)}, 409)
        except (ValueError, TypeError) as exc:
            return JSONResponse({"error": str(exc)}, 400)


def deployment(
    model: str,
    store: str | os.PathLike,
    *,
    num_replicas: int = 1,
    max_states_per_replica: int = 4,
    dtype: str = "float32",
    device: str | None = None,
    kind: str = "mplus",
    gguf_file: str | None = None,
    max_length: int = 2048,
    max_batch_size: int = 8,
    batch_wait_timeout_s: float = 0.01,
    lock_timeout_s: float = 30.0,
    snapshot_every: int = 64,
    num_threads: int | None = None,
    name: str = "mplus",
    ray_actor_options: dict | None = None,
) -> Any:
    """The Ray Serve application of M+: ``serve.run(deployment(model, store))``.

    ``model``: what ``mplus generate --model`` takes (an mplus / official checkpoint folder or Hub id, a plain Llama
    folder, Hub id or ``gguf_file`` built as ``kind``), loaded once per replica in ``dtype`` on ``device`` (default
    cuda when the replica has a GPU — give ``ray_actor_options={"num_gpus": 1}`` — else cpu). ``store``: the state
    store directory (:class:`~.store.MemoryStore`), which every replica must reach. ``max_states_per_replica``: the
    multiplexing LRU's size (docs/serving.md sizes it). ``num_threads``: torch's CPU threads in every replica (default:
    what Ray gives the actor). Replicas replay each other's injects (:mod:`mplus.serve.server`), which gives the same
    bits only on the same build, device kind and thread count — MKL's GEMM bits depend on the thread count — so one
    deployment's replicas share them; each record's check refuses a replay that differs. ``snapshot_every=1`` writes
    every inject as a snapshot, so that no replica ever replays another's (a mixed fleet, a rolling upgrade). The
    rest: batching, the store's lock timeout, the deployment's name and its actors' resources."""
    if dtype not in DTYPES:
        raise ValueError(f"deployment: dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
    for arg, value in (("num_replicas", num_replicas), ("max_states_per_replica", max_states_per_replica),
                       ("max_batch_size", max_batch_size)):  # fmt: skip
        if type(value) is not int or value < 1:
            raise ValueError(f"deployment: {arg} must be an int >= 1, got {value!r}")
    store = os.fspath(store)
    MemoryStore(store)  # made (or checked to be a directory) here, before any replica starts

    class MPlusDeployment(_Replica):
        @serve.multiplexed(max_num_models_per_replica=max_states_per_replica)
        async def get_state(self, memory_id: str) -> Resident:
            return await super().get_state(memory_id)

    load = {"dtype": dtype, "device": device, "kind": kind, "gguf_file": gguf_file, "max_length": max_length}
    if num_threads is not None and (type(num_threads) is not int or num_threads < 1):
        raise ValueError(f"deployment: num_threads must be an int >= 1 or None, got {num_threads!r}")
    server = {"lock_timeout_s": lock_timeout_s, "snapshot_every": snapshot_every, "num_threads": num_threads}
    batch = {"max_batch_size": max_batch_size, "batch_wait_timeout_s": batch_wait_timeout_s}
    dep = serve.deployment(
        MPlusDeployment,
        name=name,
        num_replicas=num_replicas,
        max_ongoing_requests=max(max_batch_size * 2, 16),
        ray_actor_options=ray_actor_options or {"num_cpus": 0},
    )
    return dep.bind(model, store, load, server, batch)
