"""Issue 12, item 3: the training step (``mplus.training``). Its forward is the inference path written functionally
(checked against ``inject`` + ``forward``), its gradients are those of the pure-PyTorch reference kernels, they
reach exactly the trained parameters, the loss falls, and a step changes the memory exactly as the inference
update does (or not at all when it fails)."""

from __future__ import annotations

import copy

import pytest
import torch
from _golden import GOLDEN

from mplus import training
from mplus.checkpoint import memory_state, refresh_memory_kv
from mplus.config import MPlusConfig
from mplus.model import MPlusForCausalLM
from mplus_kernels import draw_victims
from mplus_kernels.testing import assert_close, assert_equal


def _model(kernels: str = "fused", **kw) -> MPlusForCausalLM:
    model = MPlusForCausalLM.from_pretrained(str(GOLDEN / "model"), max_length=96, kernels=kernels, **kw)
    training.prepare(model)
    return model.eval()  # exact comparisons: no LoRA dropout


def _ids(t: int, seed: int, vocab: int) -> torch.Tensor:
    return torch.randint(0, vocab, (1, t), generator=torch.Generator().manual_seed(seed))


def _victims(model: MPlusForCausalLM, seed: int) -> torch.Tensor:
    cfg = model.config
    return draw_victims(cfg.num_hidden_layers, cfg.stm_size, cfg.num_tokens, torch.Generator().manual_seed(seed))


def _snapshot(model: MPlusForCausalLM) -> dict:
    return {k: v.clone() for k, v in memory_state(model).items()}


