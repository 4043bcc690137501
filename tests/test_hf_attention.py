"""``attn_implementation="mplus"`` and the drop-in ``FusedLlamaAttention`` on a real pretrained Llama-architecture
model (SmolLM2-135M-Instruct: 30 layers, d 576, Hq/Hkv/D 9/3/64; Llama-3.1-8B: 32, 4096, 32/8/128), against SDPA.

Parity: the logits of the mplus path are within twice SDPA's own error against a float64 SDPA run of the same weights
(FlashAttention's tolerance rule), in fp32 and bf16, and greedy text is the same. Layouts: a static cache (through
``generate(cache_implementation="static")`` and an explicit ``StaticCache``), left-padded batches (prefill and
decoding with a ``DynamicCache``: each row equals its unpadded run), packed sequences (``position_ids`` restarting in
a row; flash-attention's ``cu_seq_lens``: each sequence equals its own run; a training step's gradients), the
drop-in module in every layer of a stock model (under sdpa's, eager's and mplus' masks). Refusals: each layout the
kernel cannot run raises a ``ValueError`` naming the argument.

The figures (max |Δlogit| against SDPA, SDPA's own error) are printed at the end of the module.
"""

from __future__ import annotations

import pytest
import torch
from _real_model import base_folder, require_real_model
from transformers import AutoModelForCausalLM, AutoTokenizer, DynamicCache, StaticCache
from transformers.masking_utils import create_causal_mask

import mplus  # noqa: F401 - registers attn_implementation="mplus"
from mplus.attention import FusedLlamaAttention, FusedMemoryAttention
from mplus.hf_attention import mplus_attention_forward, mplus_attention_mask
from mplus_kernels.testing import assert_close, assert_within_reference_error

PROMPTS = ["The capital of France is Paris, and the capital of Italy is", "Once upon a time, in a small village by"]
PADDED = ["Hi", "The capital of France is", "Once upon a time there was a"]  # three lengths: left padding
PACKED = ["Hello world, this is", "The capital of France", "Water boils at"]  # one row, three sequences
# fp32 logits of two runs that both follow SDPA within 2x its own error may differ by ~3x that error: SDPA's fp32
# error against fp64 is 4.1e-5 on these prompts (printed below), so 2e-4 leaves room without hiding a wrong layout
# (which moves logits by whole units)
ATOL32 = 2e-4
RECORD: dict[str, float] = {}


@pytest.fixture(scope="module")
def hf(request):
    """The tokenizer and an fp32 model (sdpa; tests switch the implementation and put it back)."""
    require_real_model()
    folder = base_folder()
    # the matrices here are small: one thread is as fast, and immune to oversubscription on a shared 2-core machine
    # (two threads of a busy machine made a forward 25x slower)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    tok = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, attn_implementation="sdpa").eval()
    yield {"folder": folder, "tok": tok, "model": model}
    torch.set_num_threads(threads)
    reporter = request.config.pluginmanager.get_plugin("terminalreporter")
    capture = request.config.pluginmanager.get_plugin("capturemanager")
    if reporter is not None and capture is not None and RECORD:
        with capture.global_and_fixture_disabled():  # shown without -s
            reporter.write_line("")
            for name, value in RECORD.items():
                reporter.write_line(f"test_hf_attention: {name} = {value:.3g}")


def _set(model, impl: str):
    model.set_attn_implementation(impl)
    return model


def _logits(model, impl: str, **inputs) -> torch.Tensor:
    with torch.no_grad():
        return _set(model, impl)(**inputs).logits


def _greedy(model, impl: str, ids, n: int, **kw) -> torch.Tensor:
    with torch.no_grad():
        return _set(model, impl).generate(ids, max_new_tokens=n, do_sample=False, **kw)


def _prompts(tok) -> torch.Tensor:
    rows = [tok(p, return_tensors="pt").input_ids for p in PROMPTS]
    n = min(r.shape[1] for r in rows)
    return torch.cat([r[:, :n] for r in rows])  # [2, 10], nothing padded


