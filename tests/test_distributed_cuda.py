"""Issue 21 on a GPU: the distributed training path on CUDA with NCCL, in a 1-rank process group (one GPU).

The same code the gloo tests run on the CPU — ``DistributedDataParallel(training.Step(...))``, ``training.shard``
(FSDP2, its mesh on the model's device type) and a meta-device build materialised with ``training.materialize(...,
device="cuda")`` — each runs one training step in a spawned process on ``cuda:0`` with the NCCL backend, against the
single-process step of the same model on the same GPU: loss, gradients (whole) and the memory after the commit.

Skipped without a GPU (every machine of this project); ``make gpu-check`` runs this file with tests/test_cuda.py
(``TRITON_INTERPRET`` unset). The golden model's head dim (16) is below the Triton attention kernels' (64, 128), so
attention runs on its reference, as in tests/test_cuda.py; every other op (memory update, retrieval, scores, gather)
on its CUDA kernel.
"""

from __future__ import annotations

import traceback
import warnings
from pathlib import Path

import pytest
import torch
from _golden import GOLDEN
from _ranks import init_rank, rank_data, run_ranks
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import DTensor
from torch.nn.parallel import DistributedDataParallel

from mplus import training
from mplus.checkpoint import memory_state
from mplus.model import MPlusForCausalLM
from mplus_kernels import _config
from mplus_kernels.testing import assert_close, assert_equal

pytestmark = [
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (make gpu-check runs this file)"),
    pytest.mark.skipif(
        torch.cuda.is_available() and _config.triton_interpret(),
        reason="compiled Triton kernels needed: run with TRITON_INTERPRET unset",
    ),
    pytest.mark.skipif(
        not torch.distributed.is_available() or not torch.distributed.is_nccl_available(), reason="needs NCCL"
    ),
]

SEED = 13
TIMEOUT_S = 240  # the spawned process: CUDA and NCCL initialisation, Triton compilation of the first launches
ATOL = 1e-6  # DDP on one rank: expected bit-equal; FSDP2: its autograd nodes sum the same terms in another order
WRAPPERS = ("ddp", "fsdp", "meta")


def _on_cuda(model: MPlusForCausalLM) -> MPlusForCausalLM:
    """Prepared for training in eval mode (no dropout: exact comparisons), attention on its reference (head dim 16)."""
    training.prepare(model)
    for layer in model.layers:
        layer.self_attn.backend = "reference"
    return model.eval()


def _step(model: MPlusForCausalLM, wrapper: str | None) -> torch.nn.Module:
    """The step on ``cuda:0``: plain (None), DDP, FSDP2, or built on meta, sharded and materialised on the GPU."""
    if wrapper == "meta":
        with torch.device("meta"):
            meta = _on_cuda(MPlusForCausalLM(model.config, max_length=96))
        step = training.Step(meta, memory=training.rank_memory(meta, seed=SEED))
        training.shard(step, mesh=init_device_mesh("cuda", (1,)))
        return training.materialize(step, GOLDEN / "model", device="cuda")
    step = training.Step(model, memory=training.rank_memory(model, seed=SEED, rank=0))
    if wrapper == "ddp":
        return DistributedDataParallel(step, device_ids=[torch.cuda.current_device()])
    return training.shard(step) if wrapper == "fsdp" else step


def _worker(rank: int, port: int, folder: str) -> None:
    """The one rank: the plain step, then each wrapper's, each on a fresh model; results on the host."""
    try:
        warnings.filterwarnings("ignore", message=".*returned a view tensor")  # memory_kv's views: never written
        init_rank(rank, port, 1, backend="nccl")
        result = {"backend": torch.distributed.get_backend()}
        for wrapper in (None, *WRAPPERS):
            model = _on_cuda(MPlusForCausalLM.from_pretrained(str(GOLDEN / "model"), max_length=96, device="cuda"))
            step = _step(model, wrapper)
            inner = step.module if isinstance(step, DistributedDataParallel) else step
            model = inner.model
            out = step(*(t.cuda() for t in rank_data(0, 0, model.config.vocab_size)))
            out.loss.backward()
            grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
            result[wrapper or "plain"] = {
                "devices": {p.device.type for p in model.parameters()} | {g.device.type for g in grads.values()},
                "sharded": all(isinstance(p, DTensor) for p in model.parameters()),
                "loss": out.loss.detach().cpu(),
                "grads": {n: (g.full_tensor() if isinstance(g, DTensor) else g).cpu() for n, g in grads.items()},
                "memory": {k: v.cpu().clone() for k, v in memory_state(inner.memory).items()},
            }
        torch.save(result, Path(folder) / f"cuda-rank{rank}.pt")
        torch.distributed.destroy_process_group()
    except BaseException:
        (Path(folder) / f"cuda-rank{rank}.err").write_text(traceback.format_exc())
        raise


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> dict:
    return run_ranks(_worker, 1, tmp_path_factory.mktemp("cuda-ranks"), TIMEOUT_S, prefix="cuda-")[0]


def test_the_process_group_is_nccl_and_everything_is_on_the_gpu(run):
    assert run["backend"] == "nccl"
    for wrapper in ("plain", *WRAPPERS):
        assert run[wrapper]["devices"] == {"cuda"}, wrapper
    assert not run["plain"]["sharded"] and not run["ddp"]["sharded"]
    assert run["fsdp"]["sharded"] and run["meta"]["sharded"]


@pytest.mark.parametrize("wrapper", WRAPPERS)
def test_one_step_on_one_gpu_is_the_single_process_step(run, wrapper):
    """DDP, FSDP2 and the meta build on one GPU: the loss and the memory after the commit are the plain step's bit for
    bit (the forward is the same computation), the gradients within 1e-6 (FSDP2 sums in another order; DDP on one
    rank averages over one)."""
    want, got = run["plain"], run[wrapper]
    assert_equal(got["loss"], want["loss"], name=f"{wrapper} loss")
    assert got["grads"].keys() == want["grads"].keys() and len(want["grads"]) == 90
    worst = 0.0
    for name, g in want["grads"].items():
        assert_close(got["grads"][name], g, atol=ATOL, rtol=0, name=f"{wrapper} {name}")
        worst = max(worst, (got["grads"][name] - g).abs().max().item())
    for key, t in want["memory"].items():
        assert_equal(got["memory"][key], t, name=f"{wrapper} memory {key}")
    print(f"{wrapper} on cuda (nccl, 1 rank): max |grad - single-process grad| = {worst:.3g}")
