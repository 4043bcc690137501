"""Issue 19, item 0: documented memory rules that no other test held (each survived its deletion).

A. The eviction floor (SPEC.md §4.4, ``LongTermMemory.merge``): at a merge every recall frequency drops by
   ``decay_frequency`` and the rows left at rf <= 0.01 are evicted — unless only ``num_retrieved`` (K0) rows or fewer
   would remain: then nothing is evicted and the decay is undone. The floor is decided per layer. The training replay
   ``LongTermMemory.after_pushes`` applies the same rule to updates not pushed yet.
B. Every load of a memory advances its version (``load_memory`` into a model or into a ``MemoryState``,
   ``load_official_memory``), so a generation cache prefilled before the load raises ``StaleCacheError`` after it.

Part A drives a small store through ``push_dropped`` as the model does. Every row carries its own id (its hidden row,
retriever keys and K/V are filled with it), so the rows a merge keeps are read back from ``ltm_tensors(ltm)``.
"""

from __future__ import annotations

import copy

import pytest
import torch
from _golden import GOLDEN, load_state

from mplus import MemoryState, StaleCacheError
from mplus.checkpoint import load_memory, load_official_memory, save_memory
from mplus.memory.ltm import LongTermMemory
from mplus.memory.serialization import ltm_tensors
from mplus.model import MPlusForCausalLM

# ------------------------------------------------------------------------------------------ A. the eviction floor
L, D, DS, KV = 2, 8, 4, (1, 2)  # layers, hidden size, key width, (Hkv, head dim) of the kept K/V
K, FREQ = 2, 2  # rows dropped per update; a merge every FREQ updates (K · FREQ = 4 rows per merge)
K0 = 4  # num_retrieved: the eviction floor
RF0, DECAY = 2.0, 1.0  # a merged row enters at rf 2 and, once the decay sticks, is evicted two merges later
PIN = 1000.0  # id of a row loaded into layer 1 only, with an rf that never runs out: layer 1 keeps one more row


def _store() -> LongTermMemory:
    """A store whose layer 1 holds one loaded row (rf 100) before the first push; layer 0 starts empty."""
    ltm = LongTermMemory(
        L, D, DS, num_tokens=K, update_ltm_frequency=FREQ, num_retrieved=K0, decay_frequency=DECAY, initial_rf=RF0,
        kv_shape=KV,
    )  # fmt: skip
    row = torch.full((1, D), PIN)
    kv = (torch.full((1, *KV), PIN), torch.full((1, *KV), PIN))
    ltm.append_rows_(1, row, torch.full((1, DS), PIN), torch.zeros(1, dtype=torch.float64),
                     torch.full((1,), 100.0, dtype=torch.float64), kv=kv)  # fmt: skip
    return ltm


def _ids(push: int) -> torch.Tensor:
    """Ids ``[L, K]`` of the rows dropped by update ``push`` (1-based): ``10 · push + row``, the same in each layer."""
    return (10.0 * push + torch.arange(K, dtype=torch.float32)).expand(L, K)


def _push(ltm: LongTermMemory, push: int) -> bool:
    ids = _ids(push)[..., None]
    return ltm.push_dropped(
        ids.expand(L, K, DS).clone(),
        hidden=ids.expand(L, K, D).clone(),
        age=torch.zeros(L, K, dtype=torch.float64),
        kv=(ids[..., None].expand(L, K, *KV).clone(), ids[..., None].expand(L, K, *KV).clone()),
    )


def _held(ltm: LongTermMemory, layer: int) -> tuple[list[float], list[float]]:
    """(row ids, recall frequencies) of ``layer``'s long-term rows, in order; checks that each row's keys and K/V
    travelled with it through every compaction."""
    sd = ltm_tensors(ltm)
    ids = sd[f"ltm.{layer}"][:, 0]
    for name, t in [("ltm", sd[f"ltm.{layer}"]), ("ltm_keys", sd[f"ltm_keys.{layer}"]),
                    ("ltm_k", sd[f"ltm_k.{layer}"]), ("ltm_v", sd[f"ltm_v.{layer}"])]:  # fmt: skip
        assert torch.equal(t.flatten(1), ids[:, None].expand(-1, t[0].numel())), f"{name}.{layer} lost its rows"
    return ids.tolist(), sd[f"ltm_recall_frequencies.{layer}"].tolist()


