"""Issue 20, item 1: M+ and MemoryLLM from any Llama checkpoint (``MPlusForCausalLM.from_base``, ``mplus/base.py``).

On the real SmolLM2-135M-Instruct weights (GQA 9/3, head_dim 64, tied embeddings, RoPE base 100000 inside
transformers 5's ``rope_parameters``): with the memory bypassed (``model.use_memory = False``) the new model gives the
base model's logits and greedy text (LoRA B = 0); with the memory on it injects and generates; the RoPE, the LoRA
init, the tied ``lm_head``, the memory's initialisation and the ``save_pretrained`` round trip are checked; a few
training steps on real English (``pydoc_data.topics``) lower the loss. A tiny random Llama (untied, biased
projections, llama3 RoPE) covers the variants without the real model; bad input is refused by name.
"""

from __future__ import annotations

import json
import os
import time

import pytest
import torch
from _real_model import base_folder, require_real_model
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM, MistralConfig
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

import mplus
from mplus import MPlusConfig, MPlusForCausalLM, training
from mplus.base import memory_config, read_base_config, tile_rows
from mplus.lora import LoRALinear

SMALL = dict(num_tokens=8, num_blocks=4)  # N = 24 (M+: 3 short-term blocks + 1 long-term) / 32 (MemoryLLM), K0 = 8
PARITY_ATOL = 2e-4  # fp32: the fused attention vs transformers' sdpa, 30 layers (measured 4e-5)


# ------------------------------------------------------------------------------------------------------ fixtures
@pytest.fixture(scope="module")
def smol() -> str:
    require_real_model()
    return base_folder()


@pytest.fixture(scope="module")
def base(smol):
    return AutoModelForCausalLM.from_pretrained(smol, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def tokenizer(smol):
    return mplus.load_tokenizer(smol)


@pytest.fixture(scope="module")
def models(smol) -> dict[str, MPlusForCausalLM]:
    """One model of each kind, built once (tests that change them work on copies or restore them)."""
    return {
        kind: MPlusForCausalLM.from_base(smol, kind=kind, max_length=256, **SMALL) for kind in ("mplus", "memoryllm")
    }


@pytest.fixture
def prompt(tokenizer) -> torch.Tensor:
    return tokenizer("The capital of France is Paris. The capital of Italy is", return_tensors="pt").input_ids


def _tiny_llama(folder, **overrides) -> str:
    """A random Llama saved as a transformers folder (no tokenizer): 2 layers, GQA 4/2, head_dim 16."""
    cfg = dict(
        vocab_size=96, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, max_position_embeddings=1024, bos_token_id=1, eos_token_id=2,
    )  # fmt: skip
    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(**{**cfg, **overrides})).save_pretrained(folder)
    return str(folder)


