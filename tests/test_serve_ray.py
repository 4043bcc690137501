"""Issue 21, item 2 on a local Ray cluster: M+ on Ray Serve, memory states routed by id (``mplus.serve.deployment``).

One cluster for the module (``ray.init(num_cpus=2)`` on the loopback, ~20 s to start with the applications): the
golden model on 2 replicas holding at most 2 states each (text in and out, the same code behind one more tokenizer
call, is tested on the real model without Ray: tests/test_serve_store.py). Every answer is compared with the
single-process run over the same memory (``tests/_serve.py``).
"""

from __future__ import annotations

import json
import os
import signal
import threading
import time
import urllib.error
import urllib.request

import pytest
import torch

from mplus import MPlusForCausalLM
from mplus.serve import MemoryNotFoundError, MemoryServer, MemoryStore
from tests._ranks import free_port
from tests._serve import MAX_LENGTH, MODEL, assert_same_state, documents, golden, greedy, replay

ray = pytest.importorskip("ray", reason="mplus.serve's tests need ray[serve] (make test installs it)")
serve = pytest.importorskip("ray.serve")

from mplus.serve import deployment  # noqa: E402  (after the skip: it imports ray)

TIMEOUT_S = 60.0


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    port = free_port()
    ray.init(num_cpus=2, include_dashboard=False, logging_level="ERROR", log_to_driver=False,
             configure_logging=False)  # fmt: skip
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        store = tmp_path_factory.mktemp("store")
        app = deployment(MODEL, store, num_replicas=2, max_states_per_replica=2, max_length=MAX_LENGTH,
                         snapshot_every=1000, lock_timeout_s=20.0, num_threads=torch.get_num_threads())  # fmt: skip
        handle = serve.run(app, name="golden", route_prefix="/golden")
        yield {
            "handle": handle,
            "store": MemoryStore(store),
            "url": f"http://127.0.0.1:{port}",
            "tmp": tmp_path_factory,
        }
    finally:
        serve.shutdown()
        ray.shutdown()


@pytest.fixture(scope="module")
def model():
    return golden()


def _post(url: str, body: dict, memory_id: str | None = None) -> tuple[int, dict]:
    headers = {"content-type": "application/json"}
    if memory_id is not None:
        headers["serve_multiplexed_model_id"] = memory_id
    req = urllib.request.Request(url, data=json.dumps(body).encode(), headers=headers, method="POST")
    try:
        with urllib.request.urlopen(req, timeout=TIMEOUT_S) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def _on(cluster, memory_id: str):
    return cluster["handle"].options(multiplexed_model_id=memory_id)


def test_answers_equal_a_single_process_run_over_the_same_memory(cluster, model):
    """Injects by handle and by HTTP, then concurrent generates (batched by Ray Serve) by both: the single-process
    serial history, token for token."""
    h = _on(cluster, "parity")
    assert h.create.remote({"seed": 21}).result(timeout_s=TIMEOUT_S)["created"] is True
    docs = documents(3, seed=21, length=0)
    assert h.inject.remote({"ids": docs[0]}).result(timeout_s=TIMEOUT_S)["version"] == 1
    assert _post(cluster["url"] + "/golden/inject", {"ids": docs[1]}, "parity") == (
        200, {"memory_id": "parity", "version": 2, "applied": True}
    )  # fmt: skip
    assert h.inject.remote({"ids": docs[2], "request_id": "third"}).result(timeout_s=TIMEOUT_S)["version"] == 3
    want = replay(model, 21, docs)
    prompts = [docs[0][:4], docs[1][:11], docs[2][:2], [7], docs[0][3:20]]
    responses = [h.generate.remote({"ids": p, "max_new_tokens": 3 + i}) for i, p in enumerate(prompts)]
    got = [r.result(timeout_s=TIMEOUT_S) for r in responses]
    assert [g["ids"] for g in got] == [[greedy(model, want, p, 3 + i)] for i, p in enumerate(prompts)]
    assert {g["version"] for g in got} == {3}
    status, body = _post(cluster["url"] + "/golden/generate", {"ids": prompts[:2], "max_new_tokens": 5}, "parity")
    assert status == 200 and body["ids"] == [greedy(model, want, p, 5) for p in prompts[:2]]


