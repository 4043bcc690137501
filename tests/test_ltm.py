"""The long-term memory store: golden replay of the official bookkeeping, retrieval against the official run,
growth, compaction, budget, save/load, bad input."""

from __future__ import annotations

import pytest
import torch
from _golden import GOLDEN, load_state
from safetensors.torch import load_file, save_file

from mplus import ShortTermMemory
from mplus.llama import rms_norm
from mplus.memory.buffers import compact_, row_runs
from mplus.memory.ltm import LongTermMemory, LTMBudgetError
from mplus.memory.serialization import load_ltm_tensors, ltm_tensors
from mplus.retriever import Projector
from mplus_kernels.testing import assert_close, assert_equal

L, D, DS, K, K0 = 3, 64, 16, 8, 16
EPS = 1e-5


@pytest.fixture(scope="module")
def checkpoint():
    return load_file(str(GOLDEN / "model" / "model.safetensors"))


def _projector(ckpt: dict, layer: int, name: str) -> Projector:
    proj = Projector(D, DS)
    proj[0].weight.data.copy_(ckpt[f"model.layers.{layer}.self_attn.{name}.0.weight"])
    proj[2].weight.data.copy_(ckpt[f"model.layers.{layer}.self_attn.{name}.2.weight"])
    return proj


def _norm(ckpt: dict, layer: int) -> torch.Tensor:
    return ckpt[f"model.layers.{layer}.input_layernorm.weight"]


def _store(**kwargs) -> LongTermMemory:
    args = dict(num_tokens=K, update_ltm_frequency=2, num_retrieved=K0, decay_frequency=1, initial_rf=3)
    args.update(kwargs)
    return LongTermMemory(L, D, DS, **args)


def _load_official(ltm: LongTermMemory, state: dict) -> None:
    """An official inference-form state (ages int32 → truncated like put_ltm_to_numpy, frequencies exact)."""
    sd = {k: v for k, v in state.items() if k.startswith("ltm")}
    if "cached_dropped_memories" in state:
        sd["cached_dropped_memories"] = state["cached_dropped_memories"]
        sd["cached_dropped_keys"] = state["cached_dropped_keys"]
        sd["cached_dropped_memory_ages"] = state["cached_dropped_memory_ages"]
    else:  # after a merge the official cache is None (its stale keys are ignored)
        sd["cached_dropped_memories"] = torch.empty(L, 0, D)
        sd["cached_dropped_keys"] = torch.empty(L, 0, DS)
        sd["cached_dropped_memory_ages"] = torch.empty(L, 0, dtype=torch.float64)
    sd["update_step"] = state["update_step"]
    for layer in range(L):
        sd[f"ltm_ages.{layer}"] = sd[f"ltm_ages.{layer}"].double().trunc()
    load_ltm_tensors(ltm, sd)


def _compare(ltm: LongTermMemory, golden: dict, step: int) -> None:
    for layer in range(L):
        n = ltm.size[layer]
        assert n == golden[f"ltm.{layer}"].shape[0], f"injection {step}, layer {layer}: LTM size"
        assert_equal(ltm.hidden[layer][:n], golden[f"ltm.{layer}"], name=f"ltm.{layer} after {step}")
        assert_close(ltm.keys[layer][:n], golden[f"ltm_keys.{layer}"], name=f"ltm_keys.{layer} after {step}")
        assert_equal(ltm.age[layer][:n], golden[f"ltm_ages.{layer}"].double(), name=f"ltm_ages.{layer} after {step}")
        assert_equal(
            ltm.rf[layer][:n],
            golden[f"ltm_recall_frequencies.{layer}"].double(),
            name=f"ltm_recall_frequencies.{layer} after {step}",
        )
    assert ltm.update_step == int(golden["update_step"][0])
    if "cached_dropped_memories" in golden:
        m = golden["cached_dropped_memories"].shape[1]
        assert ltm.cache_len == m
        assert_equal(ltm.cache_hidden[:, :m], golden["cached_dropped_memories"], name=f"cache rows after {step}")
        assert_equal(ltm.cache_age[:, :m], golden["cached_dropped_memory_ages"], name=f"cache ages after {step}")
        assert_close(ltm.cache_keys[:, :m], golden["cached_dropped_keys"], name=f"cache keys after {step}")
    else:
        assert ltm.cache_len == 0, f"the cache must be empty after the merge of injection {step}"


