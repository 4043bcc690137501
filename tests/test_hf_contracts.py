"""Issue 20, item 4: the Hugging Face contracts of ``MPlusForCausalLM`` (golden tiny M+ config, fp32, CPU).

* ``forward(labels=...)`` gives ``LlamaForCausalLM``'s loss (shifted, ``-100`` ignored, ``num_items_in_batch``); the
  forward records no gradients, so a training step through it (a Trainer's) is refused while ``evaluate`` works;
* what mplus would silently ignore is refused by name: unknown or unsupported ``forward`` / ``generate`` keywords,
  caches of other types, beam search and the other decoding modes it cannot run, ``cache_implementation``;
* ``from_pretrained`` takes transformers' harmless keywords and refuses the rest by name;
* ``save_pretrained`` keeps the official float32 of the long-term ages and recall frequencies, exactly;
* ``mplus.__version__``; the Auto classes (``model_type: "mplus"``); ``pipeline("text-generation")`` and streamers;
* bad input (numpy / bool / uint8 ids, a mis-shaped ``victims``, a prompt over ``max_length``, a state of another
  dtype, a float ``dtype`` that is not, a checkpoint missing a tensor, a memory file with NaN rows) is an error naming
  the argument, with every memory exactly as it was.
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import io
import json
import logging
import re
import shutil
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from _golden import GOLDEN, load_state
from _memory import assert_same, snapshot
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from transformers import AutoConfig, AutoModelForCausalLM, DynamicCache, GenerationConfig

import mplus
from mplus import MemoryState, MPlusConfig
from mplus.checkpoint import load_memory, save_memory
from mplus.memory.serialization import ltm_tensors
from mplus.model import MPlusForCausalLM
from mplus_kernels.testing import assert_close, assert_equal

MODEL_DIR = GOLDEN / "model"
IDS = torch.tensor([[3, 1, 4, 1, 5, 9, 2, 6], [2, 7, 1, 8, 2, 8, 1, 8]])
PROMPT = IDS[:1, :5]
VOCAB = 256  # the golden config's


def _model(**kw) -> MPlusForCausalLM:
    return MPlusForCausalLM.from_pretrained(str(MODEL_DIR), max_length=64, **kw)


@pytest.fixture(scope="module")
def model() -> MPlusForCausalLM:
    """One model for the tests that change no memory (each checks that it did not)."""
    return _model()


# --------------------------------------------------------------------------------------------------- labels, loss
def _causal_lm_loss(logits: torch.Tensor, labels: torch.Tensor, num_items: int | None = None) -> torch.Tensor:
    """LlamaForCausalLM's loss written out: token t predicts label t + 1, -100 ignored, mean (or sum / num_items)."""
    flat = logits[:, :-1].reshape(-1, logits.shape[-1]).float()
    target = labels[:, 1:].reshape(-1)
    if num_items is None:
        return torch.nn.functional.cross_entropy(flat, target, ignore_index=-100)
    return torch.nn.functional.cross_entropy(flat, target, ignore_index=-100, reduction="sum") / num_items


def test_labels_give_the_causal_lm_loss(model):
    before = snapshot(model)
    labels = IDS.clone()
    labels[0, :3] = -100  # a prompt left out of the loss
    labels[1, -1] = -100
    out = model(IDS, labels=labels)
    assert out.loss is not None and out.loss.shape == ()
    assert_close(out.loss, _causal_lm_loss(out.logits, labels), atol=1e-6, rtol=1e-6, name="loss")
    assert_equal(model(IDS).logits, out.logits, name="logits (labels change nothing else)")
    # a Trainer's gradient accumulation: the sum over the batch's tokens divided by the count over every batch
    summed = model(IDS, labels=labels, num_items_in_batch=torch.tensor(40))
    assert_close(summed.loss, _causal_lm_loss(out.logits, labels, 40), atol=1e-6, rtol=1e-6, name="sum / items")
    loss, logits, cache = model(IDS, labels=labels, return_dict=False)
    assert_equal(loss, out.loss, name="tuple loss")
    assert_equal(logits, out.logits, name="tuple logits")
    assert cache.length == IDS.shape[1]
    assert_same(snapshot(model), before)


