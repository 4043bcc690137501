"""Training M+ on text files with DDP, one process per rank, through torchrun (gloo on CPUs, NCCL on GPUs):

    torchrun --nproc-per-node 2 examples/train_ddp.py --files a.txt b.txt [--model PATH_OR_ID] [--steps N] [--out DIR]

Each rank builds the same M+ from the base model (``from_base``, same seed), takes its own memory and drop generator
(``training.rank_memory``) and its own share of the text (chunk pairs ``i`` with ``i % world == rank``), and trains
through ``DistributedDataParallel(training.Step(...))``: gradients are averaged over the ranks, memories never leave
their rank. At the end every rank writes a checkpoint (``training.save_training_checkpoint``: the trained weights and
the optimiser's state through ``torch.distributed.checkpoint``, each rank's memory and RNG) that
``training.load_training_checkpoint`` resumes from bit-exactly. Without ``--files`` it trains on Python's own help
pages (``pydoc_data.topics``).
"""

from __future__ import annotations

import os
import pathlib
from pydoc_data.topics import topics

import torch
import torch.distributed as dist
from _common import arguments, base_model
from torch.nn.parallel import DistributedDataParallel

from mplus import MPlusForCausalLM, load_tokenizer, training

SIZES = {"num_tokens": 8, "num_blocks": 4, "num_ltm_blocks": 1, "update_ltm_frequency": 2}  # tiny: a CPU demo


def main() -> None:
    p = arguments(__doc__.splitlines()[0])
    p.add_argument("--files", nargs="+", help="text files to train on (default: pydoc's help pages)")
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--chunk", type=int, default=24, help="tokens per context and target chunk")
    p.add_argument("--out", default="mplus-ddp-run", help="where the checkpoint goes")
    args = p.parse_args()
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    dist.init_process_group(backend)  # torchrun sets RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT
    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if backend == "nccl" else None
    torch.manual_seed(0)  # the same new parameters on every rank (from_base also seeds its own draws)
    path, gguf = base_model(args)
    tokenizer = load_tokenizer(path, gguf_file=gguf)
    model = MPlusForCausalLM.from_base(path, gguf_file=gguf, max_length=256, device=device, **SIZES)
    training.prepare(model)
    step = training.Step(model, memory=training.rank_memory(model, seed=0))
    ddp = DistributedDataParallel(step)
    opt = torch.optim.AdamW(training.param_groups(model, lr=1e-3, selector_lr=1e-3))
    if args.files:
        text = "\n".join(pathlib.Path(f).read_text(encoding="utf-8") for f in args.files)
    else:
        text = " ".join(topics[name] for name in sorted(topics)[:8])
    ids = tokenizer(text, add_special_tokens=False, return_tensors="pt").input_ids
    n = args.chunk
    pairs = [(ids[:, i : i + n], ids[:, i + n : i + 2 * n]) for i in range(0, ids.shape[1] - 2 * n + 1, 2 * n)]
    mine = pairs[rank::world]
    if len(mine) < args.steps:
        raise SystemExit(f"rank {rank}: {len(mine)} chunk pairs for {args.steps} steps: give more text or fewer steps")
    for i in range(args.steps):
        out = ddp(*mine[i])
        out.loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        loss = out.lm_loss.detach().clone()
        dist.all_reduce(loss)
        if rank == 0:
            print(f"step {i}: language-model loss {loss.item() / world:.3f} (mean over {world} ranks)", flush=True)
    folder = training.save_training_checkpoint(os.path.join(args.out, f"step-{args.steps:06d}"), ddp, opt,
                                               step=args.steps)  # fmt: skip
    if rank == 0:
        print(f"checkpoint: {folder}")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
