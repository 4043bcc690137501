"""Issue 10: the memory is user data. Every change of it completes or leaves it exactly as it was (a bad file, a
tripped budget); threads never see each other's adapter or a half-changed memory; a generation cache refuses to
outlive the memory it was built on; errors name what the user can fix.

``snapshot`` is the harness: every tensor and counter of the memory (short-term slots, K/V, ages, permutations,
long-term rows, keys, ages, frequencies, cache, counters), the RNG the drops are drawn from and the version.
"""

from __future__ import annotations

import copy
import threading

import pytest
import torch
from _golden import GOLDEN, load_state
from _memory import assert_same, snapshot
from safetensors.torch import load_file, save_file

from mplus.checkpoint import load_memory, load_official_memory, memory_state, save_memory
from mplus.lora import AdapterState
from mplus.memory.ltm import LTMBudgetError
from mplus.memory.serialization import load_ltm_tensors
from mplus.model import DECODER, ENCODER, MPlusForCausalLM, StaleCacheError
from mplus_kernels.testing import assert_equal

MODEL_DIR = str(GOLDEN / "model")
PROMPT = torch.tensor([[7, 8, 9, 10, 11]])


def _model(**kw) -> MPlusForCausalLM:
    return MPlusForCausalLM.from_pretrained(MODEL_DIR, max_length=64, **kw)


def _contexts() -> list[torch.Tensor]:
    return [load_state(step)["context_ids"] for step in range(1, 6)]


# ------------------------------------------------------------------------------------------ finding 1 (and 2)
@pytest.fixture(scope="module")
def memory_file(tmp_path_factory):
    """A saved memory with long-term rows in every layer and rows in the dropped-row cache (3 injections)."""
    donor = _model()
    torch.manual_seed(11)
    for ids in _contexts()[:3]:
        donor.inject(ids)
    assert donor.ltm.cache_len > 0 and min(donor.ltm.size) > 0
    path = str(tmp_path_factory.mktemp("memory") / "memory.safetensors")
    save_memory(donor, path)
    return path, snapshot(donor)


def _target() -> MPlusForCausalLM:
    """A model whose memory differs from the file's (one injection from another seed)."""
    model = _model()
    torch.manual_seed(99)
    model.inject(_contexts()[3])
    return model


def _corruptions(sd: dict[str, torch.Tensor]):
    """(name, file) for every tensor of the file dropped, re-shaped, re-typed; and values that break invariants."""
    for key, t in sd.items():
        yield f"drop {key}", {k: v for k, v in sd.items() if k != key}
        shorter = t[..., :-1] if t.shape[-1] > 0 else torch.zeros(*t.shape[:-1], 1, dtype=t.dtype)
        yield f"reshape {key}", {**sd, key: shorter.contiguous()}
        other = torch.int32 if t.is_floating_point() else torch.float32
        yield f"retype {key}", {**sd, key: t.to(other)}
    for key in [k for k in sd if "ages" in k or "recall_frequencies" in k] + ["stm.age"]:
        if sd[key].numel():
            bad = sd[key].clone()
            bad.view(-1)[0] = float("nan")
            yield f"nan in {key}", {**sd, key: bad}
    yield "update_step out of range", {**sd, "ltm_store.update_step": torch.tensor([10**6])}
    yield "extra tensor", {**sd, "ltm_store.ltm.3": sd["ltm_store.ltm.0"].clone()}
    order = sd["stm.order"].clone()
    order[0, [0, 1]] = order[0, [1, 0]]
    yield "order not the inverse of pos", {**sd, "stm.order": order}


def test_every_corrupted_memory_file_is_refused_with_the_memory_untouched(memory_file, tmp_path):
    """Finding 1: a file with one missing or mis-shaped tensor replaced part of the long-term memory (sizes
    [43, 40, 42] became [33, 31, 0]) before raising. Now every such file is a ValueError before any write."""
    path, _ = memory_file
    sd = load_file(path)
    target = _target()
    before = snapshot(target)
    bad_path = str(tmp_path / "bad.safetensors")
    cases = list(_corruptions(sd))
    assert len(cases) > 3 * len(sd)
    for name, bad in cases:
        save_file(bad, bad_path)
        with pytest.raises(ValueError, match=r"load_memory\(.*bad.safetensors\)") as info:
            load_memory(target, bad_path)
        assert "nothing was loaded" in str(info.value), (name, str(info.value))
        assert_same(snapshot(target), before)
    load_memory(target, path)  # the intact file still loads, exactly
    state = snapshot(target)
    _, donor = memory_file
    for key in donor:
        if key not in ("version", "rng.cpu"):
            value = donor[key]
            assert_equal(state[key], value, name=key) if isinstance(value, torch.Tensor) else None