def _same_memory(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert_equal(a[key], b[key], name=key)


def _grads(model: MPlusForCausalLM) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def _golden_with(update_ltm_frequency: int) -> MPlusForCausalLM:
    """The golden model's weights and short-term memory, an empty long-term store merging every n injections."""
    golden = _model()
    cfg = MPlusConfig.from_json_file(str(GOLDEN / "model" / "config.json"))
    cfg.update_ltm_frequency = update_ltm_frequency
    model = MPlusForCausalLM(cfg, max_length=96)
    model.load_state_dict(golden.state_dict())
    with torch.no_grad():
        model.stm.hidden.copy_(golden.stm.hidden)
    refresh_memory_kv(model)
    training.prepare(model)
    return model.eval()


@pytest.mark.parametrize(("chunks", "frequency"), [(1, 2), (3, 2), (3, 10), (5, 2)])
@pytest.mark.parametrize("semantics", ["fast", "reference"])
def test_the_step_computes_what_inject_then_forward_computes(chunks, frequency, semantics):
    """The step's logits are those of the inference path: inject each context with the same drops, then a prefill
    of the target, which retrieves over the long-term store, the cache and the rows the injections dropped, after
    the merges (and evictions) the injections trigger. Its commit leaves exactly the memory those injects leave.
    The golden store merges every 2 injections (merges, and evictions, within the step);
    a store merging every 10 keeps a cache across the step. Both semantics (reference: the small-store rule)."""
    model = _model() if frequency == 2 else _golden_with(update_ltm_frequency=frequency)
    model.semantics = semantics
    vocab, k = model.config.vocab_size, model.config.num_tokens
    for seed in range(3):  # rows in the store, and (odd count) in its cache
        model.inject(_ids(20, 100 + seed, vocab), victims=_victims(model, 100 + seed))
    twin = copy.deepcopy(model)
    alive = model.ltm.after_pushes(chunks)
    evicts = alive is not None and any(not bool(mask.all()) for mask, _ in alive)
    assert evicts == (frequency == 2)  # the case is what it says: rows are evicted within the step (or none merge)
    contexts = [_ids(16 + 5 * i, i, vocab) for i in range(chunks)]
    victims = [_victims(model, 10 + i) for i in range(chunks)]
    target = _ids(9, 50, vocab)
    out = training.training_step(model, contexts if chunks > 1 else contexts[0], target, victims=victims)
    for ids, v in zip(contexts, victims):
        twin.inject(ids, victims=v)
    want = twin(target)
    assert_close(out.logits.detach(), want.logits, atol=2e-5, rtol=2e-5, name="logits")
    _same_memory(_snapshot(model), _snapshot(twin))
    assert_equal(model.stm.logical("hidden")[:, -k:], out.deltas[-1], name="newest rows")


@pytest.mark.parametrize("frequency", [2, 10])
@pytest.mark.parametrize("prompt", [1, 4])
def test_a_prompt_length_step_computes_a_prefill_of_the_prompt_then_the_rest_through_its_cache(prompt, frequency):
    """``prompt_length``: only the prompt's tokens retrieve, as in inference where a prefill of the prompt retrieves
    and the continuation runs through its cache; the retriever's loss then scores with the prompt's queries only."""
    model = _model() if frequency == 2 else _golden_with(update_ltm_frequency=frequency)
    vocab = model.config.vocab_size
    for seed in range(3):
        model.inject(_ids(20, 100 + seed, vocab), victims=_victims(model, 100 + seed))
    twin, plain = copy.deepcopy(model), copy.deepcopy(model)
    context, victims, target = _ids(18, 1, vocab), _victims(model, 11), _ids(9, 50, vocab)
    out = training.training_step(model, context, target, victims=[victims], prompt_length=prompt)
    twin.inject(context, victims=victims)
    head = twin(target[:, :prompt])
    rest = twin(target[:, prompt:], past_key_values=head.past_key_values)
    want = torch.cat([head.logits, rest.logits], 1)
    assert_close(out.logits.detach(), want, atol=2e-5, rtol=2e-5, name="logits")
    full = training.training_step(plain, context, target, victims=[victims])  # the same step, no prompt_length
    assert not torch.allclose(full.logits, out.logits, atol=1e-3)  # the prompt's retrieval is not the whole target's
    assert not torch.allclose(full.retriever_loss, out.retriever_loss)


def test_gradients_match_the_reference_kernels():
    """Every trained parameter's gradient through the fused ops (C++ attention forward/backward, merge, retriever
    scores) equals the one through the pure-PyTorch references differentiated by autograd."""
    grads = {}
    for kernels in ("fused", "reference"):
        model = _model(kernels)
        model.inject(_ids(20, 7, model.config.vocab_size), victims=_victims(model, 0))
        v = [_victims(model, 1), _victims(model, 2)]
        ctx = [_ids(16, 3, model.config.vocab_size), _ids(24, 4, model.config.vocab_size)]
        out = training.training_step(model, ctx, _ids(11, 5, model.config.vocab_size), victims=v, grad="all")
        out.loss.backward()
        grads[kernels] = _grads(model)
    assert grads["fused"].keys() == grads["reference"].keys()
    for name, g in grads["fused"].items():
        assert_close(g, grads["reference"][name], atol=1e-5, rtol=1e-4, name=name)


def test_gradients_reach_exactly_the_trained_parameters():
    model = _model()
    names = set(training.prepare(model))
    model.eval()
    assert names == {n for n, _ in model.named_parameters() if ".lora_" in n or "query_proj" in n or "key_proj" in n}
    assert any("lora_A.default" in n for n in names) and any("encoder_query_proj" in n for n in names)
    out = training.training_step(model, _ids(20, 1, model.config.vocab_size), _ids(10, 2, model.config.vocab_size))
    out.loss.backward()
    for name, p in model.named_parameters():
        if name in names:
            assert p.grad is not None and bool(p.grad.abs().sum() > 0), f"{name} got no gradient"
        else:
            assert p.grad is None and not p.requires_grad, f"{name} is frozen but got a gradient"


def test_retriever_gradients_stay_in_the_retriever_and_lm_gradients_out_of_it():
    """The retriever's inputs are detached (SPEC.md §7.1): its loss moves only the projectors; the LM loss (through a
    discrete retrieval) never reaches them."""
    model = _model()
    ids = _ids(20, 1, model.config.vocab_size), _ids(10, 2, model.config.vocab_size)
    v = [_victims(model, 0)]
    out = training.training_step(model, *ids, victims=v, commit=False)
    (out.retriever_loss + out.encoder_retriever_loss).backward()
    for name, p in model.named_parameters():
        projector = ("query_proj" in name or "key_proj" in name) and ".lora_" not in name
        assert (p.grad is not None and bool(p.grad.abs().sum() > 0)) == projector, name
    model.zero_grad(set_to_none=True)
    training.training_step(model, *ids, victims=v, commit=False).lm_loss.backward()
    for name, p in model.named_parameters():
        if "query_proj" in name or "key_proj" in name:
            assert p.grad is None, name


def test_retriever_labels_are_the_document_rows_tracked_through_drops():
    model = _model()
    cfg = model.config
    n, k = cfg.stm_size, cfg.num_tokens
    v = [_victims(model, 0), _victims(model, 1)]
    ctx = [_ids(20, 1, cfg.vocab_size), _ids(20, 2, cfg.vocab_size)]
    out = training.training_step(model, ctx, _ids(10, 3, cfg.vocab_size), victims=v, commit=False)
    # naive tracking: a list of flags per layer, rows removed at the victims, K flagged rows appended
    for layer in range(cfg.num_hidden_layers):
        flags = [False] * n
        for drop in v:
            gone = set(drop[layer].tolist())
            flags = [f for i, f in enumerate(flags) if i not in gone] + [True] * k
        assert out.positives[layer].tolist() == flags
    # revisit: the document is the first context's rows; the next step's context is unrelated
    doc = out.positives.clone()
    later = training.training_step(model, ctx[1], _ids(10, 3, cfg.vocab_size), victims=[v[1]], document=doc,
                                   commit=False)  # fmt: skip
    assert_equal(later.positives, training.track_document(doc, v[1], new=False), name="revisit labels")
    assert int(later.positives[:, -k:].sum()) == 0


def test_the_loss_falls_in_a_few_dozen_steps():
    model = _model()
    model.train()  # LoRA dropout on, as training runs
    torch.manual_seed(0)
    opt = torch.optim.AdamW(training.param_groups(model, lr=2e-3), lr=2e-3)
    ctx = _ids(24, 1, model.config.vocab_size)
    target = torch.cat([ctx[:, :1], ctx], 1)  # the official "Repeat:" task: the context again, read from memory
    losses = []
    for _ in range(30):
        out = training.training_step(model, ctx, target)
        out.loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(float(out.lm_loss.detach()))
    assert sum(losses[-5:]) / 5 < 0.75 * sum(losses[:5]) / 5, losses


def test_param_groups_put_the_selectors_at_their_own_rate():
    model = _model()
    groups = training.param_groups(model, lr=4.6e-6)
    assert [g["lr"] for g in groups] == [4.6e-6, 1e-4]
    selector = {id(p) for p in groups[1]["params"]}
    for name, p in model.named_parameters():
        if p.requires_grad:
            assert (id(p) in selector) == ("query_proj" in name or "key_proj" in name), name


def test_checkpointing_and_autocast():
    """Per-layer gradient checkpointing gives the same gradients (the adapter is re-entered in the recomputation);
    bf16 autocast gives a close loss and finite gradients."""
    runs = {}
    for mode in ("plain", "checkpointing", "bf16"):
        model = _model()
        kw = {"checkpointing": mode == "checkpointing", "autocast": torch.bfloat16 if mode == "bf16" else None}
        out = training.training_step(model, _ids(20, 1, model.config.vocab_size), _ids(12, 2, model.config.vocab_size),
                                     victims=[_victims(model, 4)], **kw)  # fmt: skip
        out.loss.backward()
        runs[mode] = float(out.loss.detach()), _grads(model)
    loss, grads = runs["plain"]
    assert runs["checkpointing"][0] == pytest.approx(loss, rel=1e-6)
    for name, g in grads.items():
        assert_close(runs["checkpointing"][1][name], g, atol=1e-6, rtol=1e-5, name=name)
    assert runs["bf16"][0] == pytest.approx(loss, rel=0.05)
    assert runs["bf16"][1].keys() == grads.keys()
    assert all(bool(g.isfinite().all()) for g in runs["bf16"][1].values())


def test_memoryllm_trains_its_adapters_and_refuses_a_retriever_loss():
    cfg = MPlusConfig.memoryllm_8b(vocab_size=97, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, num_tokens=4, num_blocks=5,
                                   lora_config={"r": 4, "lora_alpha": 8}, bos_token_id=None, eos_token_id=None,
                                   pad_token_id=None)  # fmt: skip
    model = MPlusForCausalLM(cfg, max_length=64)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.1)
    names = training.prepare(model)
    assert names and all(".lora_" in n for n in names)
    ctx, target = _ids(16, 1, 97), _ids(8, 2, 97)
    with pytest.raises(ValueError, match="retriever_loss=True.*no long-term memory"):
        training.training_step(model, ctx, target, retriever_loss=True)
    out = training.training_step(model, ctx, target)
    assert out.retriever_loss is None and out.encoder_retriever_loss is None
    out.loss.backward()
    assert all(p.grad is not None for n, p in model.named_parameters() if n in names)