def test_concurrent_injects_to_one_id_across_two_replicas_lose_no_update(cluster, model):
    """Four clients inject into one id at once, through both replicas (Ray Serve routes the id wherever it likes):
    every inject is in the store once, each client's in its own order, and the state — in the store and in each
    replica's copy — is the serial replay of the log's order."""
    h = _on(cluster, "shared")
    h.create.remote({"seed": 5}).result(timeout_s=TIMEOUT_S)
    docs = {f"c{c}-{i}": d for c in range(4) for i, d in enumerate(documents(5, seed=50 + c, length=0))}
    errors: list[BaseException] = []

    def client(c: int) -> None:
        try:
            for i in range(5):
                key = f"c{c}-{i}"
                h.inject.remote({"ids": docs[key], "request_id": key}).result(timeout_s=TIMEOUT_S)
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=client, args=(c,)) for c in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(4 * TIMEOUT_S)
    assert not errors, errors
    store = cluster["store"]
    order = [r.request_id for r in store.read("shared", since=0).records]
    assert sorted(order) == sorted(docs)
    for c in range(4):
        assert [k for k in order if k.startswith(f"c{c}-")] == [f"c{c}-{i}" for i in range(5)]
    want = replay(model, 5, [docs[k] for k in order])
    assert_same_state(MemoryServer(model, store).load("shared").state, want)
    digests = {json.dumps(h.digest.remote().result(timeout_s=TIMEOUT_S)) for _ in range(8)}  # both replicas, likely
    assert digests == {json.dumps(_digest(model, store, "shared"))}


def _digest(model: MPlusForCausalLM, store: MemoryStore, memory_id: str) -> dict:
    server = MemoryServer(model, store)
    return server.digest(server.load(memory_id))


def test_an_evicted_state_is_snapshotted_and_reloads_bit_identical(cluster, model):
    """With 2 states per replica, touching 5 ids evicts: each eviction snapshots its state at its version (the
    hook runs once), and the reload is bit for bit the state before."""
    ids = [f"lru{i}" for i in range(5)]
    before = {}
    for k, memory_id in enumerate(ids):
        h = _on(cluster, memory_id)
        h.create.remote({"seed": k}).result(timeout_s=TIMEOUT_S)
        h.inject.remote({"ids": documents(1, seed=100 + k)[0]}).result(timeout_s=TIMEOUT_S)
        before[memory_id] = h.digest.remote().result(timeout_s=TIMEOUT_S)
    store = cluster["store"]
    snapshotted = [m for m in ids if (store.folder(m) / "snapshot-000000000001.safetensors").exists()]
    assert len(snapshotted) >= 1  # at least 5 - 2 * 2 ids left both replicas' LRU
    for m in snapshotted:
        assert not list((store.folder(m) / "log").glob("*.json"))  # compacted into the snapshot
    for k, memory_id in enumerate(ids):
        after = _on(cluster, memory_id).digest.remote().result(timeout_s=TIMEOUT_S)
        assert after == before[memory_id]
        want = replay(model, k, documents(1, seed=100 + k))
        assert_same_state(MemoryServer(model, store).load(memory_id).state, want)


