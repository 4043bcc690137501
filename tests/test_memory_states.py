"""Issue 11, item 2: memory states as first-class objects. One model serves many ``MemoryState``s (each a short-term
memory, a long-term store and a drop generator), each used, changed, saved and moved independently, and each exactly
what a model holding that memory as its own would compute."""

from __future__ import annotations

import threading

import pytest
import torch
from _golden import GOLDEN, load_state
from safetensors.torch import save_file

from mplus import MemoryState, StaleCacheError
from mplus.checkpoint import load_memory, memory_state, save_memory
from mplus.config import MPlusConfig
from mplus.model import MPlusForCausalLM
from mplus_kernels.testing import assert_equal

PROMPT = torch.tensor([[7, 8, 9, 10, 11]])


def _model(**kw) -> MPlusForCausalLM:
    return MPlusForCausalLM.from_pretrained(str(GOLDEN / "model"), max_length=64, **kw)


def _contexts() -> list[torch.Tensor]:
    return [load_state(step)["context_ids"] for step in range(1, 6)]


def _same(a, b) -> None:
    sa, sb = memory_state(a), memory_state(b)
    assert sa.keys() == sb.keys()
    for key in sa:
        assert_equal(sa[key], sb[key], name=key)


def _generate(model, **kw):
    return model.generate(PROMPT, max_new_tokens=4, do_sample=False, output_logits=True, return_dict_in_generate=True,
                          **kw)  # fmt: skip


def test_each_state_computes_what_a_model_holding_it_computes():
    contexts = _contexts()
    model = _model()
    pristine = {k: v.clone() for k, v in memory_state(model).items() if k != "rng.cpu"}
    a, b = model.new_memory(seed=1), model.new_memory(seed=2)
    for ids in contexts[:3]:
        model.inject(ids, memory=a)
    for ids in contexts[3:]:
        model.inject(ids, memory=b)
    for state, seed, ctx in [(a, 1, contexts[:3]), (b, 2, contexts[3:])]:
        alone = _model()
        alone.memory.generator = torch.Generator().manual_seed(seed)
        for ids in ctx:
            alone.inject(ids)
        _same(state, alone.memory)
        got, want = _generate(model, memory=state), _generate(alone)
        assert_equal(got.sequences, want.sequences, name="tokens")
        assert_equal(torch.cat(got.logits), torch.cat(want.logits), name="logits")
    after = memory_state(model)
    for key, value in pristine.items():  # the default state was never touched
        assert_equal(after[key], value, name=key)


def test_own_generators_leave_the_global_rng_alone():
    model = _model()
    state = model.new_memory(seed=5)
    torch.manual_seed(0)
    before = torch.get_rng_state()
    model.inject(_contexts()[0], memory=state)
    assert torch.equal(torch.get_rng_state(), before)
    again = model.new_memory(seed=5)
    model.inject(_contexts()[0], memory=again)
    _same(state, again)


def test_new_memory_copies_and_the_copy_is_independent():
    model = _model()
    model.inject(_contexts()[0])
    state = model.new_memory()  # the default state as it is now
    for key, value in memory_state(model).items():
        assert_equal(memory_state(state)[key], value, name=key)
    model.inject(_contexts()[1], memory=state)
    assert state.version == 1 and model.memory_version == 1
    assert not torch.equal(memory_state(state)["stm.hidden"], memory_state(model)["stm.hidden"])


def test_save_and_load_round_trip_with_and_without_a_model(tmp_path):
    model = _model()
    state = model.new_memory(seed=3)
    for ids in _contexts()[:3]:
        model.inject(ids, memory=state)
    path = str(tmp_path / "state.safetensors")
    state.save(path)
    loaded = MemoryState.load(path)  # the file's description gives the shape
    _same(loaded, state)
    assert loaded.generator is not None
    model.inject(_contexts()[3], memory=loaded)
    model.inject(_contexts()[3], memory=state)
    _same(loaded, state)  # the generator's state travelled too

    old = str(tmp_path / "save_memory_without_metadata.safetensors")
    save_file(memory_state(model), old)  # a file as save_memory wrote it before states existed
    with pytest.raises(ValueError, match="has no mplus.memory description .* pass like=model"):
        MemoryState.load(old)
    _same(MemoryState.load(old, like=model), model.memory)

    current = str(tmp_path / "save_memory.safetensors")
    save_memory(model, current)
    _same(MemoryState.load(current), model.memory)
    other = _model()
    load_memory(other, path)  # a state's file loads as a model's default memory
    _same(other.memory, MemoryState.load(path))