@pytest.mark.parametrize(
    ("labels", "kw", "match"),
    [
        (IDS[:, :-1], {}, r"labels is \[2, 7\], input_ids \[2, 8\]"),
        (IDS.bool(), {}, "labels must be an int64 or int32 tensor"),
        (IDS.numpy(), {}, "labels must be an int64 or int32 tensor"),
        (torch.full_like(IDS, VOCAB), {}, r"labels must be in \[0, 256\) or -100"),
        (IDS, {"logits_to_keep": 1}, "labels need every position's logits"),
    ],
)
def test_bad_labels_are_named(model, labels, kw, match):
    with pytest.raises(ValueError, match=match):
        model(IDS, labels=labels, **kw)


def test_forward_records_no_gradient_and_refuses_a_training_step(model):
    """The decision (README, forward's docstring): forward attends the memory through K/V cached without gradients,
    so it never records any; its loss is an evaluation loss. A training step through it is refused, not silent."""
    assert torch.is_grad_enabled() and not model.training
    out = model(IDS, labels=IDS)
    assert not out.loss.requires_grad and not out.logits.requires_grad
    model.train()
    try:
        with pytest.raises(RuntimeError, match=r"mplus\.training\.training_step"):
            model(IDS, labels=IDS)
        with torch.no_grad():  # an evaluation in train mode is fine
            assert_close(model(IDS, labels=IDS).loss, out.loss, atol=1e-6, rtol=0, name="no_grad loss")
        model(IDS)  # no labels: generation as ever
    finally:
        model.eval()


def test_trainer_evaluates_and_refuses_to_train(tmp_path):
    """transformers' Trainer end to end: ``evaluate`` gets the loss of every token; ``train`` (model(**batch) with
    gradients on, in train mode) is refused with the way to train."""
    from transformers import Trainer, TrainingArguments

    model = _model()
    data = [{"input_ids": row, "labels": row} for row in torch.randint(0, VOCAB, (4, 8))]
    args = TrainingArguments(output_dir=str(tmp_path), report_to=[], use_cpu=True, max_steps=1,
                             per_device_eval_batch_size=2, per_device_train_batch_size=2)  # fmt: skip
    trainer = Trainer(model=model, args=args, train_dataset=data, eval_dataset=data)
    ids = torch.stack([d["input_ids"] for d in data])
    with torch.no_grad():
        expected = _causal_lm_loss(model(ids).logits, ids)
    assert abs(trainer.evaluate()["eval_loss"] - float(expected)) < 1e-5
    before = snapshot(model)
    with pytest.raises(RuntimeError, match=r"train with mplus\.training\.training_step"):
        trainer.train()
    after = snapshot(model)
    for rng in ("rng.cpu", "torch rng"):  # the Trainer seeds torch's generator (the default state draws from it)
        del before[rng], after[rng]
    assert_same(after, before)


# ------------------------------------------------------------------------------------------ refused keywords
@pytest.mark.parametrize(
    ("kw", "error", "match"),
    [
        ({"output_attentions": True}, ValueError, "output_attentions is not supported"),
        ({"position_ids": torch.arange(8)[None]}, ValueError, "position_ids is not supported"),
        ({"cache_position": torch.arange(8)}, ValueError, "cache_position is not supported"),
        ({"inputs_embeds": torch.zeros(1, 8, 64)}, ValueError, "inputs_embeds is not supported"),
        ({"cache_implementation": "static"}, TypeError, r"unexpected keyword argument\(s\) \['cache_implementation'\]"),
        ({"return_dict": "yes"}, TypeError, "return_dict must be a bool"),
    ],
)
def test_forward_refuses_what_it_would_ignore(model, kw, error, match):
    before = snapshot(model)
    with pytest.raises(error, match=match):
        model(IDS[:1], **kw)
    assert_same(snapshot(model), before)