def _ids(n: int, vocab: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(3, vocab, (1, n), generator=torch.Generator().manual_seed(seed))


# ----------------------------------------------------------------------------------------- the real base model
@pytest.mark.parametrize("kind", ["mplus", "memoryllm"])
def test_bypassed_memory_reproduces_the_base_model(models, base, prompt, kind):
    """LoRA B = 0 and ``use_memory = False``: the base model's logits (fp32: the prefill, the decode steps of
    ``generate``, of ``forward`` with the cache and of ``decode_step``) and its greedy text."""
    model = models[kind]
    model.use_memory = False
    try:
        greedy = dict(max_new_tokens=8, do_sample=False, output_logits=True, return_dict_in_generate=True)
        theirs = base.generate(prompt, **greedy)
        ours = model.generate(prompt, **greedy)
        assert torch.equal(ours.sequences, theirs.sequences), (ours.sequences, theirs.sequences)
        out = model(prompt)
        deltas = {
            "prefill": (out.logits - base(prompt).logits).abs().max().item(),
            "generate": (torch.stack(ours.logits) - torch.stack(theirs.logits)).abs().max().item(),
        }
        # one decode step through the cache, and through the static-cache decode_step, at the base's positions
        token, step_logits = theirs.sequences[:, prompt.shape[1], None], theirs.logits[1]
        step = model(token, past_key_values=out.past_key_values).logits[:, -1]
        deltas["forward step"] = (step - step_logits).abs().max().item()
        cache = model(prompt).past_key_values
        deltas["decode_step"] = (
            (model.decode_step(token, torch.tensor([prompt.shape[1]]), cache) - step_logits).abs().max().item()
        )
        print(f"\n{kind}: max |logit - base logit| (fp32) " + ", ".join(f"{k} {v:.1e}" for k, v in deltas.items()))
        assert max(deltas.values()) < PARITY_ATOL
    finally:
        model.use_memory = True


@pytest.mark.parametrize("kind", ["mplus", "memoryllm"])
def test_with_the_memory_it_injects_and_generates(models, tokenizer, prompt, kind):
    model = models[kind]
    state = model.new_memory(seed=0)  # the model's own memory stays as from_base left it
    context = tokenizer("Paris is the capital of France. " * 4, return_tensors="pt").input_ids
    version = state.version
    model.inject(context, memory=state)
    assert state.version == version + 1
    out = model.generate(prompt, max_new_tokens=8, do_sample=False, memory=state)
    assert out.shape == (1, prompt.shape[1] + 8) and torch.equal(out[:, : prompt.shape[1]], prompt)
    # the memory changes what the model says: the logits differ from the bypassed ones
    with_memory = model(prompt, memory=state).logits
    model.use_memory = False
    try:
        bypassed = model(prompt, memory=state).logits
    finally:
        model.use_memory = True
    assert (with_memory - bypassed).abs().max() > 1e-2


def test_a_bypassed_cache_ignores_memory_changes(models, prompt):
    """The bypass is read at the prefill and kept by the cache: its decode steps go on (no memory segments, no stale
    cache) after an inject; a cache prefilled with the memory goes stale as before."""
    model = models["memoryllm"]
    state = model.new_memory(seed=0)
    model.use_memory = False
    try:
        bypassed = model(prompt, memory=state).past_key_values
    finally:
        model.use_memory = True
    assert not bypassed.use_memory and all(len(m) == 0 for m in bypassed.memories)
    used = model(prompt, memory=state).past_key_values
    model.inject(_ids(20, model.config.vocab_size), memory=state)
    token = torch.tensor([[42]])
    model(token, past_key_values=bypassed)  # positions continue from the prompt's; no StaleCacheError
    with pytest.raises(mplus.StaleCacheError):
        model(token, past_key_values=used)


def test_rope_base_and_frequencies_are_the_base_models(models, base):
    inv_freq = base.model.rotary_emb.inv_freq
    for model in models.values():
        assert model.config.rope_theta == 100000.0  # transformers 5 keeps it inside rope_parameters
        torch.testing.assert_close(model.inv_freq, inv_freq, rtol=0, atol=0)


def test_weights_and_initialisation(models, base):
    """Base weights in the LoRA layout; LoRA B = 0 and A kaiming-uniform in both adapters; the tied lm_head is the
    embedding; BOS rows the BOS embedding; new_memory_positional_emb zeros; projectors N(0, 0.02)."""
    ours = models["mplus"]
    theirs = dict(base.named_parameters())
    assert torch.equal(
        ours.model.layers[3].self_attn.q_proj.base_layer.weight, theirs["model.layers.3.self_attn.q_proj.weight"]
    )
    assert torch.equal(
        ours.model.layers[7].mlp.down_proj.base_layer.weight, theirs["model.layers.7.mlp.down_proj.weight"]
    )
    assert torch.equal(ours.lm_head.weight, ours.model.embed_tokens.weight)
    assert torch.equal(ours.lm_head.weight, base.lm_head.weight)
    assert ours.config.tie_word_embeddings
    loras = [m for m in ours.modules() if isinstance(m, LoRALinear)]
    assert len(loras) == 6 * ours.config.num_hidden_layers
    for m in loras:
        assert set(m.lora_A) == set(m.lora_B) == {"default", "decoder_adapter"}
        for adapter in m.lora_A:
            a, b = m.lora_A[adapter].weight, m.lora_B[adapter].weight
            assert not b.any()
            bound = 1 / m.in_features**0.5  # kaiming_uniform(a=sqrt(5)): U(-1/sqrt(fan_in), 1/sqrt(fan_in))
            assert a.abs().max() <= bound and a.abs().max() > 0.5 * bound
    bos = ours.model.embed_tokens.weight[ours.config.bos_token_id]
    assert torch.equal(ours.bos_embedding, bos.expand_as(ours.bos_embedding))
    assert not ours.new_memory_positional_emb.any()
    proj = torch.cat([p.flatten() for n, p in ours.named_parameters() if "query_proj." in n or "key_proj." in n])
    assert abs(proj.std().item() - 0.02) < 0.002 and abs(proj.mean().item()) < 0.002
    for model in models.values():
        assert all(torch.isfinite(p).all() for p in model.parameters())


def test_the_memory_starts_as_the_official_training_code_starts_it(models):
    """SPEC §4.7: the first context's delta, tiled over the short-term memory (ages 0); M+ also puts the delta rows in
    its long-term memory (rf 0, ages 0), with an empty dropped-row cache."""
    for kind, model in models.items():
        cfg = model.config
        rows = model.stm.logical("hidden")
        k = cfg.num_tokens
        assert torch.equal(rows, tile_rows(rows[:, -k:], cfg.stm_size))  # N / K copies of the last K rows
        assert torch.equal(rows[:, :k], rows[:, -k:]) and not torch.equal(rows[:, 0], rows[:, 1])
        assert not model.stm.age.any()
        if kind == "mplus":
            assert model.ltm.size == [k] * cfg.num_hidden_layers and model.ltm.cache_len == 0
            hidden, keys = model.ltm.layers[0].hidden[:k], model.ltm.layers[0].keys[:k]
            assert torch.equal(hidden, rows[0, -k:])
            layer = model.layers[0]
            torch.testing.assert_close(keys, layer.self_attn.key_proj(layer.input_layernorm(hidden)))
            assert not model.ltm.layers[0].rf[:k].any() and not model.ltm.layers[0].age[:k].any()
        else:
            assert model.ltm is None


def test_save_pretrained_round_trips(models, prompt, tmp_path):
    model = models["mplus"]
    model.save_pretrained(tmp_path / "m")
    again = MPlusForCausalLM.from_pretrained(str(tmp_path / "m"), max_length=256)
    assert again.config.rope_theta == 100000.0 and again.config.stm_size == model.config.stm_size
    mine, theirs = model.state_dict(), again.state_dict()
    assert mine.keys() == theirs.keys() and all(torch.equal(mine[k], theirs[k]) for k in mine)
    assert torch.equal(again.stm.logical("hidden"), model.stm.logical("hidden"))
    assert again.ltm.size == model.ltm.size
    torch.testing.assert_close(again(prompt).logits, model(prompt).logits, rtol=0, atol=0)


def test_a_gguf_file_builds_the_same_model(models):
    """``gguf_file=``: config, weights (dequantized by transformers) and tokenizer (for the default first context)
    read from the GGUF file give the model the converted folder gives."""
    folder, name = require_real_model()
    model = MPlusForCausalLM.from_base(folder, gguf_file=name, kind="memoryllm", max_length=256, **SMALL)
    ref = models["memoryllm"]
    mine, theirs = model.state_dict(), ref.state_dict()
    assert mine.keys() == theirs.keys() and all(torch.equal(mine[k], theirs[k]) for k in mine)
    assert torch.equal(model.stm.logical("hidden"), ref.stm.logical("hidden"))


def test_training_from_smollm2_lowers_the_loss(smol, tokenizer):
    """M+ from SmolLM2 on real English text (Python's help topics): 4 AdamW steps on a (context, target) pair of 64
    tokens each lower its loss (LoRA B starts at 0: the first step moves B only)."""
    from pydoc_data.topics import topics

    text = topics["class"] + topics["function"]
    ids = tokenizer(text, add_special_tokens=False, return_tensors="pt").input_ids
    context, target = ids[:, :64], ids[:, 64:128]
    model = MPlusForCausalLM.from_base(smol, max_length=256, **SMALL)
    training.prepare(model)
    opt = torch.optim.AdamW(training.param_groups(model, lr=1e-3, selector_lr=1e-3))

    def loss() -> tuple[float, float]:
        with torch.no_grad():
            out = training.training_step(model, context, target, commit=False)
        return out.lm_loss.item(), out.loss.item()

    before = loss()
    start = time.perf_counter()
    for _ in range(4):
        opt.zero_grad()
        training.training_step(model, context, target, commit=False).loss.backward()
        opt.step()
    after = loss()
    print(f"\nlm loss {before[0]:.3f} -> {after[0]:.3f}, total {before[1]:.3f} -> {after[1]:.3f} "
          f"(4 steps, {time.perf_counter() - start:.1f} s)")  # fmt: skip
    assert after[0] < before[0] - 0.05 and after[1] < before[1]


# ------------------------------------------------------------------------------------ a tiny random Llama (no GGUF)
@pytest.mark.parametrize(
    "overrides",
    [
        dict(tie_word_embeddings=False, attention_bias=True, mlp_bias=True),
        dict(
            rope_parameters={
                "rope_type": "llama3",
                "rope_theta": 500000.0,
                "factor": 8.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 256,
            }
        ),  # fmt: skip
        dict(rope_parameters={"rope_type": "linear", "rope_theta": 10000.0, "factor": 2.0}, tie_word_embeddings=True),
    ],
    ids=["untied-bias", "llama3", "linear-tied"],
)
def test_tiny_llamas_reproduce_their_base(tmp_path, overrides):
    folder = _tiny_llama(tmp_path / "base", **overrides)
    base = LlamaForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    model = MPlusForCausalLM.from_base(folder, init_context=_ids(12, 96), num_tokens=4, num_blocks=3, max_length=64)
    torch.testing.assert_close(model.inv_freq, base.model.rotary_emb.inv_freq, rtol=0, atol=0)
    model.use_memory = False
    ids = _ids(9, 96, seed=1)
    torch.testing.assert_close(model(ids).logits, base(ids).logits, rtol=0, atol=1e-5)
    assert torch.equal(
        model.generate(ids, max_new_tokens=6, do_sample=False), base.generate(ids, max_new_tokens=6, do_sample=False)
    )


def test_dtype_seed_and_short_contexts(tmp_path):
    folder = _tiny_llama(tmp_path / "base")
    kw = dict(num_tokens=4, num_blocks=3, max_length=64)
    a = MPlusForCausalLM.from_base(folder, init_context=[5, 6, 7], dtype=torch.bfloat16, seed=1, **kw)
    assert a.lm_head.weight.dtype == torch.bfloat16 and a.stm.hidden.dtype == torch.bfloat16
    # a context shorter than K: its T rows tiled (8 = 2 x 3 + the last 2)
    rows = a.stm.logical("hidden")
    assert torch.equal(rows[:, :3], rows[:, 3:6]) and torch.equal(rows[:, 6:], rows[:, 1:3])
    # device=: the model goes there before its memory is filled (the meta device stands in for a GPU)
    meta = MPlusForCausalLM.from_base(folder, kind="memoryllm", init_context=[5, 6, 7], device="meta", **kw)
    assert meta.lm_head.weight.device.type == "meta" and meta.stm.hidden.device.type == "meta"
    # the seed decides the random initialisations (LoRA A, projectors), nothing else does
    b = MPlusForCausalLM.from_base(folder, init_context=torch.tensor([5, 6, 7]), seed=1, **kw)
    c = MPlusForCausalLM.from_base(folder, init_context=[[5, 6, 7]], seed=1, **kw)
    d = MPlusForCausalLM.from_base(folder, init_context=[5, 6, 7], seed=2, **kw)
    sb, sc, sd = (m.state_dict() for m in (b, c, d))
    assert all(torch.equal(sb[k], sc[k]) for k in sb)
    assert torch.equal(b.stm.logical("hidden"), c.stm.logical("hidden"))
    name = "model.layers.0.self_attn.q_proj.lora_A.default.weight"
    assert not torch.equal(sb[name], sd[name])


def test_default_memory_sizes_scale_with_the_base():
    """The official sizes on Llama-3.1-8B (131072 positions); fewer blocks where the positions are fewer."""
    llama31 = LlamaConfig(
        hidden_size=4096, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
        max_position_embeddings=131072, rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0,
        "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 8192},
    )  # fmt: skip
    cfg, _ = memory_config(llama31)
    assert (cfg.num_tokens, cfg.num_blocks, cfg.num_ltm_blocks, cfg.update_ltm_frequency) == (256, 50, 10, 60)
    assert (cfg.stm_size, cfg.num_ltm_tokens, cfg.selector_hidden_dim) == (10240, 2560, 256)
    assert cfg.lora_config["r"] == 16 and cfg.lora_config["lora_alpha"] == 32 and cfg.lora_config["lora_dropout"] == 0.1
    smol = LlamaConfig(hidden_size=576, num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=8192)
    cfg, _ = memory_config(smol)  # (8192 - 2048 - 1) // 256 = 23 blocks: 18 short-term, 5 long-term
    assert (cfg.num_blocks, cfg.num_ltm_blocks, cfg.update_ltm_frequency, cfg.selector_hidden_dim) == (23, 5, 27, 32)
    assert cfg.memory_prefix_len + 2048 <= 8192
    cfg, _ = memory_config(smol, kind="memoryllm")
    assert (cfg.num_blocks, cfg.stm_size, cfg.has_ltm) == (23, 5888, False)


# ----------------------------------------------------------------------------------------- configs and RoPE
def _hf_inv_freq(config: LlamaConfig) -> torch.Tensor:
    kind = config.rope_parameters["rope_type"]
    if kind == "default":
        d = config.head_dim
        return 1.0 / (config.rope_parameters["rope_theta"] ** (torch.arange(0, d, 2).float() / d))
    return ROPE_INIT_FUNCTIONS[kind](config, "cpu")[0]


@pytest.mark.parametrize(
    "rope",
    [
        {"rope_type": "default", "rope_theta": 100000.0},
        {"rope_type": "linear", "rope_theta": 10000.0, "factor": 4.0},
        {
            "rope_type": "llama3",
            "rope_theta": 500000.0,
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 8192,
        },  # fmt: skip
    ],
    ids=["default", "linear", "llama3"],
)
def test_config_reads_transformers_5_and_4_rope(rope):
    """A transformers-5 Llama config (RoPE base inside ``rope_parameters``) and a transformers-4 one (top-level
    ``rope_theta``, ``rope_scaling`` with ``type``) give the same RoPE, the base model's."""
    llama = LlamaConfig(hidden_size=256, num_attention_heads=4, head_dim=64, max_position_embeddings=131072,
                        rope_parameters=dict(rope))  # fmt: skip
    want = _hf_inv_freq(llama)
    v5 = MPlusConfig(**llama.to_dict())
    scaling = {("type" if k == "rope_type" else k): v for k, v in rope.items() if k != "rope_theta"}
    v4 = MPlusConfig(**{**llama.to_dict(), "rope_parameters": None, "rope_theta": rope["rope_theta"],
                        "rope_scaling": scaling if rope["rope_type"] != "default" else None})  # fmt: skip
    for cfg in (v5, v4, MPlusConfig(**v5.to_dict()), MPlusConfig(**v4.to_dict())):
        assert cfg.rope_theta == rope["rope_theta"]
        torch.testing.assert_close(cfg.rope_inv_freq(), want, rtol=1e-6, atol=0)
    with pytest.raises(ValueError, match="rope_theta=1.0 disagrees"):
        MPlusConfig(rope_theta=1.0, rope_parameters=dict(rope))


def test_a_transformers_4_config_json_reads_right(tmp_path):
    """A base folder whose config.json is transformers-4 style (``rope_theta`` top level, no ``rope_parameters``)."""
    folder = _tiny_llama(tmp_path / "base", rope_parameters={"rope_type": "default", "rope_theta": 123456.0})
    path = os.path.join(folder, "config.json")
    with open(path) as f:
        fields = json.load(f)
    fields.pop("rope_parameters")
    fields.update(rope_theta=123456.0, rope_scaling={"type": "linear", "factor": 2.0}, transformers_version="4.44.0")
    with open(path, "w") as f:
        json.dump(fields, f)
    cfg, _ = memory_config(read_base_config(folder), max_length=64, num_tokens=4, num_blocks=3)
    assert cfg.rope_theta == 123456.0 and cfg.rope_parameters["rope_type"] == "linear"
    inv = 1.0 / (123456.0 ** (torch.arange(0, 16, 2).float() / 16)) / 2.0
    torch.testing.assert_close(cfg.rope_inv_freq(), inv)


# ------------------------------------------------------------------------------------------------- bad input
def test_bad_input_is_refused_by_name(tmp_path):
    folder = _tiny_llama(tmp_path / "base")
    kw = dict(init_context=[5, 6, 7], num_tokens=4, num_blocks=3, max_length=64)
    with pytest.raises(ValueError, match=r"unknown keyword\(s\) \['num_block'\]"):
        MPlusForCausalLM.from_base(folder, **{**kw, "num_block": 3})
    with pytest.raises(ValueError, match=r"\['num_ltm_blocks'\] are M\+ sizes"):
        MPlusForCausalLM.from_base(folder, kind="memoryllm", num_ltm_blocks=1, **kw)
    with pytest.raises(ValueError, match="kind='gpt'"):
        MPlusForCausalLM.from_base(folder, kind="gpt", **kw)
    with pytest.raises(ValueError, match="dtype=torch.int64 must be a floating"):
        MPlusForCausalLM.from_base(folder, dtype=torch.int64, **kw)
    with pytest.raises(ValueError, match="num_ltm_blocks=3 must be < num_blocks=3"):
        MPlusForCausalLM.from_base(folder, **{**kw, "num_ltm_blocks": 3})
    with pytest.raises(ValueError, match="init_context has 80 tokens"):
        MPlusForCausalLM.from_base(folder, **{**kw, "init_context": list(range(3, 83))})
    with pytest.raises(ValueError, match="no tokenizer"):  # text needs the base's tokenizer; this folder has none
        MPlusForCausalLM.from_base(folder, **{**kw, "init_context": "some text"})
    MistralConfig(hidden_size=64, num_attention_heads=4, num_key_value_heads=2).save_pretrained(tmp_path / "mistral")
    with pytest.raises(ValueError, match="is a 'mistral' model .* Llama checkpoints"):
        MPlusForCausalLM.from_base(str(tmp_path / "mistral"), **kw)
    for rope in ("yarn", "dynamic"):
        LlamaConfig(rope_parameters={"rope_type": rope, "rope_theta": 1e4, "factor": 2.0}).save_pretrained(
            tmp_path / rope
        )
        with pytest.raises(ValueError, match=f"RoPE type '{rope}', which mplus cannot compute"):
            MPlusForCausalLM.from_base(str(tmp_path / rope), **kw)
    with pytest.raises(ValueError, match="device='nodevice' is not a device"):
        MPlusForCausalLM.from_base(folder, device="nodevice", **kw)
    with pytest.raises(ValueError, match="num_selector_layers=3 must be 1 or 2"):
        MPlusForCausalLM.from_base(folder, num_selector_layers=3, **kw)
    with pytest.raises(ValueError, match="cannot read a transformers config"):
        MPlusForCausalLM.from_base(str(tmp_path / "nowhere"), **kw)


def test_compiled_decode_steps_honour_the_bypass(tmp_path):
    """``compile_decode_step`` (fullgraph) on a bypassed cache: the base model's logits step after step, and an
    inject in between does not make the cache stale (it never read the memory)."""
    from torch._dynamo.testing import CompileCounterWithBackend

    folder = _tiny_llama(tmp_path / "base")
    base = LlamaForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    model = MPlusForCausalLM.from_base(folder, init_context=_ids(12, 96), num_tokens=4, num_blocks=3, max_length=64)
    torch._dynamo.reset()
    counter = CompileCounterWithBackend("aot_eager")
    step = model.compile_decode_step(backend=counter)
    ids = _ids(7, 96, seed=3)
    model.use_memory = False
    out = model(ids)
    model.use_memory = True  # the cache keeps what its prefill read
    cache, pos, seq = out.past_key_values, torch.tensor([ids.shape[1]]), ids
    token = out.logits[:, -1:].argmax(-1)
    for i in range(3):
        seq = torch.cat([seq, token], 1)
        logits = step(token, pos, cache)
        torch.testing.assert_close(logits, base(seq).logits[:, -1], rtol=0, atol=1e-5)
        token, pos = logits.argmax(-1, keepdim=True), pos + 1
        if i == 0:
            model.inject(_ids(16, 96, seed=4))
    assert counter.frame_count == 1
    torch._dynamo.reset()


def test_the_initial_long_term_rows_leave_at_the_first_merge(tmp_path):
    """M+'s long-term memory starts with the first delta's rows at recall frequency 0 (official ``fill_in_ltm``): the
    first merge with more than K0 other rows evicts them, as the official decay rule does."""
    folder = _tiny_llama(tmp_path / "base")
    model = MPlusForCausalLM.from_base(folder, init_context=_ids(12, 96), num_tokens=4, num_blocks=3, max_length=64)
    cfg = model.config
    assert (cfg.stm_size, cfg.num_ltm_tokens, cfg.update_ltm_frequency) == (8, 4, 3)
    assert not model.ltm.layers[0].rf[:4].any()
    for i in range(3):
        assert model.ltm.size[0] == 4
        model.inject(_ids(16, 96, seed=10 + i))
    assert model.ltm.size == [12] * cfg.num_hidden_layers and model.ltm.cache_len == 0
    # every row left is a merged one (rf 10, decayed once): the initial rows (rf 0 -> -1) were evicted
    assert (model.ltm.layers[0].rf[:12] == cfg.initial_rf_when_moving_stm_to_ltm - 1).all()