def _padded(tok) -> dict:
    batch = tok(PADDED, return_tensors="pt", padding=True, padding_side="left")
    mask = batch.attention_mask
    assert (mask[:, -1] == 1).all() and (mask == 0).any(), "the batch must be left-padded"
    # each row's own positions (0 at its first token), as generate gives them, so a row equals its unpadded run
    return {**batch, "position_ids": (mask.cumsum(-1) - 1).clamp(min=0)}


@pytest.fixture(scope="module")
def model_bf16(hf):
    return AutoModelForCausalLM.from_pretrained(hf["folder"], dtype=torch.bfloat16, attn_implementation="sdpa").eval()


@pytest.fixture(scope="module")
def greedy_sdpa(hf):
    """SDPA's greedy continuation of the first prompt (16 tokens, dynamic cache): the text every path must give."""
    return _greedy(hf["model"], "sdpa", _prompts(hf["tok"])[:1], 16)


# --------------------------------------------------------------------------------------------------------------------
# parity on plain causal inputs
# --------------------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def fp64_logits(hf):
    """SDPA in float64 from the fp32 weights and from the bf16-rounded ones: the references of the two dtypes."""
    ids = _prompts(hf["tok"])
    model = AutoModelForCausalLM.from_pretrained(hf["folder"], dtype=torch.float64, attn_implementation="sdpa").eval()
    with torch.no_grad():
        ref = {torch.float32: model(ids).logits}
        for p in model.parameters():
            p.data = p.data.to(torch.bfloat16).to(torch.float64)
        ref[torch.bfloat16] = model(ids).logits
    return ref


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_logits_match_sdpa_within_its_own_error(hf, model_bf16, fp64_logits, dtype):
    ids = _prompts(hf["tok"])
    ref = fp64_logits[dtype]
    model = hf["model"] if dtype == torch.float32 else model_bf16
    sdpa, fused = _logits(model, "sdpa", input_ids=ids), _logits(model, "mplus", input_ids=ids)
    _set(model, "sdpa")
    name = "fp32" if dtype == torch.float32 else "bf16"
    RECORD[f"max |logit mplus - sdpa| {name}"] = float((fused.double() - sdpa.double()).abs().max())
    RECORD[f"max |logit sdpa - fp64| {name}"] = float((sdpa.double() - ref).abs().max())
    RECORD[f"max |logit mplus - fp64| {name}"] = float((fused.double() - ref).abs().max())
    low = ref.to(dtype)
    floor = float(((low + 0.3 - 0.3) - low).abs().max())  # flash-attention's atol: one rounding at the logits' scale
    assert_within_reference_error(fused, ref, sdpa, atol_floor=floor, name=f"mplus logits {name}")


def _agree(a: torch.Tensor, b: torch.Tensor) -> int:
    """How many leading tokens two greedy continuations share."""
    differ = (a[0] != b[0]).nonzero()
    return int(differ[0]) if len(differ) else a.shape[1]


def test_greedy_text_equals_sdpa(hf, greedy_sdpa):
    """fp32: mplus's greedy text is SDPA's, token for token."""
    got = _greedy(hf["model"], "mplus", _prompts(hf["tok"])[:1], 16)
    _set(hf["model"], "sdpa")
    tok = hf["tok"]
    assert torch.equal(got, greedy_sdpa), f"{tok.decode(got[0])!r} != sdpa's {tok.decode(greedy_sdpa[0])!r}"


