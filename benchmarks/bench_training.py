"""A training step (issue 12, item 5): ``mplus.training.training_step`` forward + backward at two real-width
Llama-3.1-8B layers. Providers: ``mplus`` (the mplus kernels), ``reference`` (the pure-PyTorch references,
``kernels="reference"``: attention by concatenation with the full score matrix, autograd through it),
``official_sdpa`` (the mplus kernels but the attention computed as the official SDPA path does, autograd through
``scaled_dot_product_attention`` over ``[memory ; chunk]``: ``model_peers.official_attention``) and ``llama_sdpa`` (a
plain transformers Llama sharing the model's base weights and its LoRA modules, SDPA: the LM loss of the same
target after the same context, one forward of the 256 tokens, and its backward — a LoRA fine-tuning step of the same
adapters without the memory: M+'s training overhead).

Shapes: d 4,096, Hq 32 / Hkv 8, D 128, MLP 14,336, two layers, vocabulary cut to 32,000 (the embedding and head are
not what is measured); the memory scaled to this machine: K = 256 rows per injection, N = 2,048 short-term rows,
K0 = 512 long-term rows retrieved per layer from a store of 768 (three earlier injections). One step: inject a
128-token context with gradients, then the LM loss on a 128-token target through [BOS ; 512 long-term ; 2,048
short-term ; itself], plus both retrievers' BCE; LoRA adapters and projectors trainable (``mplus.training.prepare``),
``commit=False`` (every round sees the same memory), the same drops for every M+ provider. Timed: the step and
``loss.backward()``; the optimiser is not (it is the same for all). Every provider runs the same rounds.
"""

from __future__ import annotations

import contextlib

import pytest
import torch
from model_peers import official_attention, plain_llama

from mplus import training
from mplus.config import MPlusConfig
from mplus.model import MPlusForCausalLM
from mplus_kernels import draw_victims

T_CTX, T_TGT = 128, 128


def _model(kernels: str) -> MPlusForCausalLM:
    cfg = MPlusConfig.mplus_8b(
        num_hidden_layers=2, vocab_size=32000, num_blocks=10, num_ltm_blocks=2, update_ltm_frequency=2,
        bos_token_id=None, eos_token_id=None, pad_token_id=None,
    )  # fmt: skip
    torch.manual_seed(0)
    model = MPlusForCausalLM(cfg, kernels=kernels, max_length=T_CTX + T_TGT)
    with torch.no_grad():
        model.stm.hidden.normal_()
        model.bos_embedding.normal_()
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.01)
    g = torch.Generator().manual_seed(1)
    for _ in range(3):  # long-term rows to retrieve from: 512 merged + 256 cached per layer
        model.inject(torch.randint(0, cfg.vocab_size, (1, T_CTX), generator=g), progress=False,
                     victims=draw_victims(2, cfg.stm_size, cfg.num_tokens, g))  # fmt: skip
    training.prepare(model)
    return model.eval()  # no LoRA dropout: both providers compute the same thing


@pytest.mark.parametrize("autocast", [None, torch.bfloat16], ids=["fp32", "bf16-autocast"])
@pytest.mark.parametrize("provider", ["reference", "mplus", "official_sdpa", "llama_sdpa"])
def test_training_step(benchmark, bench, provider, autocast):
    model = _model("reference" if provider == "reference" else "fused")
    cfg = model.config
    g = torch.Generator().manual_seed(2)
    ctx = torch.randint(0, cfg.vocab_size, (1, T_CTX), generator=g)
    target = torch.randint(0, cfg.vocab_size, (1, T_TGT), generator=g)
    victims = [draw_victims(2, cfg.stm_size, cfg.num_tokens, g)]
    extra = {}

    if provider == "llama_sdpa":
        llama = plain_llama(model, lora=True)
        ids = torch.cat([ctx, target], 1)
        labels = ids.clone()
        labels[:, :T_CTX] = -100  # the loss of the target tokens only, as M+'s LM loss
        extra["variant"] = "transformers LlamaForCausalLM, same base weights and LoRA modules, SDPA, no memory"

        def step():
            with torch.autocast("cpu", dtype=autocast) if autocast is not None else contextlib.nullcontext():
                loss = llama(ids, labels=labels, use_cache=False).loss
            loss.backward()
            model.zero_grad(set_to_none=True)
            return loss.detach()
    else:

        def step():
            out = training.training_step(model, ctx, target, victims=victims, commit=False, autocast=autocast)
            out.loss.backward()
            model.zero_grad(set_to_none=True)
            return out.loss.detach()

    with official_attention(model) if provider == "official_sdpa" else contextlib.nullcontext():
        bench(
            step,
            group="training_step/2 layers d4096/" + ("fp32" if autocast is None else "bf16 autocast"),
            provider=provider,
            shape=f"L2 d4096 H32/8 D128 ctx{T_CTX} tgt{T_TGT} N{cfg.stm_size} K{cfg.num_tokens} K0{cfg.num_ltm_tokens}",
            dtype="fp32" if autocast is None else "bf16 autocast",
            rounds=2,
            quick_rounds=1,
            **extra,
        )
