"""Issue 19: ``MemoryState`` owns every change (two phases: ``plan_update``/``plan_load`` check, allocate and draw
and touch nothing; ``commit`` writes; ``mutate`` advances the version once) and owns its bytes (every tensor a
registered buffer: ``state_dict``, ``named_buffers``, ``to_empty`` see exactly the memory)."""

from __future__ import annotations

import copy

import pytest
import torch
from _golden import GOLDEN, load_state
from safetensors.torch import load_file

from mplus.checkpoint import load_official_state, memory_state
from mplus.memory.eviction import decay_and_evict
from mplus.memory.state import MemoryState
from mplus.model import MPlusForCausalLM
from mplus.update import commit_update
from mplus_kernels.testing import assert_equal

MODEL_DIR = str(GOLDEN / "model")
PROMPT = torch.tensor([[7, 8, 9, 10, 11]])


def _model(**kw) -> MPlusForCausalLM:
    return MPlusForCausalLM.from_pretrained(MODEL_DIR, max_length=64, **kw)


def _contexts() -> list[torch.Tensor]:
    return [load_state(step)["context_ids"] for step in range(1, 6)]


def _snapshot(state: MemoryState) -> dict[str, object]:
    out: dict[str, object] = {k: v.clone() for k, v in memory_state(state).items()}
    out["rng"] = state.rng_state().clone()
    out["version"] = state.version
    if state.ltm is not None:
        out["counters"] = (list(state.ltm.size), state.ltm.cache_len, state.ltm.update_step)
        out["capacity"] = [state.ltm.capacity(layer) for layer in range(state.ltm.num_layers)]
    return out


def _assert_same(after: dict, before: dict) -> None:
    assert after.keys() == before.keys()
    for key, value in before.items():
        if isinstance(value, torch.Tensor):
            assert_equal(after[key], value, name=key)
        else:
            assert after[key] == value, key


def _used(model: MPlusForCausalLM, n: int = 3) -> MPlusForCausalLM:
    torch.manual_seed(5)
    for ids in _contexts()[:n]:
        model.inject(ids)
    return model


@torch.no_grad()
def _delta(model: MPlusForCausalLM, ids: torch.Tensor):
    delta = model.inject(ids, update_memory=False)
    with model.adapters.use("decoder_adapter"):
        kv = [layer.memory_kv(delta[i]) for i, layer in enumerate(model.layers)]
    return delta, torch.stack([k for k, _ in kv]), torch.stack([v for _, v in kv])


def _keys_of(model: MPlusForCausalLM):
    @torch.no_grad()
    def keys_of(rows: torch.Tensor) -> torch.Tensor:
        return torch.stack(
            [layer.self_attn.key_proj(layer.input_layernorm(rows[i])) for i, layer in enumerate(model.layers)]
        )

    return keys_of


# ------------------------------------------------------------------------------------------------ the eviction rule
def test_the_eviction_rule_decays_evicts_and_keeps_a_floor():
    rf = torch.tensor([10.0, 1.0, 0.5, 3.0], dtype=torch.float64)
    after, keep = decay_and_evict(rf, 1.0, floor=1)
    assert_equal(after, rf - 1.0, name="decayed")
    assert keep.tolist() == [True, False, False, True]
    after, keep = decay_and_evict(rf, 1.0, floor=2)  # 2 survivors: not more than the floor, the decay is undone
    assert keep is None
    assert_equal(after, (rf - 1.0) + 1.0, name="undone")
    after, keep = decay_and_evict(rf, 0.25, floor=0)  # every row survives: no mask
    assert keep is None and torch.equal(after, rf - 0.25)


# ------------------------------------------------------------------------------------------------ plan and commit
def test_a_plan_touches_nothing_and_its_commit_is_the_inject():
    model, twin = _used(_model()), _used(_model())
    state, ids = model.memory, _contexts()[3]
    delta, new_k, new_v = _delta(model, ids)
    torch.manual_seed(9)
    before = _snapshot(state)
    plan = state.plan_update(delta, new_k, new_v, keys_of=_keys_of(model))
    _assert_same(_snapshot(state), before)  # nothing changed, and the draw was put back
    with state.mutate():
        state.commit(plan)
    torch.manual_seed(9)
    twin.inject(ids)
    _assert_same(_snapshot(state), _snapshot(twin.memory))
    assert state.version == before["version"] + 1