def test_bf16_greedy_text_follows_fp32_as_far_as_sdpa_does(hf, model_bf16, greedy_sdpa):
    """bf16: greedy decoding turns any rounding into another token at a near tie, so two correct bf16 kernels can
    write different texts (measured: SDPA's bf16 text leaves the fp32 one at the 4th new token, "Paris." for "the
    United States."). The text-level form of flash-attention's rule, then: mplus's bf16 text follows the fp32 text
    (SDPA's, which equals mplus's fp32) at least as far as SDPA's bf16 text does, and where SDPA's bf16 text is the
    fp32 one all the way, mplus's is too."""
    ids = _prompts(hf["tok"])[:1]
    sdpa_bf16 = _greedy(model_bf16, "sdpa", ids, 16)
    got = _greedy(model_bf16, "mplus", ids, 16)
    _set(model_bf16, "sdpa")
    tok = hf["tok"]
    assert _agree(got, greedy_sdpa) >= _agree(sdpa_bf16, greedy_sdpa), (
        f"mplus bf16 {tok.decode(got[0])!r} leaves the fp32 text {tok.decode(greedy_sdpa[0])!r} before SDPA's bf16 "
        f"{tok.decode(sdpa_bf16[0])!r}"
    )


# --------------------------------------------------------------------------------------------------------------------
# static cache
# --------------------------------------------------------------------------------------------------------------------
def test_static_cache_generate_equals_sdpa(hf, greedy_sdpa):
    """The whole preallocated buffer is handed to the attention: only its written rows may be attended."""
    got = _greedy(hf["model"], "mplus", _prompts(hf["tok"])[:1], 16, cache_implementation="static")
    _set(hf["model"], "sdpa")
    assert torch.equal(got, greedy_sdpa), f"{hf['tok'].decode(got[0])!r}"


def test_explicit_static_cache_prefill_and_decode(hf):
    model, ids = hf["model"], _prompts(hf["tok"])
    steps, tokens = {}, []
    for impl in ("sdpa", "mplus"):  # the decode steps feed sdpa's greedy tokens to both
        cache = StaticCache(config=model.config, max_cache_len=24)
        logits = [_logits(model, impl, input_ids=ids, past_key_values=cache, use_cache=True)]
        for i in range(3):
            if impl == "sdpa":
                tokens.append(logits[-1][:, -1:].argmax(-1))
            logits.append(_logits(model, impl, input_ids=tokens[i], past_key_values=cache, use_cache=True))
        steps[impl] = logits
        assert int(cache.get_seq_length()) == ids.shape[1] + 3
    _set(model, "sdpa")
    diff = max(float((a - b).abs().max()) for a, b in zip(steps["mplus"], steps["sdpa"]))
    RECORD["max |logit mplus - sdpa| fp32, StaticCache prefill + 3 steps"] = diff
    for i, (a, b) in enumerate(zip(steps["mplus"], steps["sdpa"])):
        assert_close(a, b, atol=ATOL32, rtol=0, name=f"StaticCache step {i}")


# --------------------------------------------------------------------------------------------------------------------
# left padding
# --------------------------------------------------------------------------------------------------------------------
def test_left_padded_batch_rows_equal_their_unpadded_runs(hf):
    model, tok = hf["model"], hf["tok"]
    batch = _padded(tok)
    padded = _logits(model, "mplus", **batch)
    sdpa = _logits(model, "sdpa", **batch)
    lengths = batch["attention_mask"].sum(-1).tolist()
    worst = 0.0
    for r, text in enumerate(PADDED):
        alone = _logits(model, "mplus", input_ids=tok(text, return_tensors="pt").input_ids)
        n = lengths[r]
        assert_close(padded[r, -n:], alone[0], atol=ATOL32, rtol=0, name=f"padded row {r} vs its unpadded run")
        assert_close(padded[r, -n:], sdpa[r, -n:], atol=ATOL32, rtol=0, name=f"padded row {r} vs sdpa")
        worst = max(worst, float((padded[r, -n:] - sdpa[r, -n:]).abs().max()))
    _set(model, "sdpa")
    RECORD["max |logit mplus - sdpa| fp32, left-padded batch"] = worst


@pytest.fixture(scope="module")
def unpadded_greedy(hf):
    """Each PADDED prompt's own greedy continuation (8 tokens, mplus, no padding)."""
    tok = hf["tok"]
    runs = [_greedy(hf["model"], "mplus", tok(text, return_tensors="pt").input_ids, 8)[0] for text in PADDED]
    _set(hf["model"], "sdpa")
    return runs


