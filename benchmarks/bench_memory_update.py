"""Memory update at M+ size: fused op vs the official cat pattern and a pure-PyTorch in-place version.

M+ size: L 32 layers, N 10,240 slots, d 4,096, K 256 new rows per update, bf16 (hidden rows) + float64 ages
(as the official ``memory_ages``). Every provider applies the same victims to its own copy of the same memory.
The fused op writes the dropped rows into caller-owned buffers (as the long-term cache does), so its peak extra
memory is its own scratch only. A second group shows the fused cost against N and K (L 4). ``moved_bytes`` is the
update's useful traffic for every provider: the K dropped rows read and written out, the K new rows read and written
in, per layer (the official cat moves far more: the whole memory). Every provider runs ``ROUNDS`` rounds.
"""

from __future__ import annotations

import pytest
import torch

import mplus_kernels as mk

L, N, D, K = 32, 10240, 4096, 256
DTYPE = torch.bfloat16
ROUNDS, QUICK_ROUNDS = 10, 3  # every provider of a group the same (make bench: QUICK_ROUNDS)
MOVED = 4 * L * K * D * 2  # bytes: dropped rows out (read + write), new rows in (read + write)


def _state(num_layers, n, d, k, seed=0):
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(num_layers, n, d, generator=gen).to(DTYPE)
    age = torch.zeros(num_layers, n, dtype=torch.float64)
    new = torch.randn(num_layers, k, d, generator=gen).to(DTYPE)
    new_age = torch.arange(k - 1, -1, -1, dtype=torch.float64).repeat(num_layers, 1)
    victims = mk.draw_victims(num_layers, n, k, gen)
    return hidden, age, new, new_age, victims


@pytest.fixture(scope="module")
def mplus_size():
    return _state(L, N, D, K)


def _shape(num_layers=L, n=N, d=D, k=K):
    return f"L{num_layers} N{n} d{d} K{k}"


def test_official_cat(bench, mplus_size):
    hidden, age, new, new_age, victims = mplus_size
    memory, ages = hidden.clone(), age.clone()
    bench(
        lambda: mk.official_memory_update_([memory, ages], victims, [new, new_age]),
        group="memory_update/mplus_size",
        provider="official",
        shape=_shape(),
        dtype=DTYPE,
        rounds=ROUNDS,
        quick_rounds=QUICK_ROUNDS,
        moved_bytes=MOVED,
    )


def test_torch_inplace(bench, mplus_size):
    """Slots written in place with index ops (the best pure-PyTorch version): dropped rows out, new rows in."""
    hidden, age, new, new_age, victims = mplus_size
    hidden = hidden.clone()
    order = torch.arange(N).repeat(L, 1)
    out_h = torch.empty(L, K, D, dtype=DTYPE)
    out_a = torch.empty(L, K, dtype=torch.float64)

    def step():
        slots = order.gather(1, victims)
        for layer in range(L):
            out_h[layer] = hidden[layer].index_select(0, slots[layer])
            hidden[layer].index_copy_(0, slots[layer], new[layer])
            out_a[layer] = age[layer].index_select(0, slots[layer])
            age[layer].index_copy_(0, slots[layer], new_age[layer])
        keep = torch.ones(L, N, dtype=torch.bool)
        keep.scatter_(1, victims, False)
        order.copy_(torch.cat([order[keep].view(L, N - K), slots], dim=1))

    bench(step, group="memory_update/mplus_size", provider="torch_inplace", shape=_shape(), dtype=DTYPE, rounds=ROUNDS,
          quick_rounds=QUICK_ROUNDS, moved_bytes=MOVED)  # fmt: skip


def test_mplus(bench, mplus_size):
    hidden, age, new, new_age, victims = mplus_size
    hidden = hidden.clone()
    pos = torch.arange(N, dtype=torch.int32).repeat(L, 1)
    order = pos.clone()
    dropped = [torch.empty(L, K, D, dtype=DTYPE), torch.empty(L, K, dtype=torch.float64)]
    bench(
        lambda: mk.memory_update_(pos, order, victims, [hidden, age], [new, new_age], dropped=dropped),
        group="memory_update/mplus_size",
        provider="mplus",
        shape=_shape(),
        dtype=DTYPE,
        rounds=ROUNDS,
        quick_rounds=QUICK_ROUNDS,
        moved_bytes=MOVED,
    )


@pytest.mark.parametrize(("n", "k"), [(2560, 256), (10240, 256), (40960, 256), (10240, 64), (10240, 1024)])
def test_mplus_scaling(bench, n, k):
    """Cost should follow K·d (rows moved), not N·d: N grows 16× at fixed K."""
    num_layers = 4
    hidden, age, new, new_age, victims = _state(num_layers, n, D, k, seed=1)
    pos = torch.arange(n, dtype=torch.int32).repeat(num_layers, 1)
    order = pos.clone()
    dropped = [torch.empty(num_layers, k, D, dtype=DTYPE), torch.empty(num_layers, k, dtype=torch.float64)]
    bench(
        lambda: mk.memory_update_(pos, order, victims, [hidden, age], [new, new_age], dropped=dropped),
        group=f"memory_update/scaling/N{n}_K{k}",
        provider="mplus",
        shape=_shape(num_layers, n, D, k),
        dtype=DTYPE,
        rounds=20,
    )