def test_forward_takes_the_keywords_callers_pass_by_default(model):
    out = model(IDS[:1], output_attentions=False, position_ids=None, return_dict=True, use_cache=False)
    assert out.past_key_values is None
    assert_equal(out.logits, model(IDS[:1]).logits, name="logits")


@pytest.mark.parametrize(
    ("kw", "match"),
    [
        ({"cache_implementation": "static"}, "cache_implementation='static' is not supported"),
        ({"cache_implementation": "paged"}, "cache_implementation='paged' is not supported"),
        ({"generation_config": GenerationConfig(cache_implementation="static")}, "cache_implementation='static'"),
        ({"output_attentions": True}, "output_attentions is not supported"),
        ({"position_ids": torch.arange(5)[None]}, "position_ids is not supported"),
        ({"foo": 1}, "keyword argument 'foo' is neither a generation option"),
        ({"num_beams": 2}, r"beam search \(num_beams > 1: beam_search\) is not supported"),
        ({"num_beams": 2, "do_sample": True}, r"beam search \(num_beams > 1: beam_sample\)"),
        ({"generation_config": GenerationConfig(num_beams=3, max_new_tokens=2)}, "beam search"),
        ({"penalty_alpha": 0.6, "top_k": 4}, r"contrastive search .* is not supported"),
        ({"prompt_lookup_num_tokens": 2}, r"assisted decoding .* is not supported"),
        ({"dola_layers": "low"}, r"DoLa decoding .* is not supported"),
        ({"prefill_chunk_size": 2}, "prefill_chunk_size=2 is not supported"),
    ],
)
def test_generate_refuses_what_it_would_ignore(model, kw, match):
    before = snapshot(model)
    kw = {"max_new_tokens": 2, **kw}
    with pytest.raises(ValueError, match=match):
        model.generate(PROMPT, **kw)
    assert_same(snapshot(model), before)


def test_assistant_model_is_refused(model):
    with pytest.raises(ValueError, match=r"assisted decoding \(assistant_model"):
        model.generate(PROMPT, max_new_tokens=2, assistant_model=model)


def test_a_foreign_cache_is_refused_by_name(model):
    before = snapshot(model)
    with pytest.raises(TypeError, match="forward: past_key_values must be an MPlusCache .* got DynamicCache"):
        model(PROMPT, past_key_values=DynamicCache())
    with pytest.raises(TypeError, match="generate: past_key_values must be an MPlusCache .* got DynamicCache"):
        model.generate(PROMPT, max_new_tokens=2, past_key_values=DynamicCache())
    assert_same(snapshot(model), before)


def test_generate_keeps_the_options_it_can_honour(model):
    greedy = model.generate(PROMPT, max_new_tokens=3, do_sample=False)
    for kw in [{"use_cache": False}, {"use_cache": True}, {"output_attentions": False}]:
        assert torch.equal(model.generate(PROMPT, max_new_tokens=3, do_sample=False, **kw), greedy), kw
    out = model.generate(PROMPT, max_new_tokens=3, do_sample=False, output_hidden_states=True,
                         return_dict_in_generate=True)  # fmt: skip
    assert torch.equal(out.sequences, greedy)
    assert len(out.hidden_states) == 3 and len(out.hidden_states[0]) == model.config.num_hidden_layers + 1
    assert out.hidden_states[0][0].shape[:2] == PROMPT.shape and out.hidden_states[1][0].shape[1] == 1


def test_num_return_sequences_repeats_each_rows_memory(model):
    """Samples over a list of states (one per row): each row's samples attend its own state (top_k=1: the greedy
    token, so each equals its state's greedy generation)."""
    states = [model.new_memory(seed=1), model.new_memory(seed=2)]
    for state, ids in zip(states, [load_state(1)["context_ids"], load_state(2)["context_ids"]]):
        model.inject(ids, memory=state)
    prompts = IDS[:, :5]
    out = model.generate(prompts, memory=states, do_sample=True, top_k=1, num_return_sequences=2, max_new_tokens=3)
    assert out.shape == (4, 8)
    for i, state in enumerate(states):
        alone = model.generate(prompts[i : i + 1], memory=state, do_sample=False, max_new_tokens=3)
        assert torch.equal(out[2 * i], alone[0]) and torch.equal(out[2 * i + 1], alone[0]), i


