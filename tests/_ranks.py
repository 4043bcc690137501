"""Real multi-process runs for the distributed tests: ``world`` spawned processes (nothing carries over from the test
process), torch.distributed over gloo on 127.0.0.1 and a free port, a deadline after which a hung rank is killed and
the test fails with every rank's traceback. Each rank writes ``<prefix>rank{r}.pt`` (its results) or
``<prefix>rank{r}.err`` (its traceback) into ``folder``."""

from __future__ import annotations

import copy
import datetime
import socket
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from _golden import GOLDEN

from mplus import training
from mplus.checkpoint import memory_state
from mplus.model import MPlusForCausalLM

# every multi-process test module: pytestmark = NEEDS_GLOO
NEEDS_GLOO = pytest.mark.skipif(
    not torch.distributed.is_available() or not torch.distributed.is_gloo_available(), reason="needs gloo"
)


def golden_model() -> MPlusForCausalLM:
    """The golden tiny M+, prepared for training, in eval mode (exact comparisons: no LoRA dropout)."""
    model = MPlusForCausalLM.from_pretrained(str(GOLDEN / "model"), max_length=96)
    training.prepare(model)
    return model.eval()


def snapshot(state) -> dict[str, torch.Tensor]:
    """A copy of every tensor of a memory (a state, or a model's default one)."""
    return {k: v.clone() for k, v in memory_state(state).items()}


def trained_grads(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """A copy of the gradient of every trained parameter, by name."""
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


def replay_ranks(world: int, steps: int, seed: int, *, checkpoint_last: bool = False) -> list[dict]:
    """Each rank's steps replayed in this process, unsharded, on one thread as the ranks ran, on a copy of the golden
    model with the memory ``rank_memory`` gives that rank, drawing its own victims: per rank and step the gradients,
    victims and memory (``checkpoint_last``: the last step with gradient checkpointing)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        base = golden_model()
        results = []
        for rank in range(world):
            model = copy.deepcopy(base)
            memory = training.rank_memory(model, seed=seed, rank=rank)
            got = {"grads": [], "victims": [], "memory": []}
            for step in range(steps):
                ids = rank_data(rank, step, model.config.vocab_size)
                checkpointing = checkpoint_last and step == steps - 1
                out = training.training_step(model, *ids, memory=memory, checkpointing=checkpointing)
                out.loss.backward()
                got["grads"].append(trained_grads(model))
                got["victims"].append(out.victims)
                got["memory"].append(snapshot(memory))
                model.zero_grad(set_to_none=True)
            results.append(got)
        return results
    finally:
        torch.set_num_threads(threads)


def rank_data(rank: int, step: int, vocab: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Rank ``rank``'s (context, target) ids of step ``step``: its own data, the same in every run."""
    g = torch.Generator().manual_seed(1000 * rank + step)
    return torch.randint(0, vocab, (1, 16 + 3 * step), generator=g), torch.randint(0, vocab, (1, 9), generator=g)


def free_port() -> int:
    """A port nothing listens on now (bound to port 0 on the loopback, then released)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_rank(rank: int, port: int, world: int, backend: str = "gloo") -> None:
    """In a spawned rank: one thread (2 ranks share 2 cores), then the process group (gloo; ``"nccl"``: on CUDA device
    ``rank``, made current) on the loopback; it and every collective time out after 60 s, so a hung peer fails the
    run instead of blocking it."""
    torch.set_num_threads(1)
    if backend == "nccl":
        torch.cuda.set_device(rank)
    torch.distributed.init_process_group(
        backend, init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
        timeout=datetime.timedelta(seconds=60),
    )  # fmt: skip


def run_ranks(worker: Callable, world: int, folder: Path, timeout_s: float, *args, prefix: str = "") -> list[dict]:
    """Run ``worker(rank, port, str(folder), *args)`` on ``world`` spawned processes; each rank's saved results."""
    ctx = torch.multiprocessing.get_context("spawn")
    port = free_port()
    procs = [ctx.Process(target=worker, args=(r, port, str(folder), *args), daemon=True) for r in range(world)]
    for p in procs:
        p.start()
    deadline = time.monotonic() + timeout_s
    for p in procs:
        p.join(max(0.0, deadline - time.monotonic()))
    hung = [p for p in procs if p.is_alive()]
    for p in hung:
        p.kill()
        p.join(5)
    errors = "\n".join(f.read_text() for f in sorted(folder.glob(f"{prefix}rank*.err")))
    assert not hung, f"{prefix}ranks still running after {timeout_s} s (killed)\n{errors}"
    assert all(p.exitcode == 0 for p in procs), f"{prefix}exit codes {[p.exitcode for p in procs]}\n{errors}"
    return [torch.load(folder / f"{prefix}rank{r}.pt", weights_only=False) for r in range(world)]
