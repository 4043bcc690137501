"""Issue 21, item 2 without Ray: the state store (snapshot + write-ahead log + lock) and one replica's logic.

Every served history must equal a serial, single-process one (``tests/_serve.replay``), bit for bit; two servers over
one store stand in for two replicas; a process killed mid-inject loses nothing committed.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

from mplus.serve import GenerateOptions, MemoryBusyError, MemoryNotFoundError, MemoryServer, MemoryStore
from mplus.serve.server import ReplayMismatchError
from mplus.serve.store import InjectRecord
from tests._serve import MODEL, assert_same_state, documents, golden, greedy, replay

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def model():
    return golden()


@pytest.fixture
def server(model, tmp_path):
    return MemoryServer(model, MemoryStore(tmp_path / "store", lock_timeout_s=5.0), snapshot_every=3)


def _files(store: MemoryStore, memory_id: str) -> list[str]:
    folder = store.folder(memory_id)
    return sorted(p.name for p in folder.iterdir() if p.name != "log") + sorted(
        f"log/{p.name}" for p in (folder / "log").glob("*")
    )


def test_injects_through_two_servers_equal_the_serial_replay(model, server, tmp_path):
    """Two servers (two replicas) hold one id and take turns injecting: each catches up before it writes, so the
    store, a fresh load and both copies equal one serial history; snapshots compact the log as they go."""
    other = MemoryServer(model, MemoryStore(tmp_path / "store"), snapshot_every=3)
    assert server.create("alice", seed=7) == {"memory_id": "alice", "created": True, "version": 0}
    a, b = server.load("alice"), other.load("alice")
    docs = documents(7, seed=1, length=0)
    for i, doc in enumerate(docs):
        out = (server if i % 2 == 0 else other).inject(a if i % 2 == 0 else b, doc)
        assert out == {"memory_id": "alice", "version": i + 1, "applied": True}
    want = replay(model, 7, docs)
    assert_same_state(server.load("alice").state, want)
    other.catch_up(b)
    assert b.version == 7
    assert_same_state(b.state, want)
    # version 6 was snapshotted (every 3 injects), the log keeps only what is newer
    assert _files(server.store, "alice") == [
        "lock", "snapshot-000000000006.json", "snapshot-000000000006.safetensors", "log/000000000007.json"
    ]  # fmt: skip


def test_generate_catches_up_and_batches_rows_of_any_length(model, server, tmp_path):
    other = MemoryServer(model, MemoryStore(tmp_path / "store"))
    server.create("alice", seed=3)
    a, b = server.load("alice"), other.load("alice")
    docs = documents(2, seed=2)
    other.inject(b, docs[0])
    other.inject(b, docs[1])
    prompts = [docs[0][:5], docs[1][:9], [3]]
    new, version = server.generate(a, prompts, GenerateOptions(), [6, 3, 5])  # `a` never saw the injects
    assert version == 2
    want = replay(model, 3, docs)
    assert new == [greedy(model, want, p, n) for p, n in zip(prompts, [6, 3, 5])]


def test_eviction_snapshots_once_and_the_reload_is_bit_identical(model, server):
    server.create("alice", seed=5)
    r = server.load("alice")
    docs = documents(2, seed=3)
    for doc in docs:
        server.inject(r, doc)
    assert r.close() is True  # a snapshot at version 2
    assert r.close() is False  # Ray Serve may call the hook twice: the second does nothing
    r.__del__()
    assert _files(server.store, "alice") == ["lock", "snapshot-000000000002.json", "snapshot-000000000002.safetensors"]
    assert_same_state(server.load("alice").state, replay(model, 5, docs))


def test_a_retried_request_id_is_applied_once_even_after_compaction(model, server):
    server.create("alice", seed=1)
    r = server.load("alice")
    docs = documents(4, seed=4)
    for i, doc in enumerate(docs):  # snapshot_every=3: request r0..r2 are only in the snapshot's list afterwards
        server.inject(r, doc, request_id=f"r{i}")
    assert server.inject(r, docs[0], request_id="r0") == {"memory_id": "alice", "version": 4, "applied": False}
    assert server.inject(r, docs[3], request_id="r3")["applied"] is False
    assert_same_state(server.load("alice").state, replay(model, 1, docs))


def test_a_failed_append_leaves_the_store_and_the_served_state_as_they_were(model, server, monkeypatch):
    """The copy is written before the record: when the record cannot be written, the copy is dropped and read
    again, so no request ever sees an inject the store does not have."""
    server.create("alice", seed=2)
    r = server.load("alice")
    docs = documents(2, seed=5)
    server.inject(r, docs[0])
    from mplus.serve import store as store_module

    def full_disk(self, ids, request_id=None, check=None):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(store_module.Writer, "append", full_disk)
    with pytest.raises(OSError, match="No space left"):
        server.inject(r, docs[1])
    monkeypatch.undo()
    assert server.store.head("alice") == 1 and r.state is None
    want = replay(model, 2, docs[:1])
    assert server.generate(r, [[5, 6, 7]], GenerateOptions(), [4])[0] == [greedy(model, want, [5, 6, 7], 4)]
    assert_same_state(r.state, want)


def test_a_writer_holding_the_lock_makes_others_wait_then_fail_by_name(model, tmp_path):
    store = MemoryStore(tmp_path / "store", lock_timeout_s=0.2)
    server = MemoryServer(model, store)
    server.create("alice", seed=0)
    r = server.load("alice")
    with store.writer("alice"):
        t0 = time.monotonic()
        with pytest.raises(MemoryBusyError, match=r"memory id 'alice' is being written elsewhere.*0\.2 s"):
            server.inject(r, [1, 2, 3])
        assert time.monotonic() - t0 >= 0.2
    assert store.head("alice") == 0 and r.state is not None
    server.inject(r, [1, 2, 3])  # free again


def test_concurrent_injects_from_threads_of_two_servers_lose_no_update(model, tmp_path):
    store_root = tmp_path / "store"
    # no snapshot in this test (snapshot_every=100): the log keeps every record, so it gives the commit order
    servers = [MemoryServer(model, MemoryStore(store_root), snapshot_every=100) for _ in range(2)]
    servers[0].create("alice", seed=11)
    residents = [s.load("alice") for s in servers]
    docs = {f"c{c}-{i}": doc for c in range(3) for i, doc in enumerate(documents(4, seed=10 + c))}
    errors = []

    def client(c: int) -> None:
        try:
            for i in range(4):
                s = (c + i) % 2
                servers[s].inject(residents[s], docs[f"c{c}-{i}"], request_id=f"c{c}-{i}")
        except Exception as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=client, args=(c,)) for c in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors
    store = servers[0].store
    assert store.head("alice") == 12
    # the serial order is the order of the versions
    order = [r.request_id for r in store.read("alice", since=0).records]
    assert sorted(order) == sorted(docs)
    for c in range(3):  # each client's own injects in the order it sent them
        mine = [k for k in order if k.startswith(f"c{c}-")]
        assert mine == [f"c{c}-{i}" for i in range(4)]
    want = replay(model, 11, [docs[k] for k in order])
    assert_same_state(servers[1].load("alice").state, want)
    for s, r in zip(servers, residents):  # and each replica's copy, which served its injects, is that state too
        s.catch_up(r)
        assert_same_state(r.state, want)


def test_text_in_and_out_with_the_real_model(tmp_path):
    """SmolLM2 built as M+ (from_base) with its tokenizer: an injected text and a text prompt give what the model
    gives in this process — the requests of the HTTP routes, parsed as the deployment parses them."""
    from mplus.cli import load_model
    from tests._real_model import base_folder

    smol, tokenizer = load_model(base_folder(), max_length=256, quiet=True)
    server = MemoryServer(smol, MemoryStore(tmp_path / "store"), tokenizer)
    server.create("notes", seed=3)
    r = server.load("notes")
    text = "The lighthouse keeper on Fenwick Island paints the door of the lighthouse green every spring."
    (ids,), is_text = server.token_ids({"text": text}, "inject", batch=False)
    assert is_text and ids == tokenizer(text, add_special_tokens=False)["input_ids"]
    assert server.inject(r, ids)["version"] == 1
    rows, _ = server.token_ids({"text": ["What colour is the door?", "Who paints it?"]}, "generate", batch=True)
    new, version = server.generate(r, rows, GenerateOptions(), [8, 6])
    state = smol.new_memory(seed=3)
    smol.inject(torch.tensor([ids]), memory=state, progress=False)
    assert new == [greedy(smol, state, rows[0], 8), greedy(smol, state, rows[1], 6)]
    assert rows[0] == tokenizer("What colour is the door?")["input_ids"]  # a prompt starts with BOS
    assert server.decode(new) == [tokenizer.decode(n, skip_special_tokens=True) for n in new]


# ---------------------------------------------------------------------------------------------------- bad input
def test_bad_ids_and_requests_are_refused_before_anything_changes(model, server):
    with pytest.raises(MemoryNotFoundError, match=r"memory id 'nobody' is not in the store .*nothing is created"):
        server.load("nobody")
    assert not server.store.folder("nobody").exists() or not server.store.exists("nobody")
    for bad in ("", "../x", ".hidden", "a/b", "x" * 129, 3):
        with pytest.raises(ValueError, match="memory id must be 1-128 characters"):
            server.create(bad)
    server.create("alice", seed=0)
    with pytest.raises(FileExistsError, match="'alice' already exists"):
        server.create("alice")
    assert server.create("alice", exist_ok=True)["created"] is False
    with pytest.raises(ValueError, match="seed must be an int >= 0"):
        server.create("bob", seed=-1)
    with pytest.raises(ValueError, match="global generator"):
        server.store.create("bob", model.memory)  # the default state draws from torch's global generator
    cases = [
        ({"ids": [1, 2], "text": "x"}, "exactly one of 'ids'"),
        ({}, "exactly one of 'ids'"),
        ({"ids": []}, "non-empty list"),
        ({"ids": [1, 2.5]}, "row 0 must be a non-empty list of ints"),
        ({"ids": [1, 256]}, r"ids in \[1, 256\], outside the vocabulary \[0, 256\)"),
        ({"text": "hello"}, "has no tokenizer"),
        ([1, 2], "must be a dict"),
    ]
    for request, match in cases:
        with pytest.raises((ValueError, TypeError), match=match):
            server.token_ids(request, "inject", batch=False)
    with pytest.raises(ValueError, match="request_id must be a string"):
        server.inject(server.load("alice"), [1, 2], request_id="")
    assert server.store.head("alice") == 0


def test_a_state_of_another_config_or_a_damaged_store_is_refused_by_name(model, tmp_path):
    store = MemoryStore(tmp_path / "store")
    server = MemoryServer(model, store)
    store.create("half", model.new_memory(seed=0).to(torch.bfloat16))
    with pytest.raises(ValueError, match=r"memory id 'half': memory holds torch.bfloat16.*its files: .*half"):
        server.load("half")
    server.create("alice", seed=0)
    r = server.load("alice")
    server.inject(r, [1, 2, 3])
    server.inject(r, [4, 5, 6])
    (store.folder("alice") / "log" / "000000000001.json").unlink()  # a gap: never replay around it
    with pytest.raises(ValueError, match="the log of 'alice' has a gap after version 0"):
        server.load("alice")
    (store.folder("alice") / "log" / "000000000001.json").write_text("{not json")
    with pytest.raises(ValueError, match="000000000001.json is not an inject record"):
        server.load("alice")
    with pytest.raises(ValueError, match="root .* is not a directory"):
        MemoryStore(store.folder("alice") / "lock")


def test_leftovers_of_a_dead_writer_are_ignored_then_removed(model, server):
    server.create("alice", seed=0)
    folder = server.store.folder("alice")
    (folder / "log").mkdir()
    (folder / "log" / ".tmp-99-000000000001.json").write_text('{"version": 1, "ids": [1')  # half a record
    (folder / ".tmp-99-snapshot-000000000001.safetensors").write_bytes(b"half")
    assert server.store.head("alice") == 0
    r = server.load("alice")
    server.inject(r, [1, 2, 3])
    assert not list(folder.glob(".tmp-*")) and not list((folder / "log").glob(".tmp-*"))
    assert InjectRecord.from_json((folder / "log" / "000000000001.json").read_text(), "x").ids == [1, 2, 3]


def test_a_replay_that_computes_another_delta_is_refused(model, server):
    """Each record carries the SHA-256 of the delta its inject computed; a replay that computes another (another
    build, device or thread count — or a damaged record) stops with an error naming it, never serves the state."""
    server.create("alice", seed=0)
    r = server.load("alice")
    docs = documents(2, seed=6)
    server.inject(r, docs[0])
    other = MemoryServer(model, server.store)
    behind = other.load("alice")  # at version 1
    server.inject(r, docs[1])
    path = server.store.folder("alice") / "log" / "000000000002.json"
    record = json.loads(path.read_text())
    assert len(record["check"]) == 64
    record["ids"][0] = (record["ids"][0] + 1) % 256
    path.write_text(json.dumps(record))
    with pytest.raises(ReplayMismatchError, match=r"replay of 'alice' version 2: the inject computed another delta"):
        server.load("alice")
    with pytest.raises(ReplayMismatchError, match="same build, device kind and thread count"):
        other.catch_up(behind)
    assert behind.state is None  # dropped, never served


# ---------------------------------------------------------------------------------------------------- a killed writer
KILLED_WRITER = """
import sys, torch
from mplus import MPlusForCausalLM
from mplus.serve import MemoryServer, MemoryStore
model = MPlusForCausalLM.from_pretrained(sys.argv[1], max_length=96).eval()
server = MemoryServer(model, MemoryStore(sys.argv[2]), snapshot_every=5)
r = server.load("alice")
g = torch.Generator().manual_seed(0)
for i in range(10_000):
    doc = torch.randint(0, 256, (int(torch.randint(12, 300, (1,), generator=g)),), generator=g).tolist()
    print("sending", i, flush=True)
    out = server.inject(r, doc, request_id=f"r{i}")
    print("committed", i, out["version"], flush=True)