# ------------------------------------------------------------------------------------------------ from_pretrained
def test_harmless_from_pretrained_keywords_are_taken(model):
    loaded = MPlusForCausalLM.from_pretrained(
        str(GOLDEN), subfolder="model", max_length=64, trust_remote_code=True, low_cpu_mem_usage=True,
        attn_implementation="mplus", revision=None, weights_only=True, use_safetensors=True, output_loading_info=False,
        _from_auto=True, adapter_kwargs={}, torch_dtype="float32",
    )  # fmt: skip
    assert_equal(loaded(IDS).logits, model(IDS).logits, name="logits")


@pytest.mark.parametrize(
    ("kw", "match"),
    [
        ({"attn_implementation": "sdpa"}, "attn_implementation='sdpa'"),
        ({"variant": "fp16"}, "variant is not supported"),
        ({"gguf_file": "model.gguf"}, "gguf_file is not supported"),
        ({"quantization_config": {"load_in_8bit": True}}, "quantization_config is not supported"),
        ({"output_loading_info": True}, "output_loading_info is not supported"),
        ({"use_safetensors": False}, "use_safetensors=False"),
        ({"key_mapping": {"a": "b"}}, "key_mapping is not supported"),
        ({"config": "config.json"}, "config must be an MPlusConfig"),
        ({"subfolder": "nowhere"}, "has no subfolder 'nowhere'"),
        ({"colour": "blue"}, r"unknown keyword argument\(s\) \['colour'\]"),
        ({"dtype": torch.int64}, "dtype=torch.int64 is not a floating dtype"),
        ({"torch_dtype": torch.uint8}, "dtype=torch.uint8 is not a floating dtype"),
        ({"dtype": "int32"}, "dtype=torch.int32 is not a floating dtype"),
        ({"dtype": 5}, "dtype 5 is not a torch.dtype"),
    ],
)
def test_from_pretrained_keywords_it_cannot_honour_are_refused_by_name(kw, match):
    with pytest.raises(ValueError, match=match):
        MPlusForCausalLM.from_pretrained(str(MODEL_DIR), **kw)


def test_a_checkpoint_missing_a_tensor_names_the_file_and_the_tensor(tmp_path):
    tensors = load_file(str(MODEL_DIR / "model.safetensors"))
    del tensors["ltm_keys.1"], tensors["model.layers.2.mlp.down_proj.lora_A.default.weight"]
    save_file(tensors, str(tmp_path / "model.safetensors"))
    shutil.copy(MODEL_DIR / "config.json", tmp_path / "config.json")
    file = re.escape(str(tmp_path / "model.safetensors"))
    with pytest.raises(ValueError, match=rf"(?s)from_pretrained: {file} does not match.*down_proj.*ltm_keys\.1"):
        MPlusForCausalLM.from_pretrained(str(tmp_path))


# ------------------------------------------------------------------------------------------------ save_pretrained
def _dtypes(path: Path) -> dict[str, str]:
    with safe_open(str(path), framework="pt") as f:
        return {k: f.get_slice(k).get_dtype() for k in f.keys()}  # noqa: SIM118 (not iterable)