def test_bad_input_is_refused_and_the_memory_is_untouched():
    model = _model()
    vocab = model.config.vocab_size
    ctx, target = _ids(20, 1, vocab), _ids(10, 2, vocab)
    reference_ages = MPlusForCausalLM.from_pretrained(str(GOLDEN / "model"), max_length=96)  # (building draws)
    before, rng = _snapshot(model), torch.get_rng_state()
    good = _victims(model, 0)
    cases = [
        ({"victims": [good[:, :3]]}, ValueError, r"victims\[0\] must be \[L=3, K=8\]"),
        ({"victims": [good.float()]}, TypeError, r"victims\[0\] must be an integer tensor"),
        ({"victims": [good + 1000]}, ValueError, r"outside \[0, N=32\)"),
        ({"victims": [torch.zeros_like(good)]}, ValueError, "repeats a position"),
        ({"victims": [good, good]}, ValueError, "2 entries for 1 context"),
        ({"document": torch.zeros(3, 32)}, ValueError, r"document must be a bool tensor \[L, N\] = \[3, 32\]"),
        ({"grad": "some"}, ValueError, "grad='some'"),
        ({"autocast": "bf16"}, TypeError, "autocast must be a torch.dtype"),
        ({"retriever_loss": 1}, TypeError, "retriever_loss must be a bool"),
        ({"prompt_length": 0}, ValueError, r"prompt_length=0, expected 1\.\.10"),
        ({"prompt_length": 11}, ValueError, r"prompt_length=11, expected 1\.\.10"),
        ({"prompt_length": 2.0}, TypeError, "prompt_length must be an int"),
    ]
    for kw, exc, match in cases:
        with pytest.raises(exc, match=match):
            training.training_step(model, ctx, target, **kw)
    with pytest.raises(ValueError, match="at least 2 tokens"):
        training.training_step(model, ctx, target[:, :1])
    with pytest.raises(ValueError, match="context holds no chunk"):
        training.training_step(model, [], target)
    with pytest.raises(ValueError, match="exceeds max_length"):
        training.training_step(model, ctx, _ids(200, 3, vocab))
    with pytest.raises(ValueError, match="reference \\(inference\\) ages"):
        training.training_step(reference_ages, ctx, target)
    _same_memory(_snapshot(model), before)
    assert_equal(torch.get_rng_state(), rng, name="global RNG")


