"""Training M+ under ``torch.distributed``: per-rank memories, DDP, checkpoints that resume (FSDP2: :mod:`mplus.fsdp`;
the guide: docs/training.md).

:class:`mplus.training.Step` (defined with ``training_step``) is what DDP wraps and :func:`mplus.fsdp.shard` shards.

DDP averages the gradients of what runs through a module's ``forward``, and :func:`mplus.training.training_step` is a
function, so :class:`~mplus.training.Step` makes the step a module::

    step = training.Step(model, memory=training.rank_memory(model, seed=0))
    ddp = DistributedDataParallel(step)            # the memory is never synchronised (below)
    out = ddp(context_ids, target_ids)             # training_step on this rank's data and memory
    out.loss.backward(); opt.step(); opt.zero_grad()   # the gradients are the mean over the ranks

**The memory is per rank and never synchronised.** Each rank injects its own contexts into its own memory, so the
memories diverge by design, and a broadcast from rank 0 would replace every rank's memory with rank 0's (DDP's
``broadcast_buffers=True``, its default, does exactly that at wrapping and before every forward, since
``model.memory`` is a submodule and its tensors are buffers; torch 2.13's replacement ``forward_sync_buffers=False``
still broadcasts them once at wrapping). :class:`Step` therefore lists every buffer of every memory state in its tree
in DDP's ignore list (``DistributedDataParallel._set_params_and_buffers_to_ignore_for_model``, the attribute
``_ddp_params_and_buffers_to_ignore`` that DDP reads when it wraps), so DDP neither broadcasts nor checks them,
whatever ``broadcast_buffers`` / ``forward_sync_buffers`` say. The other buffers (the RoPE tables) are equal on every
rank. A state given as ``memory=`` is not a submodule of the Step at all (``Step.memory`` is a plain attribute): it
stays where it is when the Step moves (``state.to(device)``).

**Each rank draws its own drops.** :func:`rank_memory` gives a rank a copy of the model's memory with its own
``torch.Generator``, seeded ``seed * 2**32 + rank`` (:func:`rank_seed`), so ranks drop different rows, and a run is
reproducible rank by rank (the default state draws from torch's global generator: every rank seeded alike would drop
the same rows).

**Every trained parameter must be reached** by each rank's step, or DDP's reducer waits for a gradient that never
comes (the next forward raises). A step with the retriever loss (M+'s default) reaches every LoRA factor and
projector; ``retriever_loss=False`` leaves the projectors unreached: freeze them (``requires_grad_(False)``) before
wrapping, or pass ``find_unused_parameters=True`` to DDP (slower: it walks the graph every step).

**Checkpoints** (:func:`save_training_checkpoint`, :func:`load_training_checkpoint`) hold the trained weights and the
optimiser's state through ``torch.distributed.checkpoint`` (``get_state_dict``/``set_state_dict``: whole tensors
under DDP, each rank's shards under FSDP2; the model's state_dict holds weights only: the memory is user data), each
rank's memory as its own ``MemoryState.save`` file (with its drop generator), each rank's torch RNG state (LoRA
dropout draws from it), the step counter and the model's config. A folder is complete exactly when it exists: the
ranks write into ``<folder>.partial``, rank 0 writes ``checkpoint.json`` last (after a barrier) and renames the
folder; a load refuses a folder without it, of another world size or of another config.
"""

from __future__ import annotations

import dataclasses
import inspect
import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_state_dict,
    set_model_state_dict,
    set_state_dict,
)
from torch.distributed.tensor import DTensor
from torch.nn.parallel import DistributedDataParallel

from .memory import serialization
from .memory.state import MemoryState
from .model import MPlusForCausalLM

__all__ = [
    "TrainingCheckpoint", "config_fields", "load_training_checkpoint", "memory_buffer_names", "rank_memory",
    "rank_seed", "save_training_checkpoint",
]  # fmt: skip

SEED_LIMIT = 2**32  # seed and rank each in [0, 2**32): seed * 2**32 + rank is one distinct 64-bit seed per pair


def rank_seed(seed: int, rank: int) -> int:
    """The drop generator's seed of ``rank`` in a run seeded ``seed``: ``seed * 2**32 + rank`` (distinct for every
    pair with both in ``[0, 2**32)``)."""
    for name, value in (("seed", seed), ("rank", rank)):
        if isinstance(value, bool) or not isinstance(value, int):
            raise TypeError(f"rank_seed: {name} must be an int, got {type(value).__name__}")
        if not 0 <= value < SEED_LIMIT:
            raise ValueError(f"rank_seed: {name}={value}, expected 0 <= {name} < 2**32")
    return seed * SEED_LIMIT + rank