def test_save_pretrained_writes_the_official_dtypes_exactly(tmp_path):
    """Every tensor in the golden checkpoint's dtype (ages and recall frequencies float32, not float64), and after
    injections the ages (whole numbers < 2^24) and frequencies come back exactly."""
    model = _model()
    model.save_pretrained(tmp_path / "fresh")
    assert _dtypes(tmp_path / "fresh" / "model.safetensors") == _dtypes(MODEL_DIR / "model.safetensors")
    torch.manual_seed(5)
    for step in (1, 2):  # update_ltm_frequency = 2: one merge, new rows with new ages and frequencies
        model.inject(load_state(step)["context_ids"])
    model.save_pretrained(tmp_path / "injected")
    assert set(_dtypes(tmp_path / "injected" / "model.safetensors").values()) == {"F32"}
    again = MPlusForCausalLM.from_pretrained(str(tmp_path / "injected"), max_length=64)
    have, want = ltm_tensors(again.ltm), ltm_tensors(model.ltm)
    for layer in range(model.config.num_hidden_layers):
        for name in (f"ltm_ages.{layer}", f"ltm_recall_frequencies.{layer}"):
            assert want[name].dtype == torch.float64 and want[name].numel() > 20  # the store's exact counts, grown
            assert_equal(have[name], want[name], name=name)


def test_save_pretrained_warns_when_float32_would_round(tmp_path):
    model = _model()
    with model.memory.mutate(advance=False):  # a hand-made store: an age past 2^24 and a fractional frequency
        model.ltm.age[0][0] = 2.0**24 + 1
        model.ltm.rf[1][0] = 0.1
    with pytest.warns(UserWarning) as record:
        model.save_pretrained(tmp_path / "saved")
    messages = " ".join(str(w.message) for w in record)
    assert "ltm_ages.0 holds values float32" in messages and "ltm_recall_frequencies.1" in messages
    assert "save_memory" in messages


# --------------------------------------------------------------------------------------------- version, Auto classes
def test_version_is_the_package_version():
    setup = (Path(__file__).parents[1] / "setup.py").read_text()
    assert mplus.__version__ == importlib.metadata.version("mplus")
    assert f'version="{mplus.__version__}"' in setup


def test_auto_classes_build_an_mplus_model_from_what_save_pretrained_wrote(model, tmp_path):
    model.save_pretrained(tmp_path / "saved")
    config = json.loads((tmp_path / "saved" / "config.json").read_text())
    assert config["model_type"] == "mplus" and config["architectures"] == ["MPlusForCausalLM"]
    assert isinstance(AutoConfig.from_pretrained(tmp_path / "saved"), MPlusConfig)
    auto = AutoModelForCausalLM.from_pretrained(tmp_path / "saved", max_length=64, dtype="auto")
    assert type(auto) is MPlusForCausalLM
    assert_equal(auto(IDS).logits, model(IDS).logits, name="logits through AutoModelForCausalLM")
    # an official (model_type "llama") checkpoint routes when given its MPlusConfig
    routed = AutoModelForCausalLM.from_pretrained(MODEL_DIR, config=MPlusConfig.from_pretrained(MODEL_DIR),
                                                  max_length=64)  # fmt: skip
    assert type(routed) is MPlusForCausalLM
    assert_equal(routed(IDS).logits, model(IDS).logits, name="logits of the routed official checkpoint")


@contextlib.contextmanager
def transformers_log() -> Iterator[io.StringIO]:
    """What transformers logs meanwhile (its handler writes to the stream it found at import: capfd misses it)."""
    stream, logger = io.StringIO(), logging.getLogger("transformers")
    handler = logging.StreamHandler(stream)
    logger.addHandler(handler)
    try:
        yield stream
    finally:
        logger.removeHandler(handler)


def test_auto_class_on_an_official_llama_typed_checkpoint_is_not_silent():
    """An official checkpoint says model_type "llama": AutoModelForCausalLM builds transformers' Llama (mplus does not
    remap transformers' own Llama config), and its load report names the memory it leaves out."""
    with transformers_log() as log:
        llama = AutoModelForCausalLM.from_pretrained(MODEL_DIR)
    assert type(llama).__name__ == "LlamaForCausalLM"
    report = log.getvalue()
    assert re.search(r"memory\s+\|\s*UNEXPECTED", report) and re.search(r"ltm\.\{0, 1, 2\}\s+\|\s*UNEXPECTED", report)