@pytest.mark.parametrize("cache", ["dynamic", "static"])
def test_left_padded_generate_rows_equal_their_unpadded_runs(hf, unpadded_greedy, cache):
    """Decoding after a padded prefill: one query per row against the cache, each row from its first real token."""
    model, tok = hf["model"], hf["tok"]
    batch = tok(PADDED, return_tensors="pt", padding=True, padding_side="left")
    kw = {"cache_implementation": "static"} if cache == "static" else {}
    with torch.no_grad():
        got = _set(model, "mplus").generate(**batch, max_new_tokens=8, do_sample=False, **kw)
    _set(model, "sdpa")
    for r, alone in enumerate(unpadded_greedy):
        assert torch.equal(got[r, -len(alone) :], alone), f"row {r}: {tok.decode(got[r])!r} vs {tok.decode(alone)!r}"


# --------------------------------------------------------------------------------------------------------------------
# packed sequences
# --------------------------------------------------------------------------------------------------------------------
def _packed(tok):
    seqs = [tok(p, return_tensors="pt").input_ids[0] for p in PACKED]
    ids = torch.cat(seqs)[None]
    position_ids = torch.cat([torch.arange(len(s)) for s in seqs])[None]
    bounds = torch.tensor([0, *torch.tensor([len(s) for s in seqs]).cumsum(0).tolist()], dtype=torch.int32)
    return seqs, ids, position_ids, bounds


def test_packed_sequences_equal_the_separate_sequences(hf):
    """position_ids restarting inside a row with nothing cached (use_cache=False: how transformers flattens training
    batches, e.g. DataCollatorWithFlattening): each sequence attends only itself, as under SDPA."""
    model, tok = hf["model"], hf["tok"]
    seqs, ids, position_ids, _ = _packed(tok)
    separate = torch.cat([_logits(model, "mplus", input_ids=s[None]) for s in seqs], dim=1)
    packed = _logits(model, "mplus", input_ids=ids, position_ids=position_ids, use_cache=False)
    sdpa = _logits(model, "sdpa", input_ids=ids, position_ids=position_ids, use_cache=False)
    assert_close(packed, separate, atol=ATOL32, rtol=0, name="packed vs separate sequences")
    assert_close(packed, sdpa, atol=ATOL32, rtol=0, name="packed mplus vs packed sdpa")
    RECORD["max |logit mplus - sdpa| fp32, packed sequences"] = float((packed - sdpa).abs().max())
    # two packed rows of different layouts in one batch
    both = _logits(
        model, "mplus", input_ids=torch.cat([ids, ids.flip(1)]), position_ids=torch.cat([position_ids] * 2),
        use_cache=False,
    )  # fmt: skip
    assert_close(both[:1], packed, atol=ATOL32, rtol=0, name="packed row 0 of a batch of two")
    _set(model, "sdpa")


def test_packed_training_step_gradients_equal_sdpa(hf):
    """The packed layout trains: the loss's gradient through the per-sequence kernel calls is SDPA's."""
    model, tok = hf["model"], hf["tok"]
    _, ids, position_ids, _ = _packed(tok)
    weight = model.model.layers[2].self_attn.q_proj.weight
    grads = {}
    model.train()
    try:
        for impl in ("sdpa", "mplus"):
            model.zero_grad(set_to_none=True)
            _set(model, impl)(input_ids=ids, position_ids=position_ids, labels=ids, use_cache=False).loss.backward()
            grads[impl] = weight.grad.clone()
    finally:
        model.zero_grad(set_to_none=True)
        _set(model, "sdpa").eval()
    scale = float(grads["sdpa"].abs().max())
    assert_close(grads["mplus"], grads["sdpa"], atol=1e-4 * scale, rtol=0, name="packed q_proj gradient, layer 2")


