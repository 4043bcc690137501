"""Issue 21: checkpoints and resume under DDP (gloo, 2 processes on the CPU, loopback only).

An unbroken run of K + N steps against a run stopped after K steps (its processes ended) and resumed in new processes
from its checkpoint: the trained weights, the optimiser's state, every rank's memory and torch's RNG are bit-equal at
the end. The model trains in train mode, so LoRA dropout draws from each rank's torch RNG (seeded per rank) and the
resume must restore it too. Bad checkpoints (no marker, a rank's file missing, another world size) are refused by
name."""

from __future__ import annotations

import json
import shutil
import traceback
from pathlib import Path

import pytest
import torch
from _golden import GOLDEN
from _ranks import NEEDS_GLOO, init_rank, rank_data, run_ranks
from torch.nn.parallel import DistributedDataParallel

from mplus import training
from mplus.checkpoint import memory_state
from mplus.model import MPlusForCausalLM
from mplus_kernels.testing import assert_equal

WORLD = 2
SEED = 11
K, N = 2, 2  # steps before the checkpoint, steps after it
TIMEOUT_S = 120  # one multi-process run; init_process_group and every collective time out at 60 s

pytestmark = NEEDS_GLOO


def _setup(rank: int):
    """A fresh rank: the model as built from its files (train mode: LoRA dropout on), this rank's memory and torch
    seed, the DDP-wrapped step and an AdamW over the trained parameters."""
    torch.manual_seed(SEED * 100 + rank)  # LoRA dropout draws from torch's global generator: one stream per rank
    model = MPlusForCausalLM.from_pretrained(str(GOLDEN / "model"), max_length=96)
    training.prepare(model)
    memory = training.rank_memory(model, seed=SEED)
    ddp = DistributedDataParallel(training.Step(model, memory=memory))
    opt = torch.optim.AdamW(training.param_groups(model, lr=1e-2, weight_decay=0.01))
    return model, memory, ddp, opt


def _train(ddp, opt, rank: int, steps: range, vocab: int) -> None:
    for step in steps:
        ddp(*rank_data(rank, step, vocab)).loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)


def _errors(folder: Path, ddp, opt) -> dict[str, str]:
    """The errors of loading damaged copies of the checkpoint ``folder`` (made by rank 0, between barriers)."""
    rank = torch.distributed.get_rank()
    bad = {name: folder.with_name(f"bad-{name}") for name in ("marker", "rank1", "world")}
    if rank == 0:
        for path in bad.values():
            shutil.copytree(folder, path)
        (bad["marker"] / "checkpoint.json").unlink()
        (bad["rank1"] / "memory-rank1.safetensors").unlink()
        marker = json.loads((bad["world"] / "checkpoint.json").read_text())
        (bad["world"] / "checkpoint.json").write_text(json.dumps({**marker, "world_size": 4}))
    torch.distributed.barrier()
    errors = {}
    for name, path in bad.items():
        try:
            training.load_training_checkpoint(path, ddp, opt)
        except (ValueError, FileNotFoundError) as exc:
            errors[name] = str(exc)
    try:
        training.save_training_checkpoint(folder, ddp, opt, step=0)
    except FileExistsError as exc:
        errors["exists"] = str(exc)
    torch.distributed.barrier()
    return errors


def _worker(rank: int, port: int, folder: str, mode: str) -> None:
    """One rank of one run: ``unbroken`` (K + N steps), ``first`` (K steps, then the checkpoint) or ``resume`` (load
    the checkpoint, N steps, then try the damaged copies). Writes ``{mode}-rank{rank}.pt`` (or ``.err``)."""
    out = Path(folder)
    try:
        init_rank(rank, port, WORLD)
        model, memory, ddp, opt = _setup(rank)
        vocab, result = model.config.vocab_size, {}
        if mode == "unbroken":
            _train(ddp, opt, rank, range(K + N), vocab)
        elif mode == "first":
            _train(ddp, opt, rank, range(K), vocab)
            training.save_training_checkpoint(out / "ckpt", ddp, opt, step=K, extra={"data": K})
        else:
            version = memory.version
            got = training.load_training_checkpoint(out / "ckpt", ddp, opt)
            result["loaded"] = (got.step, got.extra, got.world_size, memory.version > version)
            _train(ddp, opt, rank, range(got.step, got.step + N), vocab)
            result["errors"] = _errors(out / "ckpt", ddp, opt)
        result["weights"] = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
        result["optimizer"] = opt.state_dict()
        result["memory"] = {k: v.clone() for k, v in memory_state(memory).items()}
        result["rng"] = torch.get_rng_state()
        torch.save(result, out / f"{mode}-rank{rank}.pt")
        torch.distributed.destroy_process_group()
    except BaseException:
        (out / f"{mode}-rank{rank}.err").write_text(traceback.format_exc())
        raise


