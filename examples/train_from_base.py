"""Training M+ from a pretrained Llama, as the paper does (SPEC.md §7): a few steps on real English text.

    python examples/train_from_base.py [--model PATH_OR_ID] [--gguf-file FILE] [--steps N]

``from_base`` builds the M+ (the base's weights frozen, LoRA adapters and retriever projectors to train);
``mplus.training.prepare`` sets what trains and the training ages; each ``training_step`` injects a context chunk
with its gradients kept and takes the language-model loss on the chunk that follows it through the memory that
injection made, plus the retriever's loss. The text is Python's own help pages (``pydoc_data.topics``), which ship
with Python. A real run uses the paper's sizes and many thousands of steps; this one shows the loop and that the
loss falls on the chunks it trains on.
"""

from __future__ import annotations

from pydoc_data.topics import topics

import torch
from _common import arguments, base_model

from mplus import MPlusForCausalLM, load_tokenizer, training


def main() -> None:
    p = arguments(__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--chunk", type=int, default=48, help="tokens per context and target chunk")
    args = p.parse_args()
    torch.manual_seed(0)
    path, gguf = base_model(args)
    tokenizer = load_tokenizer(path, gguf_file=gguf)
    sizes = {"num_tokens": 8, "num_blocks": 4, "num_ltm_blocks": 1, "update_ltm_frequency": 2}  # tiny: seconds a step
    model = MPlusForCausalLM.from_base(path, gguf_file=gguf, kind="mplus", max_length=256, **sizes)
    training.prepare(model)  # LoRA adapters + retriever projectors trainable, the rest frozen; training ages
    opt = torch.optim.AdamW(training.param_groups(model, lr=1e-3, selector_lr=1e-3))  # a short demo: a high lr
    text = " ".join(topics[name] for name in sorted(topics)[:4])
    ids = tokenizer(text, add_special_tokens=False, return_tensors="pt").input_ids
    n = args.chunk
    pairs = [(ids[:, i : i + n], ids[:, i + n : i + 2 * n]) for i in range(0, 4 * n * 2, 2 * n)]  # 4 (context, target)
    first = []
    for step in range(args.steps):
        context, target = pairs[step % len(pairs)]
        out = training.training_step(model, context, target)  # commits the injection: the memory moves on
        out.loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if step < len(pairs):
            first.append(out.lm_loss.item())
        print(f"step {step}: loss {out.loss.item():.3f} (language model {out.lm_loss.item():.3f}, retriever "
              f"{out.retriever_loss.item():.3f})")  # fmt: skip
    last = [training.training_step(model, c, t, commit=False).lm_loss.item() for c, t in pairs]
    before, after = sum(first) / len(first), sum(last) / len(last)
    print(f"language-model loss on the {len(pairs)} chunks: {before:.3f} -> {after:.3f}")
    assert sum(last) < sum(first), "training must lower the loss on the chunks it trained on"


if __name__ == "__main__":
    main()
