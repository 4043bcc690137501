"""Issue 21: checkpoints and resume under DDP and FSDP2 (gloo, 2 processes on the CPU, loopback only).

For each wrapper (``DistributedDataParallel(training.Step(...))`` and ``training.shard(training.Step(...))``), an
unbroken run of K + N steps against a run stopped after K steps (its processes ended) and resumed in new processes
from its checkpoint: the trained weights, the optimiser's state, every rank's memory and torch's RNG are bit-equal at
the end. The model trains in train mode, so LoRA dropout draws from each rank's torch RNG (seeded per rank) and the
resume must restore it too. Under FSDP2 the weights and AdamW's moments are ``DTensor`` shards, each rank saving its
own; a checkpoint of either wrapper loads into the other (``torch.distributed.checkpoint`` reshards). Bad
checkpoints (no marker, a rank's file missing, another world size, another config) are refused by name."""

from __future__ import annotations

import copy
import json
import shutil
import traceback
import warnings
from pathlib import Path

import pytest
import torch
import torch.distributed.checkpoint as dcp
from _golden import GOLDEN
from _ranks import NEEDS_GLOO, init_rank, rank_data, run_ranks, snapshot
from torch.distributed.tensor import DTensor
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


WRAPPERS = ("ddp", "fsdp")


def _setup(rank: int, wrapper: str):
    """A fresh rank: the model as built from its files (train mode: LoRA dropout on), this rank's memory and torch
    seed, the step wrapped by DDP or sharded by FSDP2, and an AdamW over the trained parameters (built after
    sharding: its parameters are then the shards)."""
    torch.manual_seed(SEED * 100 + rank)  # LoRA dropout draws from torch's global generator: one stream per rank
    model = MPlusForCausalLM.from_pretrained(str(GOLDEN / "model"), max_length=96)
    training.prepare(model)
    memory = training.rank_memory(model, seed=SEED)
    step = training.Step(model, memory=memory)
    wrapped = DistributedDataParallel(step) if wrapper == "ddp" else training.shard(step)
    opt = torch.optim.AdamW(training.param_groups(model, lr=1e-2, weight_decay=0.01))
    return model, memory, wrapped, opt


def _full(t):
    """A tensor whole (a DTensor's ``full_tensor()``: a collective), cloned; anything else as it is."""
    if isinstance(t, DTensor):
        return t.full_tensor().clone()
    return t.clone() if isinstance(t, torch.Tensor) else t


def _optimizer_state(model, opt) -> dict:
    """AdamW's state by parameter name, whole tensors (a sharded run's gathered from every rank)."""
    names = {p: n for n, p in model.named_parameters()}
    return {names[p]: {k: _full(v) for k, v in sorted(s.items())} for p, s in opt.state.items()}


def _weights(model) -> dict[str, torch.Tensor]:
    return {n: _full(p.detach()) for n, p in model.named_parameters() if p.requires_grad}


def _train(ddp, opt, rank: int, steps: range, vocab: int) -> None:
    for step in steps:
        ddp(*rank_data(rank, step, vocab)).loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)


def _errors(folder: Path, ddp, opt) -> dict[str, str]:
    """The errors of loading damaged copies of the checkpoint ``folder`` (made by rank 0, between barriers)."""
    rank = torch.distributed.get_rank()
    bad = {name: folder.with_name(f"{folder.name}-bad-{name}") for name in ("marker", "rank1", "world", "config")}
    if rank == 0:
        for path in bad.values():
            shutil.copytree(folder, path)
        (bad["marker"] / "checkpoint.json").unlink()
        (bad["rank1"] / "memory-rank1.safetensors").unlink()
        marker = json.loads((bad["world"] / "checkpoint.json").read_text())
        (bad["world"] / "checkpoint.json").write_text(json.dumps({**marker, "world_size": 4}))
        config = {**marker["config"], "num_hidden_layers": 5, "num_tokens": 16}
        (bad["config"] / "checkpoint.json").write_text(json.dumps({**marker, "config": config}))
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


def _loaded(rank: int, wrapper: str, folder: Path) -> dict:
    """A fresh step of ``wrapper`` loads the checkpoint ``folder``: its weights and AdamW state as loaded, whole."""
    model, _, wrapped, opt = _setup(rank, wrapper)
    training.load_training_checkpoint(folder, wrapped, opt)
    return {"weights": _weights(model), "optimizer": _optimizer_state(model, opt)}