def test_flash_varlen_kwargs_split_the_row(hf):
    """cu_seq_lens_q/k (DataCollatorWithFlattening(return_flash_attn_kwargs=True)) are honoured like flash-attn does,
    with or without a cache being built."""
    model, tok = hf["model"], hf["tok"]
    seqs, ids, position_ids, bounds = _packed(tok)
    separate = torch.cat([_logits(model, "mplus", input_ids=s[None]) for s in seqs], dim=1)
    n = int(bounds.diff().max())
    varlen = {"cu_seq_lens_q": bounds, "cu_seq_lens_k": bounds, "max_length_q": n, "max_length_k": n}
    got = _logits(model, "mplus", input_ids=ids, position_ids=position_ids, **varlen)
    _set(model, "sdpa")
    assert_close(got, separate, atol=ATOL32, rtol=0, name="cu_seq_lens packed vs separate sequences")


# --------------------------------------------------------------------------------------------------------------------
# the drop-in module
# --------------------------------------------------------------------------------------------------------------------
@pytest.fixture
def swapped(hf):
    """The fp32 model with FusedMemoryAttention.from_llama(attn) in every layer's self_attn (put back after)."""
    model = hf["model"]
    stock = [layer.self_attn for layer in model.model.layers]
    for layer in model.model.layers:
        layer.self_attn = FusedMemoryAttention.from_llama(layer.self_attn)
    yield model, stock
    for layer, attn in zip(model.model.layers, stock):
        layer.self_attn = attn
    _set(model, "sdpa")


def _stock(model, stock, fn):
    """``fn()`` with the stock LlamaAttention modules back in place, under sdpa."""
    fused = [layer.self_attn for layer in model.model.layers]
    for layer, attn in zip(model.model.layers, stock):
        layer.self_attn = attn
    _set(model, "sdpa")
    try:
        return fn()
    finally:
        for layer, attn in zip(model.model.layers, fused):
            layer.self_attn = attn


@pytest.mark.parametrize("impl", ["sdpa", "eager", "mplus"])
def test_drop_in_module_in_every_layer_equals_llama_attention(hf, swapped, impl):
    """Whatever masks the model builds (sdpa's 4-D bool, eager's additive, mplus' compact), the drop-in module runs the
    kernel and gives LlamaAttention + SDPA's logits: plain, left-padded, and decoding with a DynamicCache it updates."""
    model, stock = swapped
    tok = hf["tok"]
    assert all(isinstance(layer.self_attn, FusedLlamaAttention) for layer in model.model.layers)
    ids, batch = _prompts(tok), _padded(tok)
    plain = _logits(model, impl, input_ids=ids)
    padded = _logits(model, impl, **batch)
    expected_plain = _stock(model, stock, lambda: _logits(model, "sdpa", input_ids=ids))
    expected_padded = _stock(model, stock, lambda: _logits(model, "sdpa", **batch))
    assert_close(plain, expected_plain, atol=ATOL32, rtol=0, name=f"drop-in ({impl} masks) vs LlamaAttention")
    valid = batch["attention_mask"].bool()
    assert_close(padded[valid], expected_padded[valid], atol=ATOL32, rtol=0, name=f"drop-in padded ({impl} masks)")
    RECORD[f"max |logit drop-in - stock sdpa| fp32, {impl} masks"] = float((plain - expected_plain).abs().max())

    # a prefill and one decode step through a DynamicCache: the drop-in writes the cache through its update
    cache, stock_cache = DynamicCache(config=model.config), DynamicCache(config=model.config)
    _logits(model, impl, input_ids=ids, past_key_values=cache, use_cache=True)
    step = _logits(model, impl, input_ids=ids[:, :1], past_key_values=cache, use_cache=True)
    _stock(model, stock, lambda: _logits(model, "sdpa", input_ids=ids, past_key_values=stock_cache, use_cache=True))
    expected = _stock(
        model, stock, lambda: _logits(model, "sdpa", input_ids=ids[:, :1], past_key_values=stock_cache, use_cache=True)
    )
    assert cache.get_seq_length() == ids.shape[1] + 1
    assert_close(cache.layers[7].keys, stock_cache.layers[7].keys, atol=1e-5, rtol=0, name="cached keys, layer 7")
    assert_close(step, expected, atol=ATOL32, rtol=0, name=f"drop-in decode step ({impl} masks)")