def _run(folder: Path, mode: str) -> list[dict]:
    """Run the 2 ranks of ``mode`` in new processes (spawned: nothing carries over), with a deadline."""
    return run_ranks(_worker, WORLD, folder, TIMEOUT_S, mode, prefix=f"{mode}-")


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict:
    folder = tmp_path_factory.mktemp("ddp-checkpoint")
    results = {mode: _run(folder, mode) for mode in ("unbroken", "first", "resume")}
    return results | {"folder": folder / "ckpt"}


def _assert_tree_equal(a, b, name: str) -> None:
    if isinstance(a, torch.Tensor):
        assert_equal(a, b, name=name)
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), name
        for key in a:
            _assert_tree_equal(a[key], b[key], f"{name}.{key}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), name
        for i, (x, y) in enumerate(zip(a, b)):
            _assert_tree_equal(x, y, f"{name}[{i}]")
    else:
        assert a == b, f"{name}: {a!r} != {b!r}"


def test_resume_is_bit_exact(runs):
    """Stopped after K steps and resumed in new processes: the weights, AdamW's state (moments and step counts), each
    rank's memory (rows, ages, long-term store, drop generator) and torch's RNG at step K + N are the unbroken run's,
    bit for bit."""
    for rank in range(WORLD):
        want, got = runs["unbroken"][rank], runs["resume"][rank]
        assert got["loaded"] == (K, {"data": K}, WORLD, True)  # the memory's version advanced: stale caches refused
        for key in ("weights", "optimizer", "memory", "rng"):
            _assert_tree_equal(got[key], want[key], f"rank {rank} {key}")
        assert len(want["weights"]) == 90 and len(want["optimizer"]["state"]) == 90
        # the run moved: the checkpointed state is not the final one
        first = runs["first"][rank]
        assert not torch.equal(first["memory"]["stm.hidden"], want["memory"]["stm.hidden"])
        assert any(not torch.equal(first["weights"][n], want["weights"][n]) for n in want["weights"])
    # the ranks' memories differ and their weights agree (DDP)
    a, b = (runs["unbroken"][r] for r in range(WORLD))
    assert not torch.equal(a["memory"]["stm.hidden"], b["memory"]["stm.hidden"])
    _assert_tree_equal(a["weights"], b["weights"], "rank 0 vs rank 1 weights")


def test_damaged_checkpoints_are_refused_by_name(runs):
    for rank in range(WORLD):
        errors = runs["resume"][rank]["errors"]
        assert "bad-marker is an incomplete checkpoint: it has no checkpoint.json" in errors["marker"]
        assert "bad-rank1 has no memory-rank1.safetensors (rank 1's)" in errors["rank1"]
        assert "bad-world was saved by 4 ranks, this run has 2" in errors["world"]
        assert "ckpt exists; a checkpoint is never overwritten" in errors["exists"]


def test_layout_and_a_single_process_is_refused(runs):
    """The folder's files; loading it without a process group (world size 1) is refused; so is a folder that is not
    there, naming the ``.partial`` a save left behind."""
    folder = runs["folder"]
    names = sorted(p.name for p in folder.iterdir())
    assert names == [
        "checkpoint.json", "memory-rank0.safetensors", "memory-rank1.safetensors", "rng-rank0.pt", "rng-rank1.pt",
        "weights",
    ]  # fmt: skip
    assert (folder / "weights" / ".metadata").is_file()
    model = MPlusForCausalLM.from_pretrained(str(GOLDEN / "model"), max_length=96)
    training.prepare(model)
    step = training.Step(model, memory=training.rank_memory(model, seed=SEED, rank=0))
    with pytest.raises(ValueError, match="was saved by 2 ranks, this run has 1"):
        training.load_training_checkpoint(folder, step)
    missing = folder.with_name("gone")
    missing.with_name("gone.partial").mkdir()
    with pytest.raises(FileNotFoundError, match=r"gone is not a checkpoint folder \(.*gone\.partial is a save that"):
        training.load_training_checkpoint(missing, step)
    with pytest.raises(TypeError, match="model must be a training.Step"):
        training.load_training_checkpoint(folder, torch.nn.Linear(2, 2))
