"""Long-term memory: growth of the dropped-row cache and of the LTM, and the retrieval gather, at M+ sizes.

* cache cycle: 60 updates of 256 dropped rows (+ 256-wide keys) on 32 layers, bf16, d 4,096 — the official
  ``torch.cat`` of the whole cache per update vs the preallocated cache written in place: ``mplus`` with the store
  reused (a model's store keeps its 4 GiB cache buffer for its lifetime: every cycle after its first), ``mplus_alloc``
  with a fresh store per cycle (allocation and first-touch page faults included: a model's first cycle);
* LTM growth: 0 → 153,600 rows on 2 layers in 10 merges of 15,360 rows — ``torch.cat`` of the whole LTM per merge
  vs the store's capacity buffers: ``mplus`` grown 1.5× at a time from empty (allocation included: what a model built
  with the default ``ltm_capacity=0`` does), ``mplus_reserved`` reserved and paged in up front (``ltm_capacity`` sized
  for the store);
* gather: 2,560 selected rows of a 153,600 × 4,096 bf16 store — ``index_select`` on the concatenated sources, and
  a plain memcpy of the same bytes (the bandwidth ceiling), vs ``gather_rows_``.

Every provider of a group runs the same rounds; ``moved_bytes`` (the useful traffic: new rows written and read once)
is the same for every provider of a group; ``variant`` says which setting a provider measures.
"""

from __future__ import annotations

import pytest
import torch

import mplus_kernels as mk
from mplus.memory.ltm import LongTermMemory

DTYPE = torch.bfloat16
D, DS, K = 4096, 256, 256


def _dropped(num_layers, seed=0):
    gen = torch.Generator().manual_seed(seed)
    rows = torch.randn(num_layers, K, D, generator=gen).to(DTYPE)
    keys = torch.randn(num_layers, K, DS, generator=gen).to(DTYPE)
    ages = torch.arange(K, dtype=torch.float64).repeat(num_layers, 1)
    return rows, keys, ages


# ------------------------------------------------------------------------------------------------ cache cycle
CYCLE_LAYERS, CYCLE = 32, 60
CYCLE_ROUNDS, CYCLE_QUICK_ROUNDS = 2, 1  # the official cycle takes ~46 s per call
CYCLE_SHAPE = f"L{CYCLE_LAYERS} {CYCLE}x{K} rows d{D}"


def _cycle_bytes(rows, keys):
    return 2 * CYCLE * (rows.numel() + keys.numel()) * 2


def test_cache_cycle_official_cat(bench):
    rows, keys, ages = _dropped(CYCLE_LAYERS)

    def cycle():
        cache_rows = cache_keys = cache_ages = None
        for step in range(CYCLE):
            if step == 0:
                cache_rows, cache_keys, cache_ages = rows.clone(), keys.clone(), ages.clone()
            else:
                cache_ages += K
                cache_rows = torch.cat([cache_rows, rows], dim=1)
                cache_keys = torch.cat([cache_keys, keys], dim=1)
                cache_ages = torch.cat([cache_ages, ages], dim=1)
        return cache_rows.shape

    bench(
        cycle,
        group="ltm/cache_cycle",
        provider="official",
        shape=CYCLE_SHAPE,
        dtype=DTYPE,
        rounds=CYCLE_ROUNDS,
        quick_rounds=CYCLE_QUICK_ROUNDS,
        warmup_rounds=0,
        meter_in_rounds=True,  # no separate call for the memory: its rounds are metered
        moved_bytes=_cycle_bytes(rows, keys),
        variant="torch.cat of the whole cache per update",
    )


@pytest.mark.parametrize("reuse", [True, False], ids=["store-reused", "store-allocated"])
def test_cache_cycle_mplus(bench, reuse):
    """store-reused: the store (its 4 GiB cache buffer) lives as long as the model, each round clears it and runs
    the cycle; store-allocated: a fresh store per cycle, so allocation and first-touch page faults are included."""
    rows, keys, ages = _dropped(CYCLE_LAYERS)

    def new_store():
        # update_ltm_frequency one past the cycle, so the 60 updates fill the cache without merging
        return LongTermMemory(CYCLE_LAYERS, D, DS, num_tokens=K, update_ltm_frequency=CYCLE + 1, num_retrieved=2560,
                              dtype=DTYPE)  # fmt: skip

    kept = new_store() if reuse else None

    def cycle():
        ltm = kept if reuse else new_store()
        ltm.clear()
        for _ in range(CYCLE):
            ltm.push_dropped(keys, hidden=rows, age=ages)
        return ltm.cache_len

    variant = "store reused: a model's steady state" if reuse else "fresh store per cycle: allocation included"
    bench(cycle, group="ltm/cache_cycle", provider="mplus" if reuse else "mplus_alloc", shape=CYCLE_SHAPE,
          dtype=DTYPE, rounds=CYCLE_ROUNDS, quick_rounds=CYCLE_QUICK_ROUNDS, moved_bytes=_cycle_bytes(rows, keys),
          variant=variant)  # fmt: skip