def test_drop_in_module_static_cache_left_padded_generate(hf, swapped, greedy_sdpa):
    model, _ = swapped
    tok = hf["tok"]
    got = _greedy(model, "sdpa", _prompts(tok)[:1], 8, cache_implementation="static")
    assert torch.equal(got, greedy_sdpa[:, : got.shape[1]]), f"{tok.decode(got[0])!r}"  # greedy: a prefix of it
    batch = tok(PADDED, return_tensors="pt", padding=True, padding_side="left")
    with torch.no_grad():
        got = model.generate(**batch, max_new_tokens=6, do_sample=False, cache_implementation="static")
        expected = _stock(model, swapped[1], lambda: model.generate(**batch, max_new_tokens=6, do_sample=False))
    assert torch.equal(got, expected), [tok.decode(r) for r in got]


def test_drop_in_module_calling_conventions(hf):
    """transformers' keywords (and the older past_key_value) return the (out, weights) tuple; the M+ convention
    stays available as .attend, and the model's own module keeps its forward."""
    model = hf["model"]
    attn = model.model.layers[3].self_attn
    fused = FusedMemoryAttention.from_llama(attn)
    assert type(fused) is FusedLlamaAttention and fused.layer_idx == 3 and fused.q_proj is attn.q_proj
    with torch.no_grad():  # the layer's real input: normalised embeddings of real tokens
        hidden = model.model.layers[3].input_layernorm(model.model.embed_tokens(_prompts(hf["tok"])[:1, :5]))
    pe = model.model.rotary_emb(hidden, torch.arange(5)[None])
    cache = DynamicCache(config=model.config)
    with torch.no_grad():
        out, weights = fused(hidden_states=hidden, position_embeddings=pe, attention_mask=None, past_key_value=cache)
        expected, _ = attn(hidden_states=hidden, position_embeddings=pe, attention_mask=None)
        mplus_out = fused.attend(hidden, pe)
    assert weights is None and cache.get_seq_length(3) == 5 and cache.get_seq_length(0) == 0
    assert_close(out, expected, atol=1e-5, rtol=0, name="drop-in vs LlamaAttention (sdpa)")
    assert_close(mplus_out, out, atol=0, rtol=0, name="M+ convention (.attend) vs transformers convention")
    plain = FusedMemoryAttention.from_config(model.config, layer_idx=3)
    assert type(plain) is FusedMemoryAttention and isinstance(plain(hidden, pe), torch.Tensor)