def _distributed() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def _current_rank() -> int:
    return torch.distributed.get_rank() if _distributed() else 0


def _world_size() -> int:
    return torch.distributed.get_world_size() if _distributed() else 1


def _barrier() -> None:
    if _distributed():
        torch.distributed.barrier()


def rank_memory(
    model: MPlusForCausalLM, *, seed: int, rank: int | None = None, like: MemoryState | None = None
) -> MemoryState:
    """A memory state of its own for ``rank`` (default: this process's rank in ``torch.distributed``, 0 when it is
    not initialised): a copy of ``like`` (default: the model's default memory as it is now), with training ages
    (SPEC.md §4.7) and its own CPU ``torch.Generator`` seeded ``rank_seed(seed, rank)``, so every rank drops other
    rows. Give it to :class:`Step` (``memory=``)."""
    if not isinstance(model, MPlusForCausalLM):
        raise TypeError(f"rank_memory: model must be an MPlusForCausalLM, got {type(model).__name__}")
    rank = _current_rank() if rank is None else rank
    state = model.new_memory(like, seed=rank_seed(seed, rank))
    state.stm.age_mode = "training"
    return state


def memory_buffer_names(module: nn.Module) -> list[str]:
    """The names (as ``module.named_buffers()`` gives them) of every buffer inside a :class:`MemoryState` in
    ``module``'s tree: what DDP must leave alone."""
    names = []
    for prefix, sub in module.named_modules():
        if isinstance(sub, MemoryState):
            names += [f"{prefix}.{name}" if prefix else name for name, _ in sub.named_buffers()]
    return names


# ------------------------------------------------------------------------------------------------------ helpers
def _is_step(module: Any) -> bool:
    """A :class:`mplus.training.Step` (defined there; that module imports this one): a module holding the model and
    the memory it trains on."""
    return isinstance(getattr(module, "model", None), MPlusForCausalLM) and isinstance(
        getattr(module, "memory", None), MemoryState
    )


# ------------------------------------------------------------------------------------------------------ checkpoints
CHECKPOINT_FORMAT = "mplus.training-checkpoint/1"
MARKER = "checkpoint.json"  # written last, by rank 0, after every rank has written: a folder without it is incomplete
WEIGHTS = "weights"  # the torch.distributed.checkpoint folder (trained weights + optimiser state)
_DCP_OPTIONS = StateDictOptions(ignore_frozen_params=True)  # the trained parameters only: the base weights are given


def memory_file(rank: int) -> str:
    return f"memory-rank{rank}.safetensors"


def rng_file(rank: int) -> str:
    return f"rng-rank{rank}.pt"


def config_fields(model: MPlusForCausalLM) -> dict[str, Any]:
    """What a checkpoint records of the model's config and a load compares: every field :class:`MPlusConfig`
    defines (the Llama shapes, RoPE, the memory sizes and rules; of ``lora_config`` the rank, alpha and targets, not
    the dropout), as JSON writes them."""
    cfg = model.config
    names = [n for n in inspect.signature(type(cfg).__init__).parameters if n not in ("self", "kwargs")]
    fields = {n: getattr(cfg, n) for n in names if hasattr(cfg, n)}
    lora = fields.get("lora_config") or {}
    fields["lora_config"] = {k: lora.get(k) for k in ("r", "lora_alpha", "target_modules")}
    return json.loads(json.dumps(fields, default=_jsonable))


def _jsonable(value: Any) -> Any:
    """A config value JSON has no type for: a set (PEFT's ``target_modules``) sorted, anything else its ``str``."""
    return sorted(value) if isinstance(value, (set, frozenset)) else str(value)


def _check_config(marker: dict, model: MPlusForCausalLM, folder: Path, fn: str) -> None:
    saved = marker.get("config")
    if saved is None:  # written before checkpoints recorded it
        return
    own = config_fields(model)
    differ = [
        f"{k}: {saved.get(k)!r} saved, {own.get(k)!r} here"
        for k in sorted(own.keys() | saved.keys())
        if saved.get(k) != own.get(k)
    ]
    if differ:
        raise ValueError(f"{fn}: {folder} was saved from a model of another config: " + "; ".join(differ))


@dataclasses.dataclass(frozen=True)
class TrainingCheckpoint:
    """What :func:`load_training_checkpoint` read besides the tensors: the step the run had done and ``extra``."""

    step: int
    world_size: int
    extra: dict