def test_a_commit_needs_the_version_it_was_planned_on_and_the_write_lock():
    model = _used(_model())
    state = model.memory
    delta, new_k, new_v = _delta(model, _contexts()[3])
    plan = state.plan_update(delta, new_k, new_v, keys_of=_keys_of(model))
    before = _snapshot(state)
    with pytest.raises(RuntimeError, match="inside `with state.mutate"):
        state.commit(plan)
    model.inject(_contexts()[4])  # the state moves on: the plan is stale
    moved = _snapshot(state)
    with state.mutate(), pytest.raises(RuntimeError, match=f"made for version {before['version']}"):
        state.commit(plan)
    _assert_same(_snapshot(state), moved)
    other = model.new_memory()
    with other.mutate(), pytest.raises(RuntimeError, match="made for another state"):
        other.commit(plan)


def test_mutate_advances_the_version_once_per_block_that_committed():
    model = _used(_model(), 1)
    state = model.memory
    v = state.version
    with state.mutate():
        pass
    assert state.version == v  # nothing committed
    with pytest.raises(TypeError, match="victims"), state.mutate():
        delta, new_k, new_v = _delta(model, _contexts()[1])
        state.commit(state.plan_update(delta, new_k, new_v, victims=torch.zeros(3, 2), keys_of=_keys_of(model)))
    assert state.version == v
    commit_update(model, state, *_delta(model, _contexts()[1])[:1], None)
    assert state.version == v + 1


def test_a_planned_merge_over_the_budget_changes_nothing():
    model = _model()
    state = model.memory
    ltm = state.ltm
    steps = ltm.update_ltm_frequency - 1 - ltm.update_step // ltm.num_tokens
    torch.manual_seed(2)
    for ids in _contexts()[:steps]:
        model.inject(ids)  # the next update merges
    ltm.budget_bytes = ltm.nbytes()
    before = _snapshot(state)
    delta, new_k, new_v = _delta(model, _contexts()[4])
    with pytest.raises(MemoryError, match="over the budget"):
        state.plan_update(delta, new_k, new_v, keys_of=_keys_of(model))
    _assert_same(_snapshot(state), before)


# ------------------------------------------------------------------------------------------------ its bytes
def test_the_state_dict_holds_exactly_the_memory_and_loads_into_another_capacity():
    model = _used(_model())
    state = model.memory
    sd = state.state_dict()
    names = {n for n, _ in state.named_buffers()}
    assert names == {k for k in sd if not k.endswith("_extra_state")}
    assert {"stm.hidden", "stm.k", "ltm.layers.0.hidden", "ltm.layers.2.rf", "ltm.cache_keys"} <= names
    assert sum(t.numel() * t.element_size() for _, t in state.named_buffers()) == sum(state.nbytes().values())
    assert sd["ltm._extra_state"]["size"] == list(state.ltm.size)
    other = MPlusForCausalLM(model.config, max_length=64, ltm_capacity=3).new_memory()
    assert other.ltm.capacity(0) != state.ltm.capacity(0)
    other.load_state_dict(sd)
    _assert_same(
        {k: v for k, v in _snapshot(other).items() if k not in ("version", "rng", "capacity")},
        {k: v for k, v in _snapshot(state).items() if k not in ("version", "rng", "capacity")},
    )


def test_the_model_state_dict_holds_the_weights_only():
    model = _model()
    sd = model.state_dict()
    assert not [k for k in sd if k.startswith("memory.")]
    assert "model.layers.0.self_attn.q_proj.base_layer.weight" in sd
    twin = MPlusForCausalLM(model.config, max_length=64)
    twin.load_state_dict(sd)  # strict: the memory is neither expected nor missing
    assert_equal(twin.lm_head.weight, model.lm_head.weight, name="lm_head")


def test_a_model_built_on_meta_materialises_with_to_empty_and_runs_after_a_load():
    reference = _model()
    with torch.device("meta"):
        model = MPlusForCausalLM(reference.config, max_length=64)
    assert {t.device.type for t in model.buffers()} == {"meta"}
    model.to_empty(device="cpu")
    assert {t.device.type for t in [*model.parameters(), *model.buffers()]} == {"cpu"}
    load_official_state(model, load_file(str(GOLDEN / "model" / "model.safetensors")))
    assert_equal(model(PROMPT).logits, reference(PROMPT).logits, name="logits after to_empty + load")
    torch.manual_seed(1)
    model.inject(_contexts()[0])
    torch.manual_seed(1)
    reference.inject(_contexts()[0])
    _assert_same(_snapshot(model.memory), _snapshot(reference.memory))


def test_a_deep_copy_of_a_state_owns_its_buffers():
    state = _used(_model()).memory
    twin = copy.deepcopy(state)
    for (name, a), (_, b) in zip(state.named_buffers(), twin.named_buffers()):
        assert a.data_ptr() != b.data_ptr() or a.numel() == 0, name
