"""The model-level benchmark peers (``benchmarks/model_peers.py``) compute what they claim, on a tiny M+:

* ``official_attention``: the official SDPA path over ``[memory ; chunk]`` gives the fused model's logits — prefill,
  a decode step, a left-padded batch over one memory and a batch over two memories;
* ``plain_llama``: the transformers Llama on the model's base weights gives the model's logits with the memory
  bypassed (``use_memory = False``) when it shares the LoRA modules, and with the adapters' B zeroed when it does not.
"""

from __future__ import annotations

import importlib.util
import warnings
from pathlib import Path

import pytest
import torch

from mplus.checkpoint import refresh_memory_kv
from mplus.config import MPlusConfig
from mplus.model import MPlusForCausalLM
from mplus_kernels.testing import assert_close

_spec = importlib.util.spec_from_file_location(
    "mplus_model_peers", Path(__file__).resolve().parents[1] / "benchmarks" / "model_peers.py"
)
peers = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(peers)

VOCAB = 101


@pytest.fixture(scope="module")
def model() -> MPlusForCausalLM:
    cfg = MPlusConfig.mplus_8b(vocab_size=VOCAB, hidden_size=128, intermediate_size=160, num_hidden_layers=2,
                               num_attention_heads=8, num_key_value_heads=2, num_tokens=4, num_blocks=6,
                               num_ltm_blocks=2, update_ltm_frequency=2, selector_hidden_dim=16,
                               lora_config={"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "k_proj", "v_proj",
                                                                                         "gate_proj", "up_proj",
                                                                                         "down_proj"]},
                               bos_token_id=None, eos_token_id=None, pad_token_id=None)  # fmt: skip
    torch.manual_seed(0)
    m = MPlusForCausalLM(cfg, max_length=64)
    with torch.no_grad():
        for name, p in m.named_parameters():
            p.normal_(0, 0.2 if "lora_B" in name else 0.1)
            if "norm" in name:
                p.add_(1.0)
        m.stm.hidden.normal_()
    refresh_memory_kv(m)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # chunks under the 16-token training minimum
        for length in (11, 6, 9, 4, 13):  # two merges: a long-term memory to retrieve from
            m.inject(torch.randint(0, VOCAB, (1, length), generator=torch.Generator().manual_seed(length)))
    return m


def _official(model, fn):
    with peers.official_attention(model):
        return fn()


def test_official_attention_gives_the_model_outputs(model):
    ids = torch.randint(0, VOCAB, (1, 9))
    prefill = lambda: model(ids).logits  # noqa: E731
    assert_close(_official(model, prefill), prefill(), atol=5e-5, rtol=1e-5, name="prefill logits")

    def decode():
        cache = model.new_cache()
        model(ids, past_key_values=cache)
        return model(torch.tensor([[5]]), past_key_values=cache).logits

    assert_close(_official(model, decode), decode(), atol=5e-5, rtol=1e-5, name="decode logits")
    assert type(model.layers[0].self_attn).forward is model.layers[0].self_attn.forward.__func__  # restored


def test_official_attention_batches_left_padding_and_two_memories(model):
    ids = torch.randint(0, VOCAB, (3, 8))
    mask = torch.ones(3, 8, dtype=torch.long)
    mask[1, :3] = 0
    mask[2, :5] = 0
    shared = lambda: model(ids, attention_mask=mask).logits  # noqa: E731
    valid = mask.bool()
    assert_close(_official(model, shared)[valid], shared()[valid], atol=5e-5, rtol=1e-5, name="padded batch")
    other = model.new_memory(seed=1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model.inject(torch.randint(0, VOCAB, (1, 12)), memory=other)
    two = lambda: model(ids[:2], attention_mask=mask[:2], memory=[model.memory, other]).logits  # noqa: E731
    assert_close(_official(model, two)[valid[:2]], two()[valid[:2]], atol=5e-5, rtol=1e-5, name="two memories")


def test_plain_llama_is_the_model_without_memory(model):
    ids = torch.randint(0, VOCAB, (1, 9))
    llama = peers.plain_llama(model, lora=True)
    assert llama.model.layers[0].self_attn.q_proj is model.layers[0].self_attn.q_proj  # shared, not copied
    model.use_memory = False
    try:
        assert_close(llama(ids).logits, model(ids).logits, atol=5e-5, rtol=1e-5, name="LoRA llama vs no memory")
        base = peers.plain_llama(model)
        assert base.lm_head.weight is model.lm_head.weight
        lora_b = {n: p.detach().clone() for n, p in model.named_parameters() if "lora_B" in n}
        with torch.no_grad():
            for n, p in model.named_parameters():
                if n in lora_b:
                    p.zero_()
        try:
            assert_close(base(ids).logits, model(ids).logits, atol=5e-5, rtol=1e-5, name="base llama vs B = 0")
        finally:
            with torch.no_grad():
                for n, p in model.named_parameters():
                    if n in lora_b:
                        p.copy_(lora_b[n])
    finally:
        model.use_memory = True