def _step_of(model: Any, fn: str) -> tuple[nn.Module, MemoryState]:
    """The module whose trained weights are checkpointed (DDP unwrapped: ``get_state_dict`` strips its prefix
    itself) and the memory state this rank trains on."""
    inner = model.module if isinstance(model, DistributedDataParallel) else model
    if _is_step(inner):
        return model, inner.memory
    if isinstance(inner, MPlusForCausalLM):
        return model, inner.memory
    raise TypeError(
        f"{fn}: model must be a training.Step, a DistributedDataParallel of one, or an MPlusForCausalLM, "
        f"got {type(model).__name__}"
    )


def _model_of(module: nn.Module) -> MPlusForCausalLM:
    inner = module.module if isinstance(module, DistributedDataParallel) else module
    return inner if isinstance(inner, MPlusForCausalLM) else inner.model


def _sharded(module: nn.Module) -> bool:
    """Whether the trained weights are sharded (FSDP2: ``DTensor`` s), as ``checkpoint.json`` records it."""
    return any(isinstance(p, DTensor) for p in _model_of(module).parameters())


def _state(module: nn.Module, optimizer: torch.optim.Optimizer | None) -> dict[str, Any]:
    if optimizer is None:
        return {"model": get_model_state_dict(module, options=_DCP_OPTIONS)}
    model_sd, optim_sd = get_state_dict(module, optimizer, options=_DCP_OPTIONS)
    return {"model": model_sd, "optimizer": optim_sd}


def _rng_states() -> dict[str, Any]:
    states: dict[str, Any] = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def save_training_checkpoint(
    directory: str | os.PathLike,
    model: Any,
    optimizer: torch.optim.Optimizer | None = None,
    *,
    step: int,
    extra: dict | None = None,
) -> Path:
    """Save what resuming a run needs, bit-exactly, into the new folder ``directory``; every rank calls it (a
    collective). Returns the folder.

    Layout: ``weights/`` (``torch.distributed.checkpoint``: the trained parameters, ``model.*``, and the optimiser's
    state, ``optimizer.*``; under FSDP2 each rank writes its own shards, under DDP the whole tensors are written once),
    ``memory-rank{r}.safetensors`` (rank ``r``'s memory, :meth:`MemoryState.save`: rows, ages, long-term store, the
    drop generator), ``rng-rank{r}.pt`` (rank ``r``'s torch CPU/CUDA RNG states: LoRA dropout draws from them),
    ``checkpoint.json`` (format, world size, ``step``, whether the weights were sharded, the model's config
    (:func:`config_fields`), ``extra``; written last).

    Args:
        model: a :class:`Step` (sharded by :func:`mplus.fsdp.shard` or not), a ``DistributedDataParallel`` of one, or
            an :class:`MPlusForCausalLM` (its own memory).
        optimizer: saved with the weights when given.
        step: the number of steps done (``load_training_checkpoint(...).step``).
        extra: anything JSON can hold (data loader position, schedule, ...), returned by the load.

    The ranks write into ``<directory>.partial``; rank 0 renames it to ``directory`` after writing the marker, so a
    crash mid-save leaves no folder that looks complete. An existing ``directory`` is refused (checkpoints are never
    overwritten: save each one into its own folder, e.g. ``step-000100``).
    """
    fn = "save_training_checkpoint"
    module, memory = _step_of(model, fn)
    if isinstance(step, bool) or not isinstance(step, int) or step < 0:
        raise ValueError(f"{fn}: step must be an int >= 0, got {step!r}")
    if optimizer is not None and not isinstance(optimizer, torch.optim.Optimizer):
        raise TypeError(f"{fn}: optimizer must be a torch.optim.Optimizer or None, got {type(optimizer).__name__}")
    config = config_fields(_model_of(module))
    try:
        marker = json.dumps({
            "format": CHECKPOINT_FORMAT, "world_size": _world_size(), "step": step, "optimizer": optimizer is not None,
            "sharded": _sharded(module), "config": config, "extra": extra or {},
        })  # fmt: skip
    except TypeError as exc:
        raise TypeError(f"{fn}: extra must hold only what JSON can write: {exc}") from None
    final = Path(directory)
    if final.exists():  # checked by every rank before the first collective: all raise alike
        raise FileExistsError(f"{fn}: {final} exists; a checkpoint is never overwritten: choose a new folder")
    partial = final.with_name(final.name + ".partial")
    rank = _current_rank()
    if rank == 0:  # what an interrupted save left
        shutil.rmtree(partial, ignore_errors=True)
        partial.mkdir(parents=True)
    _barrier()
    memory.save(str(partial / memory_file(rank)))  # whole or not at all (safetensors writes and renames)
    torch.save(_rng_states(), partial / rng_file(rank))
    dcp.save(_state(module, optimizer), checkpoint_id=partial / WEIGHTS)  # collective; its .metadata written last
    _barrier()  # every rank's files are written
    if rank == 0:
        tmp = partial / (MARKER + ".tmp")
        tmp.write_text(marker)
        os.replace(tmp, partial / MARKER)
        os.replace(partial, final)
    _barrier()  # no rank returns before the folder is complete
    return final