def test_a_step_that_fails_before_its_commit_leaves_the_memory_and_rng_as_they_were(monkeypatch):
    model = _model()
    before, rng = _snapshot(model), torch.get_rng_state()

    def boom(*args, **kwargs):
        raise RuntimeError("boom")

    monkeypatch.setattr(training, "retriever_bce_loss", boom)
    with pytest.raises(RuntimeError, match="boom"):
        training.training_step(model, _ids(20, 1, model.config.vocab_size), _ids(10, 2, model.config.vocab_size))
    _same_memory(_snapshot(model), before)
    assert_equal(torch.get_rng_state(), rng, name="global RNG (the drops were drawn from it)")


def test_commit_false_reads_the_memory_only():
    model = _model()
    before, rng = _snapshot(model), torch.get_rng_state()
    out = training.training_step(model, _ids(20, 1, model.config.vocab_size), _ids(10, 2, model.config.vocab_size),
                                 commit=False)  # fmt: skip
    out.loss.backward()
    _same_memory(_snapshot(model), before)
    assert_equal(torch.get_rng_state(), rng, name="global RNG")


def test_a_failed_commit_of_a_later_chunk_keeps_the_chunks_before_it_and_says_so(monkeypatch):
    model = _model()
    vocab = model.config.vocab_size
    twin = copy.deepcopy(model)
    contexts, victims = [_ids(20, 1, vocab), _ids(20, 2, vocab)], [_victims(model, 1), _victims(model, 2)]
    real, calls = training.commit_update, []

    def second_fails(m, mem, delta, drop):
        calls.append(drop)
        if len(calls) == 2:
            raise RuntimeError("no room")
        return real(m, mem, delta, drop)

    monkeypatch.setattr(training, "commit_update", second_fails)
    with pytest.raises(RuntimeError, match="no room") as info:
        training.training_step(model, contexts, _ids(10, 3, vocab), victims=victims)
    assert "committing context chunk 1 of 2 failed" in "\n".join(info.value.__notes__)
    twin.inject(contexts[0], victims=victims[0])
    _same_memory(_snapshot(model), _snapshot(twin))