def _worker(rank: int, port: int, folder: str, wrapper: str, mode: str) -> None:
    """One rank of one run of ``wrapper``: ``unbroken`` (K + N steps), ``first`` (K steps, then the checkpoint
    ``{wrapper}-ckpt``) or ``resume`` (load it, N steps, then try the damaged copies; FSDP2's, the last run, then
    loads each wrapper's checkpoint into a fresh step of the other). Writes ``{wrapper}-{mode}-rank{rank}.pt`` (or
    ``.err``)."""
    out = Path(folder)
    name = f"{wrapper}-{mode}"
    try:
        # memory_kv returns views (k[0], v[0]), never written in place: FSDP2's warning about views does not apply
        warnings.filterwarnings("ignore", message=".*returned a view tensor")
        init_rank(rank, port, WORLD)
        model, memory, wrapped, opt = _setup(rank, wrapper)
        vocab, result, ckpt = model.config.vocab_size, {}, out / f"{wrapper}-ckpt"
        if mode == "unbroken":
            _train(wrapped, opt, rank, range(K + N), vocab)
        elif mode == "first":
            _train(wrapped, opt, rank, range(K), vocab)
            training.save_training_checkpoint(ckpt, wrapped, opt, step=K, extra={"data": K})
            result["at_save"] = {"weights": _weights(model), "optimizer": _optimizer_state(model, opt)}
        else:
            version = memory.version
            got = training.load_training_checkpoint(ckpt, wrapped, opt)
            result["loaded"] = (got.step, got.extra, got.world_size, memory.version > version)
            _train(wrapped, opt, rank, range(got.step, got.step + N), vocab)
            result["errors"] = _errors(ckpt, wrapped, opt)
        result["sharded"] = all(isinstance(p, DTensor) for p in model.parameters())
        result["weights"] = _weights(model)
        result["optimizer"] = _optimizer_state(model, opt)
        result["memory"] = snapshot(memory)
        result["rng"] = torch.get_rng_state()
        if mode == "resume" and wrapper == WRAPPERS[-1]:  # both checkpoints exist: each into the other wrapper
            result["cross"] = {w: _loaded(rank, o, out / f"{w}-ckpt") for w, o in (("ddp", "fsdp"), ("fsdp", "ddp"))}
        torch.save(result, out / f"{name}-rank{rank}.pt")
        torch.distributed.destroy_process_group()
    except BaseException:
        (out / f"{name}-rank{rank}.err").write_text(traceback.format_exc())
        raise


def _run(folder: Path, wrapper: str, mode: str) -> list[dict]:
    """Run the 2 ranks of ``mode`` in new processes (spawned: nothing carries over), with a deadline."""
    return run_ranks(_worker, WORLD, folder, TIMEOUT_S, wrapper, mode, prefix=f"{wrapper}-{mode}-")


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("checkpoints")


@pytest.fixture(scope="module")
def runs(folder) -> dict:
    """Every run of both wrappers, DDP's first (FSDP2's resume then finds both checkpoints)."""
    results = {}
    for wrapper in WRAPPERS:
        results[wrapper] = {mode: _run(folder, wrapper, mode) for mode in ("unbroken", "first", "resume")}
    return results


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


@pytest.mark.parametrize("wrapper", WRAPPERS)
def test_resume_is_bit_exact(runs, wrapper):
    """Stopped after K steps and resumed in new processes: the weights, AdamW's state (moments and step counts), each
    rank's memory (rows, ages, long-term store, drop generator) and torch's RNG at step K + N are the unbroken run's,
    bit for bit — under FSDP2 too, where each rank saved and loaded its own shards of the weights and moments."""
    run = runs[wrapper]
    for rank in range(WORLD):
        want, got = run["unbroken"][rank], run["resume"][rank]
        assert got["loaded"] == (K, {"data": K}, WORLD, True)  # the memory's version advanced: stale caches refused
        assert got["sharded"] == want["sharded"] == (wrapper == "fsdp")
        for key in ("weights", "optimizer", "memory", "rng"):
            _assert_tree_equal(got[key], want[key], f"{wrapper} rank {rank} {key}")
        assert len(want["weights"]) == 90 and len(want["optimizer"]) == 90
        # the run moved: the checkpointed state is not the final one
        first = run["first"][rank]
        assert not torch.equal(first["memory"]["stm.hidden"], want["memory"]["stm.hidden"])
        assert any(not torch.equal(first["weights"][n], want["weights"][n]) for n in want["weights"])
    # the ranks' memories differ and their (whole) weights agree
    a, b = (run["unbroken"][r] for r in range(WORLD))
    assert not torch.equal(a["memory"]["stm.hidden"], b["memory"]["stm.hidden"])
    _assert_tree_equal(a["weights"], b["weights"], f"{wrapper} rank 0 vs rank 1 weights")


def test_a_checkpoint_loads_into_the_other_wrapper(runs):
    """DDP's checkpoint (whole tensors) loaded into a sharded step, and FSDP2's (shards) into a DDP step: the weights
    and AdamW's state are those of the saving run at its save, bit for bit (``torch.distributed.checkpoint``
    reshards); the two runs' states at the save differ (FSDP2 sums gradients in another order), so each load is
    told apart."""
    for rank in range(WORLD):
        cross = runs["fsdp"]["resume"][rank]["cross"]
        for saved in WRAPPERS:
            _assert_tree_equal(cross[saved], runs[saved]["first"][rank]["at_save"], f"rank {rank} {saved} checkpoint")
        ddp, fsdp = (runs[w]["first"][rank]["at_save"]["weights"] for w in WRAPPERS)
        assert any(not torch.equal(ddp[n], fsdp[n]) for n in ddp)