# ----------------------------------------------------------------------------------------- pipeline and streamer
@pytest.fixture(scope="module")
def text_model():
    """A from-scratch tiny M+ (random weights) with SmolLM2's tokenizer and vocabulary: the text plumbing, not
    quality. The tokenizer comes from the real-model GGUF file (skips where it is not installed)."""
    from _real_model import require_real_model
    from transformers import AutoTokenizer

    folder, name = require_real_model()
    tok = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    special = {"bos_token_id": tok.bos_token_id, "eos_token_id": tok.eos_token_id, "pad_token_id": tok.pad_token_id}
    cfg = MPlusConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=96, num_hidden_layers=2,  # 49152, 576
                      num_attention_heads=4, num_key_value_heads=2, num_tokens=4, num_blocks=4, num_ltm_blocks=1,
                      selector_hidden_dim=16, ltm_initial_size=0, rope_theta=10000.0, **special,
                      lora_config={"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj"]})  # fmt: skip
    model = MPlusForCausalLM(cfg, max_length=64)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn_like(p) * 0.05)
    context = "The weekly planning meeting moved from Monday morning to Thursday at noon, in the small room upstairs."
    model.inject(tok(context, return_tensors="pt").input_ids)  # 16 tokens at least (no short-chunk warning)
    return model, tok


def test_text_generation_pipeline(text_model):
    from transformers import pipeline

    model, tok = text_model
    with transformers_log() as log:
        generate = pipeline("text-generation", model=model, tokenizer=tok)
    assert "is not supported for text-generation" not in log.getvalue()  # the Auto registration
    before = snapshot(model)
    got = generate("When is the meeting?", max_new_tokens=6, do_sample=False, return_full_text=False)
    ids = tok("When is the meeting?", return_tensors="pt").input_ids
    new = model.generate(ids, max_new_tokens=6, do_sample=False)[0, ids.shape[1] :]
    assert got == [{"generated_text": tok.decode(new, skip_special_tokens=True)}]
    assert_same(snapshot(model), before)


def test_generate_streams_through_a_text_streamer(text_model):
    from transformers import TextStreamer

    class Collect(TextStreamer):
        def __init__(self, tokenizer):
            super().__init__(tokenizer, skip_prompt=True)
            self.text = []

        def on_finalized_text(self, text: str, stream_end: bool = False) -> None:
            self.text.append(text)

    model, tok = text_model
    ids = tok("When is the meeting?", return_tensors="pt").input_ids
    streamer = Collect(tok)
    out = model.generate(ids, max_new_tokens=6, do_sample=False, streamer=streamer)
    assert len(streamer.text) > 1  # token by token, not once at the end
    assert "".join(streamer.text) == tok.decode(out[0, ids.shape[1] :])


# ------------------------------------------------------------------------------------------------------ bad input
BAD_IDS = [
    (np.array([[3, 1, 4]]), "a numpy.ndarray"),
    (torch.tensor([[True, False, True]]), "torch.bool"),
    (torch.tensor([[3, 1, 4]], dtype=torch.uint8), "torch.uint8"),
    (torch.tensor([[3.0, 1.0, 4.0]]), "torch.float32"),
]


@pytest.mark.parametrize(("ids", "got"), BAD_IDS, ids=["numpy", "bool", "uint8", "float"])
def test_bad_ids_are_named_with_every_memory_unchanged(model, ids, got):
    state = model.new_memory(seed=3)
    before, before_state = snapshot(model), snapshot(state)
    long_ids = np.repeat(ids, 6, axis=1) if isinstance(ids, np.ndarray) else ids.repeat(1, 6)  # 18 tokens
    for call, name, arg in [
        (lambda: model(ids), "forward", "input_ids"),
        (lambda: model.generate(ids, max_new_tokens=2), "generate", "inputs"),
        (lambda: model.generate(input_ids=ids, max_new_tokens=2), "generate", "input_ids"),
        (lambda: model.inject(long_ids), "inject", "context_ids"),
        (lambda: model.inject(long_ids, memory=state), "inject", "context_ids"),
    ]:
        with pytest.raises(ValueError, match=rf"{name}: expected integer token ids {arg} .*got {got}"):
            call()
    assert_same(snapshot(model), before)
    assert_same(snapshot(state), before_state)