@pytest.mark.parametrize("zero_copy", [True, False], ids=["dropped-into-cache", "copied"])
@pytest.mark.parametrize("capacity", [0, 64])
def test_golden_replay_of_five_injections(checkpoint, zero_copy, capacity):
    """Replaying the official run (its delta memories and drop choices) gives its LTM, cache, ages and recall
    frequencies after every injection, including two merges with evictions and a context shorter than K."""
    initial = load_state(0)
    stm = ShortTermMemory(initial["memory"].clone(), initial["memory_ages"].clone())
    ltm = _store(capacity=capacity)
    _load_official(ltm, initial)
    key_proj = [_projector(checkpoint, layer, "key_proj") for layer in range(L)]
    for step in range(1, 6):
        golden = load_state(step)
        views = ltm.cache_views(K) if zero_copy else None
        out = stm.update(golden["delta_memory"][0], victims=golden["drop_dropped_indices"], dropped=views)
        keys = torch.stack(
            [key_proj[layer](rms_norm(out.hidden[layer], _norm(checkpoint, layer), EPS)) for layer in range(L)]
        )
        merged = ltm.push_dropped(
            keys, written=zero_copy, hidden=None if zero_copy else out.hidden, age=None if zero_copy else out.age
        )
        assert merged == (step in (2, 4))
        _compare(ltm, golden, step)
        assert_equal(stm.logical("hidden"), golden["memory"], name=f"memory after {step}")


def _queries(checkpoint: dict, forward: dict, layer: int) -> torch.Tensor:
    h = forward[f"hidden_states.{layer}"][0]
    return _projector(checkpoint, layer, "query_proj")(rms_norm(h, _norm(checkpoint, layer), EPS)).detach()


@pytest.mark.parametrize("backend", ["cpp", "triton", "reference"])
@pytest.mark.parametrize(
    ("state_k", "name"),
    [(3, "c_forward_after_inject3"), (4, "c_forward_after_inject4"), (5, "c_forward_after_inject5")],
)
def test_retrieval_matches_the_official_run(checkpoint, backend, state_k, name):
    """Scores, selected set, age order (stable tie rule) and gathered rows equal what the official get_ltm did."""
    ltm = _store()
    _load_official(ltm, load_state(state_k))
    forward = load_file(str(GOLDEN / "stable_argsort" / f"{name}.safetensors"))
    for layer in range(L):
        got = ltm.retrieve(layer, _queries(checkpoint, forward, layer), mode="reference", backend=backend)
        assert_equal(got.index.sort().values, forward[f"layer{layer}.topk_indices_sorted"], name=f"layer {layer} set")
        assert_close(
            got.scores,
            forward[f"layer{layer}.retrieval_scores"][got.index],
            atol=1e-6,
            rtol=1e-5,
            name=f"layer {layer} scores",
        )
        assert_equal(got.hidden, forward[f"layer{layer}.retrieved_ltm"], name=f"layer {layer} rows, oldest first")


def test_small_ltm_reference_rule(checkpoint):
    """Fewer LTM rows than K0: no scoring, the official repeat rule (rows duplicated), ordered by age."""
    state = dict(load_state(0))
    for layer in range(L):
        for key in ("ltm", "ltm_keys", "ltm_ages", "ltm_recall_frequencies"):
            state[f"{key}.{layer}"] = state[f"{key}.{layer}"][:10]
    ltm = _store()
    _load_official(ltm, state)
    forward = load_file(str(GOLDEN / "stable_argsort" / "c_forward_small_ltm.safetensors"))
    for layer in range(L):
        got = ltm.retrieve(layer, _queries(checkpoint, forward, layer), mode="reference")
        assert got.scores is None
        assert_equal(got.hidden, forward[f"layer{layer}.retrieved_ltm"], name=f"layer {layer} rows")
        fast = ltm.retrieve(layer, torch.zeros(1, DS), mode="fast")
        assert sorted(fast.index.tolist()) == list(range(10)), "fast mode returns each row once"