@pytest.mark.parametrize("wrapper", WRAPPERS)
def test_damaged_checkpoints_are_refused_by_name(runs, wrapper):
    for rank in range(WORLD):
        errors = runs[wrapper]["resume"][rank]["errors"]
        assert "bad-marker is an incomplete checkpoint: it has no checkpoint.json" in errors["marker"]
        assert "bad-rank1 has no memory-rank1.safetensors (rank 1's)" in errors["rank1"]
        assert "bad-world was saved by 4 ranks, this run has 2" in errors["world"]
        assert (
            "bad-config was saved from a model of another config: num_hidden_layers: 5 saved, 3 here; num_tokens: "
            "16 saved, 8 here" in errors["config"]
        )
        assert "ckpt exists; a checkpoint is never overwritten" in errors["exists"]


@pytest.mark.parametrize("wrapper", WRAPPERS)
def test_layout_and_a_single_process_is_refused(runs, folder, wrapper):
    """The folder's files and marker; FSDP2's weights are saved as each rank's shards (two chunks per tensor), DDP's
    whole (one); loading it without a process group (world size 1) is refused; so is a folder that is not there,
    naming the ``.partial`` a save left behind."""
    ckpt = folder / f"{wrapper}-ckpt"
    names = sorted(p.name for p in ckpt.iterdir())
    assert names == [
        "checkpoint.json", "memory-rank0.safetensors", "memory-rank1.safetensors", "rng-rank0.pt", "rng-rank1.pt",
        "weights",
    ]  # fmt: skip
    assert (ckpt / "weights" / ".metadata").is_file()
    marker = json.loads((ckpt / "checkpoint.json").read_text())
    assert marker["sharded"] == (wrapper == "fsdp") and marker["world_size"] == WORLD and marker["step"] == K
    assert marker["config"]["num_hidden_layers"] == 3 and marker["config"]["lora_config"]["r"] == 4
    tensors = dcp.FileSystemReader(ckpt / "weights").read_metadata().state_dict_metadata
    weights = {k: v for k, v in tensors.items() if k.startswith("model.")}
    assert len(weights) == 90  # the trained weights only: the frozen base is not in a training checkpoint
    assert {len(v.chunks) for v in weights.values()} == {WORLD if wrapper == "fsdp" else 1}
    model = MPlusForCausalLM.from_pretrained(str(GOLDEN / "model"), max_length=96)
    training.prepare(model)
    step = training.Step(model, memory=training.rank_memory(model, seed=SEED, rank=0))
    with pytest.raises(ValueError, match="was saved by 2 ranks, this run has 1"):
        training.load_training_checkpoint(ckpt, step)
    missing = folder / f"{wrapper}-gone"
    missing.with_name(f"{wrapper}-gone.partial").mkdir()
    with pytest.raises(FileNotFoundError, match=r"gone is not a checkpoint folder \(.*gone\.partial is a save that"):
        training.load_training_checkpoint(missing, step)
    with pytest.raises(TypeError, match="model must be a training.Step"):
        training.load_training_checkpoint(ckpt, torch.nn.Linear(2, 2))


def test_a_checkpoint_of_another_config_is_refused(tmp_path):
    """In one process (no process group: world size 1): a checkpoint of the golden model loads into a model of the
    same config and is refused, before anything changes, by a model whose LoRA rank and memory size differ, naming
    both fields."""
    model = MPlusForCausalLM.from_pretrained(str(GOLDEN / "model"), max_length=96)
    training.prepare(model)
    step = training.Step(model, memory=training.rank_memory(model, seed=SEED, rank=0))
    opt = torch.optim.AdamW(training.param_groups(model, lr=1e-2))
    training.save_training_checkpoint(tmp_path / "ckpt", step, opt, step=0)
    assert training.load_training_checkpoint(tmp_path / "ckpt", step, opt).world_size == 1
    config = copy.deepcopy(model.config)
    config.num_blocks, config.lora_config = 8, {**config.lora_config, "r": 2}
    other = MPlusForCausalLM(config, max_length=96)
    training.prepare(other)
    step = training.Step(other, memory=training.rank_memory(other, seed=SEED, rank=0))
    before = snapshot(step.memory)
    message = r"another config: lora_config: \{'r': 4, .*\} saved, \{'r': 2, .*\} here; num_blocks: 6 saved, 8 here"
    with pytest.raises(ValueError, match=message):
        training.load_training_checkpoint(tmp_path / "ckpt", step)
    for key, t in memory_state(step.memory).items():
        assert_equal(t, before[key], name=key)