# ------------------------------------------------------------------------------------------------- LTM growth
GROW_LAYERS, MERGES, MERGE_ROWS = 2, 10, 60 * K
GROW_ROUNDS, GROW_QUICK_ROUNDS = 3, 1
GROW_SHAPE = f"L{GROW_LAYERS} 0->{MERGES * MERGE_ROWS} rows d{D}"


@pytest.fixture(scope="module")
def merge_batch():
    gen = torch.Generator().manual_seed(1)
    return (
        torch.randn(GROW_LAYERS, MERGE_ROWS, D, generator=gen).to(DTYPE),
        torch.randn(GROW_LAYERS, MERGE_ROWS, DS, generator=gen).to(DTYPE),
    )


def test_ltm_growth_official_cat(bench, merge_batch):
    rows, keys = merge_batch

    def grow():
        ltm = [torch.empty(0, D, dtype=DTYPE) for _ in range(GROW_LAYERS)]
        ltm_keys = [torch.empty(0, DS, dtype=DTYPE) for _ in range(GROW_LAYERS)]
        for _ in range(MERGES):
            for layer in range(GROW_LAYERS):
                ltm[layer] = torch.cat([ltm[layer], rows[layer]])
                ltm_keys[layer] = torch.cat([ltm_keys[layer], keys[layer]])
        return ltm[0].shape

    bench(
        grow,
        group="ltm/growth",
        provider="official",
        shape=GROW_SHAPE,
        dtype=DTYPE,
        rounds=GROW_ROUNDS,
        quick_rounds=GROW_QUICK_ROUNDS,
        moved_bytes=2 * 2 * MERGES * rows.numel() * 2,
        variant="torch.cat of the whole LTM per merge",
    )


@pytest.mark.parametrize("reserve", [True, False], ids=["reserved", "grown"])
def test_ltm_growth_mplus(bench, merge_batch, reserve):
    """reserved: the store is allocated once with its final capacity (a model built with ``ltm_capacity``) and each
    round clears it and grows it again in place; grown: a fresh store starts at capacity 0 and grows 1.5× at a time
    (a model built with the default ``ltm_capacity=0``)."""
    rows, keys = merge_batch
    ages = torch.zeros(GROW_LAYERS, MERGE_ROWS, dtype=torch.float64)

    def new_store(capacity):
        return LongTermMemory(
            GROW_LAYERS,
            D,
            DS,
            num_tokens=MERGE_ROWS,
            update_ltm_frequency=1,
            num_retrieved=2560,
            initial_rf=1e9,
            dtype=DTYPE,
            capacity=capacity,
        )

    reserved = new_store(MERGES * MERGE_ROWS) if reserve else None

    def grow():
        ltm = reserved if reserve else new_store(0)
        ltm.clear()
        for _ in range(MERGES):
            ltm.push_dropped(keys, hidden=rows, age=ages)  # frequency 1: every push merges
        return ltm.size[0]

    bench(
        grow,
        group="ltm/growth",
        provider="mplus_reserved" if reserve else "mplus",
        shape=GROW_SHAPE,
        dtype=DTYPE,
        rounds=GROW_ROUNDS,
        quick_rounds=GROW_QUICK_ROUNDS,
        moved_bytes=2 * 2 * MERGES * rows.numel() * 2,
        variant="store reserved and paged in up front" if reserve else "grown from empty: allocation included",
    )


# ------------------------------------------------------------------------------------------------------ gather
STORE_ROWS, CACHE_ROWS, K0 = 153_600, 15_104, 2560


@pytest.fixture(scope="module")
def store():
    gen = torch.Generator().manual_seed(2)
    ltm = torch.randn(STORE_ROWS, D, generator=gen).to(DTYPE)
    cache = torch.randn(CACHE_ROWS, D, generator=gen).to(DTYPE)
    index = torch.randperm(STORE_ROWS + CACHE_ROWS, generator=gen)[:K0]
    return ltm, cache, index


def _gather_info():
    return dict(group="ltm/gather", shape=f"{K0} of {STORE_ROWS}+{CACHE_ROWS} rows x d{D}", dtype=DTYPE)


def test_gather_index_select(bench, store):
    ltm, cache, index = store
    in_ltm = index < STORE_ROWS

    def gather():  # without concatenating the store: two index_selects and a scatter into the output
        out = torch.empty(K0, D, dtype=DTYPE)
        out[in_ltm] = ltm.index_select(0, index[in_ltm])
        out[~in_ltm] = cache.index_select(0, index[~in_ltm] - STORE_ROWS)
        return out

    bench(gather, provider="index_select", rounds=20, moved_bytes=2 * K0 * D * 2, **_gather_info())


def test_gather_memcpy_ceiling(bench, store):
    ltm, _, _ = store
    src, out = ltm[:K0], torch.empty(K0, D, dtype=DTYPE)
    bench(lambda: out.copy_(src), provider="memcpy", rounds=20, moved_bytes=2 * K0 * D * 2, **_gather_info())


def test_gather_mplus(bench, store):
    ltm, cache, index = store
    out = torch.empty(K0, D, dtype=DTYPE)
    bench(
        lambda: mk.gather_rows_(out, ltm, cache, index),
        provider="mplus",
        rounds=20,
        moved_bytes=2 * K0 * D * 2,
        **_gather_info(),
    )
