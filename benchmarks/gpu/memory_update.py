"""Short-term-memory update on the GPU at M+ size: the mplus Triton kernels vs the best in-place PyTorch.

L 32, N 10,240, d 4,096, K 256 new rows per update, bf16 hidden rows + fp64 ages (2.7 GB of slots on the device).
Victims come from ``draw_victims`` on the host (as in the model: the official ``torch.randperm`` choices), so each
call includes their 64 KB copy to the device. Providers (each on its own copy of the same memory, same victims):

* ``mplus``: ``mplus_kernels.memory_update_`` (the wrapper, through the dispatcher) with caller-owned ``dropped``
  buffers: O(K·d + N) work, positions renumbered on the device;
* ``torch_inplace``: the same semantics in batched PyTorch over all layers at once: flat slot ids, ``index_select``
  of the victims' rows, ``index_copy_`` of the new rows, and the logical order rebuilt with a boolean mask.

``gbps`` counts the victims' rows read and written out, the new rows read and written in (hidden + ages).
"""

from __future__ import annotations

import torch

import mplus_kernels as mk

from ._harness import Recorder

L, N, D, K = 32, 10_240, 4_096, 256
DTYPE = torch.bfloat16
SHAPE = f"L{L} N{N} d{D} K{K}"
MOVED = 4 * L * K * (D * 2 + 8)


def _state() -> dict:
    g = torch.Generator(device="cuda").manual_seed(0)
    return {
        "hidden": torch.randn(L, N, D, generator=g, device="cuda").to(DTYPE),
        "age": torch.zeros(L, N, dtype=torch.float64, device="cuda"),
        "new": torch.randn(L, K, D, generator=g, device="cuda").to(DTYPE),
        "new_age": torch.arange(K - 1, -1, -1, dtype=torch.float64, device="cuda").repeat(L, 1),
        "victims": mk.draw_victims(L, N, K, torch.Generator().manual_seed(1)),  # host, like the model's
    }


def _mplus(x: dict):
    hidden, age = x["hidden"], x["age"].clone()
    pos = torch.arange(N, dtype=torch.int32, device="cuda").repeat(L, 1)
    order = pos.clone()
    dropped = [torch.empty(L, K, D, dtype=DTYPE, device="cuda"), torch.empty(L, K, dtype=torch.float64, device="cuda")]
    args = (pos, order, x["victims"], [hidden, age], [x["new"], x["new_age"]])
    return lambda: mk.memory_update_(*args, dropped=dropped)


def _torch_inplace(x: dict):
    hidden, age = x["hidden"].clone(), x["age"].clone()
    flat_h, flat_a = hidden.view(L * N, D), age.view(L * N)
    new_h, new_a = x["new"].reshape(L * K, D), x["new_age"].reshape(L * K)
    order = torch.arange(N, device="cuda").repeat(L, 1)  # logical position -> slot
    base = (torch.arange(L, device="cuda") * N)[:, None]
    out_h = torch.empty(L * K, D, dtype=DTYPE, device="cuda")
    out_a = torch.empty(L * K, dtype=torch.float64, device="cuda")

    def step():
        victims = x["victims"].to("cuda", non_blocking=True)
        slots = order.gather(1, victims)  # [L, K]
        flat = (slots + base).view(-1)
        torch.index_select(flat_h, 0, flat, out=out_h)
        flat_h.index_copy_(0, flat, new_h)
        torch.index_select(flat_a, 0, flat, out=out_a)
        flat_a.index_copy_(0, flat, new_a)
        keep = torch.ones(L, N, dtype=torch.bool, device="cuda").scatter_(1, victims, False)
        order.copy_(torch.cat([order[keep].view(L, N - K), slots], dim=1))  # boolean indexing: one host sync
        return out_h

    return step


def run(rec: Recorder) -> None:
    try:
        x = _state()
    except Exception as exc:
        rec.note("memory_update", error=f"inputs: {type(exc).__name__}: {exc}")
        return
    group = "memory_update/mplus_size"
    rec.measure(group, "mplus", lambda: _mplus(x), shape=SHAPE, dtype=DTYPE, moved_bytes=MOVED)
    rec.measure(group, "torch_inplace", lambda: _torch_inplace(x), shape=SHAPE, dtype=DTYPE, moved_bytes=MOVED)