"""


def test_a_writer_killed_mid_inject_loses_no_committed_inject(model, tmp_path):
    """SIGKILL a process that injects in a loop (snapshots included): every inject it reported committed is in the
    store, at most the one in flight besides, and the store's state equals their serial replay."""
    store = MemoryStore(tmp_path / "store", lock_timeout_s=5.0)
    MemoryServer(model, store).create("alice", seed=4)
    script = tmp_path / "writer.py"
    script.write_text(KILLED_WRITER)
    env = {**os.environ, "OMP_NUM_THREADS": str(torch.get_num_threads())}  # the records' checks: the same threads
    proc = subprocess.Popen([sys.executable, str(script), MODEL, str(tmp_path / "store")], stdout=subprocess.PIPE,
                            text=True, cwd=ROOT, env=env)  # fmt: skip
    committed, sending = [], None
    for line in proc.stdout:
        word, i, *_ = line.split()
        if word == "committed":
            committed.append(int(i))
        else:
            sending = int(i)
        if len(committed) >= 12 and word == "sending":
            time.sleep(0.002 * (len(committed) % 7))  # somewhere inside the inject, its append or its snapshot
            break
    proc.send_signal(signal.SIGKILL)
    proc.wait(30)
    head = store.head("alice")
    assert head in (len(committed), len(committed) + 1), (head, committed, sending)
    g = torch.Generator().manual_seed(0)
    docs = [
        torch.randint(0, 256, (int(torch.randint(12, 300, (1,), generator=g)),), generator=g).tolist()
        for _ in range(head)
    ]
    assert_same_state(MemoryServer(model, store).load("alice").state, replay(model, 4, docs))
    assert store.request_ids("alice") == {f"r{i}" for i in range(head)}
