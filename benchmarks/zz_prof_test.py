import time
import torch
import mplus.segments as seg
from bench_model import as_provider, llama, model  # noqa: F401
from bench_serving import _prompts, other_memory  # noqa: F401

orig = seg.rotate_keys


def spy(k, positions, cos, sin, backend=None):
    t = time.perf_counter()
    out = orig(k, positions, cos, sin, backend=backend)
    t1 = time.perf_counter()
    orig(k, positions, cos, sin, backend=backend)
    t2 = time.perf_counter()
    print("rotate", f"{(t1 - t) * 1e3:.1f} ms, again {(t2 - t1) * 1e3:.1f} ms")
    return out


def test_prof(model, other_memory, monkeypatch):  # noqa: F811
    monkeypatch.setattr(seg, "rotate_keys", spy)
    ids, mask = _prompts(2)
    mem = [model.memory, other_memory]
    with as_provider(model, "mplus"), torch.no_grad():
        for _ in range(3):
            t = time.perf_counter()
            model(ids, attention_mask=mask, memory=mem, logits_to_keep=1)
            print("forward", round(time.perf_counter() - t, 3))