def test_empty_ltm_returns_nothing_instead_of_hanging():
    ltm = _store()
    for mode in ("reference", "fast"):
        got = ltm.retrieve(0, torch.randn(4, DS), mode=mode)
        assert got.index.numel() == 0 and got.hidden.shape == (0, D)


def test_compaction_moves_runs_in_place():
    buf = torch.arange(20.0).reshape(10, 2)
    keep = torch.tensor([2, 3, 4, 7, 9])
    expected = buf[keep].clone()
    compact_(buf, row_runs(keep))
    assert_equal(buf[:5], expected, name="compacted rows")
    assert row_runs(torch.tensor([0, 1, 2, 5, 6, 9])) == [(0, 3), (5, 2), (9, 1)]


def test_growth_is_amortised_and_budget_is_enforced():
    ltm = _store(capacity=0)
    ptrs = set()
    for i in range(40):
        ltm.append_rows_(0, torch.full((5, D), float(i)), torch.zeros(5, DS), torch.zeros(5), torch.ones(5))
        ptrs.add(ltm.hidden[0].data_ptr())
    assert ltm.size[0] == 200 and len(ptrs) < 15, "capacity must grow geometrically, not per append"
    assert_equal(ltm.hidden[0][195:200], torch.full((5, D), 39.0), name="last rows")
    tight = _store(capacity=8, budget_bytes=_store(capacity=8).nbytes() + 1024)
    before = tight.nbytes()
    with pytest.raises(LTMBudgetError, match="over the budget"):
        tight.append_rows_(1, torch.zeros(100, D), torch.zeros(100, DS), torch.zeros(100), torch.ones(100))
    assert tight.nbytes() == before and tight.size[1] == 0, "a refused growth changes nothing"
    with pytest.raises(LTMBudgetError, match="allocating the store"):
        _store(capacity=10_000, budget_bytes=2**20)


def test_save_load_round_trip(tmp_path, checkpoint):
    ltm = _store(kv_shape=(2, 4))
    state = load_state(3)
    sd = {k: v for k, v in state.items() if k.startswith(("ltm", "cached")) or k == "update_step"}
    for layer in range(L):
        n = state[f"ltm.{layer}"].shape[0]
        sd[f"ltm_k.{layer}"], sd[f"ltm_v.{layer}"] = torch.randn(n, 2, 4), torch.randn(n, 2, 4)
        sd[f"ltm_ages.{layer}"] = sd[f"ltm_ages.{layer}"].double()
    sd["cached_dropped_k"], sd["cached_dropped_v"] = torch.randn(L, 8, 2, 4), torch.randn(L, 8, 2, 4)
    load_ltm_tensors(ltm, sd)
    path = tmp_path / "ltm.safetensors"
    save_file(ltm_tensors(ltm), str(path))  # a store's file: the mplus memory file's ltm_store.* part
    again = _store(kv_shape=(2, 4))
    load_ltm_tensors(again, load_file(str(path)))
    a, b = ltm_tensors(ltm), ltm_tensors(again)
    assert a.keys() == b.keys()
    for key in a:
        assert_equal(b[key], a[key], name=key)


def test_bad_input_leaves_the_store_unchanged():
    ltm = _store()
    _load_official(ltm, load_state(1))
    before = ltm_tensors(ltm)
    with pytest.raises(ValueError, match=r"keys must be \[L=3, k, ds=16\]"):
        ltm.push_dropped(torch.zeros(3, 8, 15), hidden=torch.zeros(3, 8, D), age=torch.zeros(3, 8))
    with pytest.raises(ValueError, match="overflow the cache"):
        ltm.push_dropped(torch.zeros(3, 9, DS), hidden=torch.zeros(3, 9, D), age=torch.zeros(3, 9))
    with pytest.raises(ValueError, match="give hidden and age"):
        ltm.push_dropped(torch.zeros(3, 8, DS))
    with pytest.raises(ValueError, match=r"num_retrieved=-1 must be >= 0"):
        ltm.retrieve(0, torch.zeros(2, DS), num_retrieved=-1)
    with pytest.raises(ValueError, match=r"append_rows_: hidden"):
        ltm.append_rows_(0, torch.zeros(2, D + 1), torch.zeros(2, DS), torch.zeros(2), torch.zeros(2))
    after = ltm_tensors(ltm)
    for key in before:
        assert_equal(after[key], before[key], name=key)