def test_caches_belong_to_their_state():
    model = _model()
    a, b = model.new_memory(seed=1), model.new_memory(seed=2)
    cache_a = model(PROMPT, memory=a).past_key_values
    cache_b = model(PROMPT, memory=b).past_key_values
    model.inject(_contexts()[0], memory=b)  # changes b only
    model(torch.tensor([[1]]), past_key_values=cache_a)  # a's cache is still valid
    with pytest.raises(StaleCacheError, match="memory has changed since"):
        model(torch.tensor([[1]]), past_key_values=cache_b)
    with pytest.raises(ValueError, match="not the state this cache was prefilled on"):
        model(torch.tensor([[1]]), past_key_values=cache_a, memory=b)


def test_states_of_another_config_and_non_states_are_refused():
    model = _model()
    cfg = MPlusConfig.from_json_file(str(GOLDEN / "model" / "config.json"))
    cfg.num_blocks = cfg.num_blocks + 1  # a larger short-term memory
    stranger = MPlusForCausalLM(cfg, max_length=8).memory
    before = {k: v.clone() for k, v in memory_state(stranger).items()}
    with pytest.raises(ValueError, match="memory is a state of another config"):
        model.inject(_contexts()[0], memory=stranger)
    with pytest.raises(ValueError, match="memory is a state of another config"):
        model.generate(PROMPT, max_new_tokens=2, memory=stranger)
    with pytest.raises(TypeError, match="memory must be a MemoryState"):
        model(PROMPT, memory="alice")
    after = memory_state(stranger)
    for key, value in before.items():
        assert_equal(after[key], value, name=key)


def test_placement_for_generation_only_and_offload():
    """On the meta device (the stand-in for a GPU): ``to(device, what="generation")`` moves only the short-term
    K/V and positions and the long-term keys and ages; generation runs, inject refuses until a full move."""
    model = _model().to("meta")
    state = _model().new_memory()  # a host state
    state.to("meta", what="generation")
    assert state.stm.k.device.type == "meta" and state.stm.hidden.device.type == "cpu"
    assert state.ltm.keys[0].device.type == "meta" and state.ltm.hidden[0].device.type == "cpu"
    sizes = state.nbytes()
    assert sizes["device"] > 0 and sizes["host"] > 0
    model(PROMPT.to("meta"), memory=state)
    with pytest.raises(ValueError, match="placed for generation only"):
        model.inject(_contexts()[0].to("meta"), memory=state)
    state.to("meta")
    model.inject(_contexts()[0].to("meta"), memory=state)
    with pytest.raises(ValueError, match="on the meta device, which holds no values"):
        state.offload()
    host = _model().new_memory()
    before = {k: v.clone() for k, v in memory_state(host).items() if k != "rng.cpu"}  # (global: model builds draw)
    host.offload()
    for key, value in before.items():
        assert_equal(memory_state(host)[key], value, name=key)
    with pytest.raises(ValueError, match="memory's short-term K/V is on cpu, the model on meta"):
        model(PROMPT.to("meta"), memory=host)


def test_states_are_used_from_threads_independently():
    """An inject into one state while another generates from another: both equal their serial results."""
    model = _model()
    a, b = model.new_memory(seed=1), model.new_memory(seed=2)
    serial_b = _model()
    serial_b.memory.generator = torch.Generator().manual_seed(2)
    want = _generate(serial_b).sequences
    expected_a = _model()
    expected_a.memory.generator = torch.Generator().manual_seed(1)
    for ids in _contexts():
        expected_a.inject(ids)
    out = []

    def writer():
        for ids in _contexts():
            model.inject(ids, memory=a)

    def reader():
        for _ in range(3):
            out.append(_generate(model, memory=b).sequences)

    threads = [threading.Thread(target=writer), threading.Thread(target=reader)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for got in out:
        assert_equal(got, want, name="tokens of b")
    _same(a, expected_a.memory)