# --------------------------------------------------------------------------------------------------------------------
# refusals
# --------------------------------------------------------------------------------------------------------------------
def test_refuses_what_the_kernel_cannot_run(hf):
    model, tok = hf["model"], hf["tok"]
    ids = _prompts(tok)
    _set(model, "mplus")
    try:
        with torch.no_grad():
            right = tok(PADDED, return_tensors="pt", padding=True, padding_side="right")
            with pytest.raises(ValueError, match=r"attention_mask .* is not left padding: in row 0"):
                model(**right)
            holes = torch.ones_like(ids)
            holes[1, 4] = 0
            with pytest.raises(ValueError, match=r"attention_mask .* is not left padding: in row 1"):
                model(ids, attention_mask=holes)
            arbitrary = torch.rand(2, 1, ids.shape[1], ids.shape[1], generator=torch.Generator().manual_seed(0)) > 0.5
            t = ids.shape[1]
            with pytest.raises(ValueError, match=rf"attention_mask \[2, 1, {t}, {t}\] is neither causal .*='sdpa'"):
                model(ids, attention_mask=arbitrary)
            per_head = torch.ones(2, 9, ids.shape[1], ids.shape[1], dtype=torch.bool).tril()
            with pytest.raises(ValueError, match=rf"4-D attention_mask must be \[B=2 or 1, 1, Tq={t}, Tk={t}\]"):
                model(ids, attention_mask=per_head)
            bias = torch.zeros(2, 1, ids.shape[1], ids.shape[1]).masked_fill(~per_head[:, :1], float("-inf"))
            bias[..., 0] = 0.5
            with pytest.raises(ValueError, match=r"additive attention_mask .* holds biases"):
                model(ids, attention_mask=bias)
            with pytest.raises(ValueError, match=r"output_attentions=True .* attn_implementation='eager'"):
                model(ids, output_attentions=True)
            model.model.layers[0].self_attn.attention_dropout = 0.1
            model.train()
            try:
                with pytest.raises(ValueError, match=r"attention dropout .* dropout=0.1 .*='sdpa'"):
                    model(ids)
            finally:
                model.eval()
                model.model.layers[0].self_attn.attention_dropout = 0.0
            with pytest.raises(ValueError, match=rf"attention_mask \[2, 1, {t}, {t}\] is neither causal"):
                create_causal_mask(
                    config=model.config, inputs_embeds=torch.empty(2, ids.shape[1], 0), attention_mask=None,
                    past_key_values=None, and_mask_function=lambda b, h, q, kv: kv > q - 4,  # a sliding window
                )  # fmt: skip
    finally:
        _set(model, "sdpa")
    q, k = torch.randn(1, 9, 4, 64), torch.randn(1, 3, 4, 64)
    with pytest.raises(ValueError, match=r"sliding_window \(sliding-window attention\) is not supported"):
        mplus_attention_forward(model.model.layers[0].self_attn, q, k, k, None, sliding_window=2)
    with pytest.raises(ValueError, match=r"kv_offset=3 \(a sliding-window or chunked cache\)"):
        mplus_attention_mask(1, 1, 4, q_offset=6, kv_offset=3)
    fused = FusedMemoryAttention.from_llama(model.model.layers[0].self_attn)
    hidden = torch.randn(1, 4, model.config.hidden_size)
    pe = model.model.rotary_emb(hidden, torch.arange(4)[None])
    with pytest.raises(ValueError, match=r"output_attentions=True"):
        fused(hidden_states=hidden, position_embeddings=pe, attention_mask=None, output_attentions=True)


# --------------------------------------------------------------------------------------------------------------------
# compile: the static-cache decode path reads nothing on the host
# --------------------------------------------------------------------------------------------------------------------
def test_static_decode_step_traces_in_one_graph():
    """The mask function and the attention function of a static-cache decode step with left padding, traced with
    fullgraph=True (a host read would break the graph), give the eager result."""
    torch.manual_seed(0)
    b, hq, hkv, d, s_max = 2, 4, 2, 64, 16
    pad = torch.tensor([[0, 0, 1, 1, 1, 1, 1], [1] * 7]).bool()  # row 0 left-padded by 2; 6 past rows + this one
    q = torch.randn(b, hq, 1, d)
    k, v = torch.randn(b, hkv, s_max, d), torch.randn(b, hkv, s_max, d)

    class Module(torch.nn.Module):
        is_causal = True

    def step(q_offset):
        mask = mplus_attention_mask(b, 1, s_max, q_offset=q_offset, attention_mask=pad)
        return mplus_attention_forward(Module(), q, k, v, mask, scaling=d**-0.5)[0]

    eager = step(torch.tensor(6))
    compiled = torch.compile(step, backend="eager", fullgraph=True)(torch.tensor(6))
    assert_close(compiled, eager, atol=0, rtol=0, name="traced static decode step")
    # the eager result: row 0 sees cache rows 2..6, row 1 rows 0..6, nothing after row 6
    kk, vv = k.repeat_interleave(2, 1), v.repeat_interleave(2, 1)
    for r, first in ((0, 2), (1, 0)):
        p = ((q[r] @ kk[r, :, first:7].transpose(-1, -2)) * d**-0.5).softmax(-1)
        assert_close(eager[r, 0], (p @ vv[r, :, first:7])[:, 0], atol=1e-5, rtol=1e-5, name=f"row {r}")