def test_a_replica_killed_mid_request_loses_no_committed_inject(cluster, model):
    """Two clients inject in a loop; every replica process is killed (SIGKILL) while they do. Each inject that was
    answered is in the store; one that failed is in it at most once (a retry with its request id is safe); the
    state equals the serial replay of the log; the deployment serves again once Ray Serve restarts the replicas."""
    h = _on(cluster, "killed")
    h.create.remote({"seed": 9}).result(timeout_s=TIMEOUT_S)
    pids = {h.replica_info.remote().result(timeout_s=TIMEOUT_S)["pid"] for _ in range(12)}
    docs = {f"k{c}-{i}": d for c in range(2) for i, d in enumerate(documents(40, seed=70 + c, length=0))}
    answered, failed, stop = [], [], threading.Event()

    def client(c: int) -> None:
        for i in range(40):
            if stop.is_set():
                return
            key = f"k{c}-{i}"
            try:
                h.inject.remote({"ids": docs[key], "request_id": key}).result(timeout_s=TIMEOUT_S)
                answered.append(key)
            except Exception:  # the replica died under it (Ray's ActorDiedError and kin)
                failed.append(key)
                return

    threads = [threading.Thread(target=client, args=(c,)) for c in range(2)]
    for t in threads:
        t.start()
    deadline = time.monotonic() + TIMEOUT_S
    while len(answered) < 6 and time.monotonic() < deadline:
        time.sleep(0.01)
    for pid in pids:
        os.kill(pid, signal.SIGKILL)
    stop.set()
    for t in threads:
        t.join(2 * TIMEOUT_S)
    assert len(answered) >= 6
    store = cluster["store"]
    order = [r.request_id for r in store.read("killed", since=0).records]
    assert set(answered) <= set(order) <= set(answered) | set(failed)
    assert len(order) == len(set(order))
    assert_same_state(MemoryServer(model, store).load("killed").state, replay(model, 9, [docs[k] for k in order]))
    # back up: retries of the failed requests apply each exactly once
    deadline = time.monotonic() + 3 * TIMEOUT_S
    while True:
        try:
            for key in failed:
                h.inject.remote({"ids": docs[key], "request_id": key}).result(timeout_s=TIMEOUT_S)
            break
        except Exception:
            if time.monotonic() > deadline:
                raise
            time.sleep(1.0)
    order = [r.request_id for r in store.read("killed", since=0).records]
    assert sorted(order) == sorted(answered + failed)
    assert _on(cluster, "killed").digest.remote().result(timeout_s=TIMEOUT_S) == _digest(model, store, "killed")


def test_bad_requests_get_clear_errors_and_change_nothing(cluster):
    h = _on(cluster, "nobody")
    with pytest.raises(MemoryNotFoundError, match="'nobody' is not in the store"):
        h.generate.remote({"ids": [1, 2, 3]}).result(timeout_s=TIMEOUT_S)
    url = cluster["url"] + "/golden"
    status, body = _post(url + "/inject", {"ids": [1, 2]}, "nobody")
    assert status == 404 and "nothing is created unless asked" in body["error"]
    assert not cluster["store"].exists("nobody")
    _on(cluster, "bad").create.remote({"seed": 0}).result(timeout_s=TIMEOUT_S)
    cases = [
        ("/generate", {"ids": [1, 999]}, "bad", 400, "outside the vocabulary"),
        ("/generate", {"ids": [1], "max_new_tokens": 0}, "bad", 400, "max_new_tokens must be an int"),
        ("/generate", {"ids": [1] * 90, "max_new_tokens": 10}, "bad", 400, "exceed the model's max_length=96"),
        ("/generate", {"text": "hi"}, "bad", 400, "has no tokenizer"),
        ("/inject", {"ids": [1, 2], "victims": [0]}, "bad", 400, "unknown keys ['victims']"),
        ("/inject", {"ids": [1, 2]}, "../etc", 400, "memory id must be"),
        ("/inject", {"ids": [1, 2]}, None, 400, "no memory id"),
        ("/create", {}, "bad", 409, "already exists"),
        ("/nothing", {}, "bad", 404, "no route"),
    ]
    for route, body, memory_id, code, match in cases:
        status, answer = _post(url + route, body, memory_id)
        assert status == code and match in answer["error"] or pytest.fail(f"{route} {body}: {status} {answer}")
    assert cluster["store"].head("bad") == 0


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (make gpu-check runs it where ray is)")
def test_a_gpu_replica_answers_as_the_same_model_on_the_gpu_here(cluster):
    """The GPU path: one replica with the GPU (``num_gpus=1``), states placed on it; its answers equal the same
    model on the same GPU in this process (the store's files are device-independent)."""
    store = cluster["tmp"].mktemp("gpu-store")
    app = deployment(MODEL, store, max_length=MAX_LENGTH, device="cuda", ray_actor_options={"num_gpus": 1})
    h = serve.run(app, name="gpu", route_prefix="/gpu").options(multiplexed_model_id="g")
    h.create.remote({"seed": 1}).result(timeout_s=TIMEOUT_S)
    docs = documents(2, seed=8)
    for doc in docs:
        h.inject.remote({"ids": doc}).result(timeout_s=TIMEOUT_S)
    model = golden().to("cuda")
    state = replay(model, 1, docs)
    got = h.generate.remote({"ids": docs[0][:6], "max_new_tokens": 5}).result(timeout_s=TIMEOUT_S)
    assert got["ids"] == [greedy(model, state, docs[0][:6], 5)]
    serve.delete("gpu")