@pytest.mark.parametrize(
    ("victims", "error", "match"),
    [
        (torch.zeros(2, 8, dtype=torch.long), ValueError, r"inject: victims must be \[L=3, K=8\], got \[2, 8\]"),
        (torch.zeros(3, 9, dtype=torch.long), ValueError, r"inject: victims must be \[L=3, K=8\], got \[3, 9\]"),
        (torch.zeros(3, 8, dtype=torch.bool), TypeError, "inject: victims must be an integer tensor"),
        (torch.full((3, 8), 32), ValueError, r"inject: victims holds positions outside \[0, N=32\)"),
        (torch.zeros(3, 8, dtype=torch.long), ValueError, "inject: victims repeats a position"),
    ],
)
def test_bad_victims_are_named_as_inject_names_them(model, victims, error, match):
    before = snapshot(model)
    with pytest.raises(error, match=match):
        model.inject(load_state(1)["context_ids"], victims=victims)
    assert_same(snapshot(model), before)


def test_a_prompt_over_max_length_names_max_length(model):
    before = snapshot(model)
    long = torch.ones(1, 65, dtype=torch.long)
    with pytest.raises(ValueError, match=r"forward: 65 tokens after 0 cached .* exceed max_length=64"):
        model(long)
    with pytest.raises(ValueError, match=r"generate: up to 67 tokens .* exceed the model's max_length=64"):
        model.generate(long, max_new_tokens=2)
    out = model(IDS[:1])  # a cache of 8: 57 more tokens do not fit either
    with pytest.raises(ValueError, match=r"forward: 57 tokens after 8 cached .* exceed max_length=64"):
        model(torch.ones(1, 57, dtype=torch.long), past_key_values=out.past_key_values)
    assert out.past_key_values.length == 8  # the cache did not advance
    cache = model.new_cache(max_tokens=4)
    with pytest.raises(ValueError, match=r"exceed the cache's 4 rows"):
        model(IDS[:1], past_key_values=cache)
    assert_same(snapshot(model), before)


def test_a_state_of_another_dtype_is_named_by_dtype(model):
    state = model.new_memory(seed=4).to(torch.float64)
    before, before_state = snapshot(model), snapshot(state)
    for call, name in [
        (lambda: model.inject(load_state(1)["context_ids"], memory=state), "inject"),
        (lambda: model.generate(PROMPT, max_new_tokens=2, memory=state), "generate"),
        (lambda: model(PROMPT, memory=state), "forward"),
        (lambda: model(IDS, memory=[model.memory, state]), r"forward: memory\[1\]"),
    ]:
        with pytest.raises(ValueError, match=rf"{name}: memory holds torch.float64 tensors, .*torch.float32 \(dtype\)"):
            call()
    assert_same(snapshot(model), before)
    assert_same(snapshot(state), before_state)
    assert model.generate(PROMPT, max_new_tokens=2, memory=state.to(torch.float32)).shape == (1, 7)  # the fix named


@pytest.mark.parametrize("name", ["stm.hidden", "stm.k", "stm.v"])
@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_a_memory_file_with_non_finite_short_term_rows_is_refused(tmp_path, name, value):
    donor = _model()
    donor.inject(load_state(1)["context_ids"])
    good = str(tmp_path / "good.safetensors")
    save_memory(donor, good)
    sd = load_file(good)
    sd[name].view(-1)[5] = value
    bad = str(tmp_path / "bad.safetensors")
    save_file(sd, bad)
    target = _model()
    before = snapshot(target)
    with pytest.raises(ValueError, match=rf"load_memory\(.*bad.safetensors\): {name} holds non-finite values"):
        load_memory(target, bad)
    with pytest.raises(ValueError, match=rf"MemoryState.load\(.*bad.safetensors\): {name} holds non-finite"):
        MemoryState.load(bad, like=target)
    assert_same(snapshot(target), before)
    load_memory(target, good)  # the same file without the bad value loads