def test_a_file_that_is_not_safetensors_is_a_value_error(tmp_path):
    target = _target()
    before = snapshot(target)
    with pytest.raises(ValueError, match="does not exist"):
        load_memory(target, str(tmp_path / "absent.safetensors"))
    (tmp_path / "junk.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    with pytest.raises(ValueError, match="is not a safetensors file"):
        load_memory(target, str(tmp_path / "junk.safetensors"))
    assert_same(snapshot(target), before)


def test_a_load_over_the_budget_changes_nothing(memory_file):
    """A budget that the file's rows exceed (in the last layer only) is refused before any layer is written."""
    path, _ = memory_file
    target = _model()  # the checkpoint's long-term rows only: smaller than the file's
    before = snapshot(target)
    sizes = [load_file(path)[f"ltm_store.ltm.{layer}"].shape[0] for layer in range(3)]
    row = target.ltm._row_bytes() + 8
    growth = sum(max(0, s - target.ltm.capacity(layer)) for layer, s in enumerate(sizes)) * row
    assert growth > row
    target.ltm.budget_bytes = target.ltm.nbytes() + growth - 1
    with pytest.raises(LTMBudgetError, match="over the budget"):
        load_memory(target, path)
    assert_same(snapshot(target), before)
    target.ltm.budget_bytes = None
    load_memory(target, path)
    assert target.ltm.size == sizes


def test_official_memory_with_a_bad_tensor_changes_nothing():
    target = _target()
    before = snapshot(target)
    state = dict(load_state(3))
    state["ltm_keys.2"] = state["ltm_keys.2"][:, :-1]  # a retriever of another selector_hidden_dim
    with pytest.raises(ValueError, match=r"ltm_keys.2 has shape \[\d+, 15\], expected \[\d+, 16\]"):
        load_official_memory(target, state)
    assert_same(snapshot(target), before)
    with pytest.raises(ValueError, match="memory is missing"):
        load_official_memory(target, {k: v for k, v in load_state(3).items() if k != "memory"})
    assert_same(snapshot(target), before)


# -------------------------------------------------------------------------------------------------- finding 3
def test_an_inject_over_the_budget_changes_nothing_and_the_model_carries_on():
    """Finding 3: the LTMBudgetError of a merging inject came after the short-term memory and the cache counters
    changed, and every later inject failed ("cache_views: 8 rows do not fit the cache"), budget lifted or not."""
    contexts = _contexts()
    model, control = _model(), _model()
    torch.manual_seed(5)
    model.inject(contexts[0])  # one update: the next one merges the cache into the long-term memory (grows it)
    state = torch.get_rng_state()
    control_rng = torch.manual_seed(5)
    control.inject(contexts[0])
    del control_rng
    torch.set_rng_state(state)
    model.ltm.budget_bytes = model.ltm.nbytes()
    before = snapshot(model)
    with pytest.raises(LTMBudgetError, match="over the budget"):
        model.inject(contexts[1])
    assert_same(snapshot(model), before)  # the RNG too: the drops were drawn and are given back
    model.ltm.budget_bytes = None
    for ids in contexts[1:]:
        model.inject(ids)
    torch.set_rng_state(state)
    for ids in contexts[1:]:
        control.inject(ids)
    for key, value in memory_state(control).items():
        if key != "rng.cpu":
            assert_equal(memory_state(model)[key], value, name=key)


def test_bad_victims_leave_the_memory_and_the_rng_untouched():
    model = _target()
    before = snapshot(model)
    with pytest.raises(ValueError, match="victims"):
        model.inject(_contexts()[0], victims=torch.full((3, 8), 40))
    with pytest.raises(TypeError, match="victims must be an integer tensor"):
        model.inject(_contexts()[0], victims=[[0] * 8] * 3)
    assert_same(snapshot(model), before)


# -------------------------------------------------------------------------------------------------- finding 4
def test_the_adapter_choice_is_per_thread():
    """Finding 4: one shared switch: ``inject`` in one thread (update adapter) changed what a forward running in
    another thread applied."""
    state = AdapterState(DECODER)
    inside, release = threading.Event(), threading.Event()
    seen = []

    def injector():
        with state.use(ENCODER):
            inside.set()
            release.wait(10)

    thread = threading.Thread(target=injector)
    thread.start()
    inside.wait(10)
    seen.append(state.active)
    release.set()
    thread.join()
    assert seen == [DECODER]
    assert state.active == DECODER


def _generate(model):
    return model.generate(PROMPT, max_new_tokens=3, do_sample=False)


def test_forwards_and_generations_during_injects_see_one_memory_of_the_serial_run():
    """Forwards and generations from 3 threads while a 4th injects 3 contexts: every forward's logits and every
    generation's tokens and scores are exactly those of one of the 4 memories of the serial run (no mixed adapter,
    no half-updated memory, no generation whose memory changed under it)."""
    contexts = _contexts()[:3]
    serial = _model()
    torch.manual_seed(21)
    expected = [(serial(PROMPT).logits, _generate(serial))]
    for ids in contexts:
        serial.inject(ids)
        expected.append((serial(PROMPT).logits, _generate(serial)))
    model = _model()
    torch.manual_seed(21)
    forwards, generations, errors = [], [], []
    start = threading.Barrier(4)

    def reader():
        start.wait()
        for i in range(10):
            if i % 3 == 2:
                generations.append(_generate(model))
            else:
                forwards.append(model(PROMPT).logits)

    def writer():
        start.wait()
        try:
            for ids in contexts:
                model.inject(ids)
        except Exception as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=reader) for _ in range(3)] + [threading.Thread(target=writer)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert len(forwards) + len(generations) == 30
    for logits in forwards:
        assert any(torch.equal(logits, e) for e, _ in expected), "a forward saw no memory of the serial run"
    for tokens in generations:
        assert any(torch.equal(tokens, g) for _, g in expected), "a generation saw no memory of the serial run"
    assert torch.equal(model(PROMPT).logits, expected[-1][0])


def test_concurrent_injects_equal_a_serial_order():
    """Two threads injecting race on the long-term cache without the lock; with it the result is one serial order."""
    a, b = _contexts()[0], _contexts()[1]
    finals = []
    for first, second in [(a, b), (b, a)]:
        m = _model()
        torch.manual_seed(8)
        m.inject(first)
        m.inject(second)
        finals.append(memory_state(m))
    model = _model()
    torch.manual_seed(8)
    start = threading.Barrier(2)

    def run(ids):
        start.wait()
        model.inject(ids)

    threads = [threading.Thread(target=run, args=(ids,)) for ids in (a, b)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    got = memory_state(model)
    assert any(all(torch.equal(got[k], f[k]) for k in f if k != "rng.cpu") for f in finals)


def test_generations_from_several_threads_equal_serial_ones():
    model = _model()
    torch.manual_seed(2)
    model.inject(_contexts()[0])
    prompts = [torch.tensor([[i, i + 1, i + 2]]) for i in range(4)]
    serial = [model.generate(p, max_new_tokens=4, do_sample=False) for p in prompts]
    out = [None] * len(prompts)

    def run(i):
        out[i] = model.generate(prompts[i], max_new_tokens=4, do_sample=False)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(prompts))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for got, want in zip(out, serial):
        assert_equal(got, want, name="generated ids")


def test_inject_from_inside_a_generation_is_refused():
    model = _model()
    with model.memory_lock.read(), pytest.raises(RuntimeError, match="cannot be changed from inside a read"):
        model.inject(_contexts()[0])


# -------------------------------------------------------------------------------------------------- finding 5
def test_a_cache_used_after_the_memory_changed_raises():
    """Finding 5: a cache made before an inject decoded against the updated short-term K/V with the old
    positions (logits off by 2.2, no error)."""
    model = _model()
    out = model(PROMPT)
    cache = out.past_key_values
    model(torch.tensor([[3]]), past_key_values=cache)  # same memory: fine
    model.inject(_contexts()[0])
    with pytest.raises(StaleCacheError, match="memory has changed since"):
        model(torch.tensor([[4]]), past_key_values=cache)
    position = torch.tensor([cache.length])
    with pytest.raises(StaleCacheError, match="decode_step: this generation cache"):
        model.decode_step(torch.tensor([[4]]), position, cache)
    fresh = model(PROMPT).past_key_values
    model(torch.tensor([[4]]), past_key_values=fresh)
    with pytest.raises(ValueError, match="never prefilled"):
        model.decode_step(torch.tensor([[4]]), torch.tensor([0]), model.new_cache())


# -------------------------------------------------------------------------------------------------- finding 7
def test_a_generation_that_cannot_fit_is_refused_before_the_prefill():
    """A prompt filling max_length failed at decode step 2 ("positions ... exceed the RoPE table"), output lost."""
    model = _model()
    with pytest.raises(
        ValueError, match=r"up to 67 tokens \(prompt \+ max_new_tokens\) exceed the model's max_length=64"
    ):
        model.generate(torch.zeros(1, 64, dtype=torch.long), max_new_tokens=3, do_sample=False)
    assert model.generate(torch.zeros(1, 61, dtype=torch.long), max_new_tokens=3, do_sample=False).shape == (1, 64)


def test_deepcopy_of_a_used_model_is_independent():
    """``copy.deepcopy(model)`` failed once the model had run (its transfer engine's thread pool)."""
    model = _model()
    torch.manual_seed(4)
    model.inject(_contexts()[0])
    expected = model(PROMPT).logits
    twin = copy.deepcopy(model)
    assert_equal(twin(PROMPT).logits, expected, name="logits of the copy")
    twin.inject(_contexts()[1])
    assert_equal(model(PROMPT).logits, expected, name="logits of the original after the copy changed")
    assert twin.memory_version == model.memory_version + 1


def test_generate_on_meta_is_a_value_error():
    model = _model().to("meta")
    with pytest.raises(ValueError, match="meta device, which holds no values"):
        model.generate(PROMPT, max_new_tokens=2)
    with pytest.raises(ValueError, match="meta device, which holds no memory to save"):
        save_memory(model, "unused.safetensors")


@pytest.fixture(scope="module")
def used_model():
    model = _model()
    model(PROMPT)
    return model


def _prefilled(model):
    return model(PROMPT).past_key_values


ERROR_CASES = [
    # (name, call, exception, message): each raised an AttributeError / a bare library error before
    ("forward past_key_values=str", lambda m: m(PROMPT, past_key_values="x"), TypeError, "must be an MPlusCache"),
    ("generate(None)", lambda m: m.generate(None, max_new_tokens=2), ValueError, "generate: expected integer token"),
    ("generate(list)", lambda m: m.generate([[1, 2]], max_new_tokens=2), ValueError, "generate: expected integer"),
    (
        "decode_step None position",
        lambda m: m.decode_step(PROMPT[:, :1], None, _prefilled(m)),
        TypeError,
        "cache_position must be an integer tensor",
    ),  # fmt: skip
    ("new_cache(-1)", lambda m: m.new_cache(-1), ValueError, "max_tokens=-1 must be an int > 0"),
    ("new_cache('a')", lambda m: m.new_cache("a"), ValueError, "max_tokens='a' must be an int > 0"),
    ("load_memory(None)", lambda m: load_memory(m, None), TypeError, "load_memory: path must be a file path"),
    ("save_memory(None)", lambda m: save_memory(m, None), TypeError, "save_memory: path must be a file path"),
    (
        "save_memory into no dir",
        lambda m: save_memory(m, "/nonexistent/dir/m.safetensors"),
        OSError,
        "save_memory: cannot write /nonexistent/dir/m.safetensors",
    ),  # fmt: skip
    ("load_official_memory(None)", lambda m: load_official_memory(m, None), TypeError, "state must be a dict"),
    ("from_pretrained(None)", lambda m: MPlusForCausalLM.from_pretrained(None), TypeError, "path must be a checkpoint"),
    (
        "max_length=0",
        lambda m: MPlusForCausalLM(m.config, max_length=0),
        ValueError,
        "max_length=0 must be an int > 0",
    ),  # fmt: skip
    ("ltm.push_dropped(None)", lambda m: m.ltm.push_dropped(None), TypeError, "push_dropped: keys must be a torch"),
    ("load_ltm_tensors(ltm, None)", lambda m: load_ltm_tensors(m.ltm, None), TypeError, "must be a dict of tensors"),
    (
        "ltm.append_rows_(None)",
        lambda m: m.ltm.append_rows_(0, None, None, None, None),
        TypeError,
        "append_rows_: hidden must be a torch.Tensor",
    ),  # fmt: skip
    ("stm.update(None)", lambda m: m.stm.update(None), TypeError, "update: new_hidden must be a torch.Tensor"),
    ("stm.logical('x')", lambda m: m.stm.logical("x"), ValueError, "has no 'x' cache"),
    ("TransferEngine.submit(None)", lambda m: m.transfer.submit("job", None), TypeError, "fn must be a callable"),
    ("attention(None)", lambda m: m.layers[0].self_attn(None, None), TypeError, "hidden_states must be a torch"),
]


@pytest.mark.parametrize(("name", "call", "error", "match"), ERROR_CASES, ids=[c[0] for c in ERROR_CASES])
def test_errors_name_the_argument(used_model, name, call, error, match):
    before = snapshot(used_model)
    with pytest.raises(error, match=match):
        call(used_model)
    assert_same(snapshot(used_model), before)
