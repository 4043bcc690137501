"""A training step on the GPU (issue 12): ``mplus.training.training_step`` forward + backward at M+ memory size on
two real-width Llama-3.1-8B layers, mplus kernels (Triton forward and backward) vs the pure-PyTorch references.

Model: d 4,096, Hq 32 / Hkv 8, D 128, MLP 14,336, 2 layers, vocabulary cut to 32,000, bf16 weights; memory at
mplus-8b size: N 10,240 short-term rows, K 256, K0 2,560 long-term rows retrieved per layer from a store of 3,072
(12 earlier injections, merging every 4). One step: inject a 512-token context with gradients, the LM loss on a
512-token target through [BOS ; 2,560 ; 10,240 ; itself], both retrievers' BCE, ``loss.backward()``;
``commit=False`` (every call sees the same memory), the same drops for both providers. ``matches_mplus``: the
reference provider's loss minus mplus's.
"""

from __future__ import annotations

import torch

from ._harness import Recorder

T = 512
DTYPE = torch.bfloat16


def _model(kernels: str):
    from mplus import training
    from mplus.config import MPlusConfig
    from mplus.model import MPlusForCausalLM
    from mplus_kernels import draw_victims

    cfg = MPlusConfig.mplus_8b(num_hidden_layers=2, vocab_size=32000, update_ltm_frequency=4, bos_token_id=None,
                               eos_token_id=None, pad_token_id=None)  # fmt: skip
    torch.manual_seed(0)
    model = MPlusForCausalLM(cfg, kernels=kernels, dtype=DTYPE, max_length=2 * T).cuda()
    with torch.no_grad():
        model.stm.hidden.normal_()
        model.bos_embedding.normal_()
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.01)
    g = torch.Generator().manual_seed(1)
    for _ in range(12):
        ids = torch.randint(0, cfg.vocab_size, (1, T), generator=g).cuda()
        model.inject(ids, progress=False, victims=draw_victims(2, cfg.stm_size, cfg.num_tokens, g))
    training.prepare(model)
    return model.eval()


def run(rec: Recorder) -> None:
    from mplus import training
    from mplus_kernels import draw_victims

    group, losses = "training/step", {}
    g = torch.Generator().manual_seed(2)
    ctx = torch.randint(0, 32000, (1, T), generator=g).cuda()
    target = torch.randint(0, 32000, (1, T), generator=g).cuda()
    for provider, kernels in (("mplus", "fused"), ("reference", "reference")):

        def make(kernels=kernels, provider=provider):
            model = _model(kernels)
            cfg = model.config
            victims = [draw_victims(2, cfg.stm_size, cfg.num_tokens, torch.Generator().manual_seed(3))]

            def step():
                out = training.training_step(model, ctx, target, victims=victims, commit=False)
                out.loss.backward()
                model.zero_grad(set_to_none=True)
                losses[provider] = out.loss.detach()
                return out.loss.detach()

            return step

        check = None
        if provider == "reference" and "mplus" in losses:
            check = lambda out: {"matches_mplus": float(out.float() - losses["mplus"].float())}  # noqa: E731
        rec.measure(group, provider, make, shape=f"L2 d4096 N10240 K256 K0 2560 ctx{T} tgt{T}", dtype=DTYPE,
                    timer="wall", check=check, min_budget_s=8.0)  # fmt: skip
        torch.cuda.empty_cache()