def _read_marker(folder: Path, fn: str) -> dict:
    path = folder / MARKER
    if not path.is_file():
        partial = folder.with_name(folder.name + ".partial")
        why = f" ({partial} is a save that did not finish)" if partial.exists() else ""
        if not folder.is_dir():
            raise FileNotFoundError(f"{fn}: {folder} is not a checkpoint folder{why}")
        raise ValueError(
            f"{fn}: {folder} is an incomplete checkpoint: it has no {MARKER} (written last by a save that finished)"
        )
    try:
        marker = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ValueError(f"{fn}: {path} is not JSON ({exc})") from None
    if not isinstance(marker, dict) or marker.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"{fn}: {path} is not an mplus training checkpoint (format {CHECKPOINT_FORMAT!r})")
    return marker


def load_training_checkpoint(
    directory: str | os.PathLike, model: Any, optimizer: torch.optim.Optimizer | None = None
) -> TrainingCheckpoint:
    """Resume from a :func:`save_training_checkpoint` folder; every rank calls it (a collective) on the same world
    size as the save. Restores the trained weights (and ``optimizer``'s state), this rank's memory (into the state
    trained on, through :func:`~mplus.memory.serialization.load_tensors`: all or nothing, its version advances, so a
    generation cache made before is refused as stale) and this rank's torch RNG states. Returns the step and extra.

    Refused, before anything changes, naming what is wrong: a folder without ``checkpoint.json`` (a save that did not
    finish), another world size, a model of another config (each field that differs named), a missing rank file, a
    memory file of another shape, an optimiser asked for but not saved. Every rank checks every rank's files first,
    so all raise alike rather than leave the others waiting. The weights load whatever the saving run's sharding
    (``torch.distributed.checkpoint`` reshards): a sharded run resumes from a DDP run's checkpoint and back.
    """
    fn = "load_training_checkpoint"
    module, memory = _step_of(model, fn)
    folder = Path(directory)
    marker = _read_marker(folder, fn)
    world, rank = _world_size(), _current_rank()
    if marker["world_size"] != world:
        raise ValueError(
            f"{fn}: {folder} was saved by {marker['world_size']} ranks, this run has {world}: each rank resumes its "
            "own memory, so the world size must be the same"
        )
    for r in range(world):
        for name in (memory_file(r), rng_file(r)):
            if not (folder / name).is_file():
                raise ValueError(f"{fn}: {folder} has no {name} (rank {r}'s); the checkpoint is damaged")
    _check_config(marker, _model_of(module), folder, fn)
    if optimizer is not None and not marker["optimizer"]:
        raise ValueError(f"{fn}: {folder} holds no optimizer state (saved without one); pass optimizer=None")
    # this rank's memory file, checked whole on a scratch state before anything changes
    where = f"{fn}({folder / memory_file(rank)})"
    sd, _ = serialization.read_file(str(folder / memory_file(rank)), fn)
    serialization.load_tensors(MemoryState.empty(memory.describe()), sd, where)
    rng = torch.load(folder / rng_file(rank), weights_only=True)
    state = _state(module, optimizer)
    dcp.load(state, checkpoint_id=folder / WEIGHTS)  # collective, in place; a trained weight not saved raises
    options = dataclasses.replace(_DCP_OPTIONS, strict=False)  # the frozen weights are not in the checkpoint
    if optimizer is None:
        result = set_model_state_dict(module, state["model"], options=options)
    else:
        result = set_state_dict(
            module, optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"], options=options
        )
    if result.unexpected_keys:
        raise ValueError(f"{fn}: {folder} holds weights this model has not: {sorted(result.unexpected_keys)[:5]}")
    serialization.load_tensors(memory, sd, where)  # checked above: commits
    torch.set_rng_state(rng["cpu"])
    if "cuda" in rng and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(rng["cuda"])
    return TrainingCheckpoint(step=marker["step"], world_size=world, extra=marker["extra"])