def _cached(ltm: LongTermMemory, layer: int) -> list[float]:
    return ltm_tensors(ltm)["cached_dropped_memories"][layer, :, 0].tolist()


def _batch(*pushes: int) -> list[float]:
    """The ids of the rows of these updates, in order (one layer)."""
    return [v for p in pushes for v in _ids(p)[0].tolist()]


def test_a_merge_that_would_leave_k0_rows_or_fewer_evicts_nothing_and_undoes_the_decay():
    """The floor of ``merge``, at its boundary, and the eviction beside it in the same merge.

    Rows A, B, C are those of updates 1-2, 3-4, 5-6. Merge 1: layer 0 holds 4 rows <= K0, all alive, and the floor
    still undoes the decay (A at rf 2: pinned by the checks before merge 3); layer 1 (the pin + A: 5 rows) keeps its
    decay (A at 1). Merge 2: 8 alive rows in layer 0, 5 in layer 1, both > K0: the decay sticks (layer 0: A 1, B 1)
    and layer 1 evicts A. Merge 3 is the one under test: after the decay A and B are at rf 0 in layer 0 and only C
    (4 = K0 rows) would survive, so nothing is evicted and every frequency is exactly what it was before the decay
    (the old rows' values, C at initial_rf); in layer 1 the pin + C are 5 > K0 survivors, so B is evicted and the
    decay stays.
    """
    torch.manual_seed(0)
    ltm = _store()
    merges = [_push(ltm, push) for push in range(1, 5)]
    assert merges == [False, True, False, True]
    assert _held(ltm, 0) == (_batch(1, 2, 3, 4), [1.0] * 8)
    assert _held(ltm, 1) == ([PIN, *_batch(3, 4)], [98.0, 1.0, 1.0, 1.0, 1.0])
    before = {layer: _held(ltm, layer)[1] + [RF0] * (K * FREQ) for layer in range(L)}  # rf right before merge 3's decay

    assert not _push(ltm, 5)
    assert _push(ltm, 6)  # merge 3

    ids, rf = _held(ltm, 0)
    assert ids == _batch(1, 2, 3, 4, 5, 6), "layer 0: the floor (4 survivors = K0) must keep every row"
    assert rf == before[0] == [1.0] * 8 + [RF0] * 4, "layer 0: the decay must be undone exactly"
    ids, rf = _held(ltm, 1)
    assert ids == [PIN, *_batch(5, 6)], "layer 1: 5 survivors > K0, the rows at rf 0 must be evicted"
    assert rf == [97.0, 1.0, 1.0, 1.0, 1.0], "layer 1: the decay must stay"
    assert ltm.size == [12, 5] and ltm.cache_len == 0


def test_a_merge_above_the_floor_evicts_every_row_at_rf_0():
    """The companion of the floor: with K0 = 3 the 4 rows of a new batch are enough, so each merge after the first
    evicts the batch before it (FIFO by merge batch, SPEC.md §4.4) in both layers and the decay always stays."""
    torch.manual_seed(0)
    ltm = LongTermMemory(L, D, DS, num_tokens=K, update_ltm_frequency=FREQ, num_retrieved=3, decay_frequency=DECAY,
                         initial_rf=RF0, kv_shape=KV)  # fmt: skip
    for push in range(1, 7):
        _push(ltm, push)
        if push % FREQ == 0:
            batch = _batch(push - 1, push)
            for layer in range(L):
                assert _held(ltm, layer) == (batch, [RF0 - DECAY] * 4), f"after merge {push // FREQ}, layer {layer}"


@pytest.mark.parametrize("pushes", [1, 2, 4])
def test_after_pushes_keeps_what_the_pushes_and_merges_would_keep(pushes):
    """``after_pushes`` replays the floor: from the store after 5 updates (merges 1-2 done, update 5 cached), its mask
    over [LTM ; cache ; pushed rows] flags exactly the rows a deep copy holds after ``pushes`` more updates, and the
    first ``merged`` of them are its long-term rows. One more update triggers merge 3: layer 0 is at the floor, its
    mask keeps every row; layer 1 evicts rows B. With two, the second update's rows stay cached after merge 3; four
    also run merge 4, where layer 0 evicts rows A and B (8 survivors > K0) and layer 1 rows C."""
    torch.manual_seed(0)
    ltm = _store()
    for push in range(1, 6):
        _push(ltm, push)
    before = [_held(ltm, layer)[0] + _cached(ltm, layer) + _batch(*range(6, 6 + pushes)) for layer in range(L)]
    state = {k: v.clone() for k, v in ltm_tensors(ltm).items()}

    alive = ltm.after_pushes(pushes)
    after = ltm_tensors(ltm)
    assert all(torch.equal(after[k], v) for k, v in state.items()), "after_pushes must change nothing"
    real = copy.deepcopy(ltm)
    for push in range(6, 6 + pushes):
        _push(real, push)

    assert alive is not None and len(alive) == L
    for layer, (mask, merged) in enumerate(alive):
        assert mask.dtype == torch.bool and mask.shape == (len(before[layer]),)
        kept = torch.tensor(before[layer])[mask].tolist()
        held, cached = _held(real, layer)[0], _cached(real, layer)
        assert kept == held + cached, f"layer {layer}: the mask must flag the rows the pushes and merges keep"
        assert int(mask[:merged].sum()) == len(held) and int(mask[merged:].sum()) == len(cached), f"layer {layer}"
    if pushes == 1:
        assert bool(alive[0][0].all()), "layer 0 is at the floor: every row stays"
        assert alive[1][0].tolist() == [True] + [False] * 4 + [True] * 4  # the pin and rows C; B evicted


# --------------------------------------------------------------------------------------- B. a load is a new version
PROMPT = torch.tensor([[7, 8, 9, 10, 11]])


def _model() -> MPlusForCausalLM:
    return MPlusForCausalLM.from_pretrained(str(GOLDEN / "model"), max_length=64)


@pytest.fixture(scope="module")
def memory_file(tmp_path_factory) -> str:
    """A saved memory unlike a fresh model's (one injection)."""
    donor = _model()
    torch.manual_seed(19)
    donor.inject(load_state(1)["context_ids"])
    path = str(tmp_path_factory.mktemp("memory") / "memory.safetensors")
    save_memory(donor, path)
    return path


def _assert_stale(model: MPlusForCausalLM, cache) -> None:
    with pytest.raises(StaleCacheError, match="memory has changed since"):
        model(torch.tensor([[4]]), past_key_values=cache)
    with pytest.raises(StaleCacheError, match="decode_step: this generation cache"):
        model.decode_step(torch.tensor([[4]]), torch.tensor([cache.length]), cache)


def test_load_memory_makes_a_cache_prefilled_before_it_stale(memory_file):
    """``load_memory(model, path)`` advances ``model.memory_version``: a cache prefilled before the load refuses to
    decode against the loaded memory (forward and decode_step); a cache prefilled after it works."""
    torch.manual_seed(0)
    model = _model()
    cache = model(PROMPT).past_key_values
    model(torch.tensor([[3]]), past_key_values=cache)  # same memory: fine
    version = model.memory_version
    load_memory(model, memory_file)
    _assert_stale(model, cache)
    assert model.memory_version > version
    fresh = model(PROMPT).past_key_values
    model(torch.tensor([[4]]), past_key_values=fresh)
    model.decode_step(torch.tensor([[5]]), torch.tensor([fresh.length]), fresh)


def test_load_memory_into_a_memory_state_makes_only_its_caches_stale(memory_file):
    """``load_memory(state, path)`` into a non-default ``MemoryState`` advances that state's version only: its caches
    go stale, those of the model's default memory stay valid. (``MemoryState.load`` makes a new state at version 0,
    which no cache can have been prefilled on.)"""
    torch.manual_seed(0)
    model = _model()
    state = model.new_memory(seed=1)
    assert isinstance(state, MemoryState)
    on_state = model(PROMPT, memory=state).past_key_values
    on_default = model(PROMPT).past_key_values
    version, default_version = state.version, model.memory_version
    load_memory(state, memory_file)
    _assert_stale(model, on_state)
    assert state.version > version and model.memory_version == default_version
    model(torch.tensor([[4]]), past_key_values=on_default)  # the default memory did not change


def test_load_official_memory_makes_a_cache_prefilled_before_it_stale():
    """``load_official_memory(model, state)`` (an official inference-form state: the golden state after injection
    4) advances ``model.memory_version``, so a cache prefilled before it raises ``StaleCacheError``."""
    torch.manual_seed(0)
    model = _model()
    cache = model(PROMPT).past_key_values
    version = model.memory_version
    load_official_memory(model, load_state(4))
    _assert_stale(model, cache)
    assert model.memory_version > version
    fresh = model(PROMPT).past_key_values
    model(torch.tensor([[4]]), past_key_values=fresh)
