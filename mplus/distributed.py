"""Training M+ under ``torch.distributed``: DDP, FSDP2 (:func:`shard`), per-rank memories, checkpoints that resume.

:class:`mplus.training.Step` (defined with ``training_step``) is what DDP wraps and :func:`shard` shards.

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
optimiser's state through ``torch.distributed.checkpoint`` (``get_state_dict``/``set_state_dict``, for FSDP2 too,
untested there; the model's state_dict holds weights only: the memory is user data), each rank's memory as its own
``MemoryState.save`` file (with its drop generator), each rank's torch RNG state (LoRA dropout draws from it) and the
step counter. A folder is complete exactly when it exists: the ranks write into ``<folder>.partial``, rank 0 writes
``checkpoint.json`` last (after a barrier) and renames the folder; a load refuses a folder without it.
"""

from __future__ import annotations

import dataclasses
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
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import FSDPModule, fully_shard, register_fsdp_forward_method
from torch.nn.parallel import DistributedDataParallel

from .memory import serialization
from .memory.state import MemoryState
from .model import MPlusForCausalLM

__all__ = [
    "TrainingCheckpoint", "load_training_checkpoint", "memory_buffer_names", "rank_memory", "rank_seed",
    "save_training_checkpoint", "shard",
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


# ------------------------------------------------------------------------------------------------------------ FSDP2
LAYER_UNITS = ("input_layernorm", "self_attn.query_proj", "self_attn.key_proj", "self_attn.encoder_query_proj")


def shard(step: nn.Module, mesh: Any = None, **fsdp_kwargs: Any) -> nn.Module:
    """Shard a :class:`Step`'s model over ``mesh`` with FSDP2 (``torch.distributed.fsdp.fully_shard``), in place;
    returns the step, which trains as an unsharded one does: ``out = step(context, target); out.loss.backward()``
    (the gradients, sharded ``DTensor`` s, are the mean over the ranks: ``p.grad.full_tensor()``).

    The units, innermost first: in every decoder layer its ``input_layernorm`` and retriever projectors
    (:data:`LAYER_UNITS`: the step calls them outside the layer's ``forward``), then the layer itself, with
    :meth:`~mplus.llama.DecoderLayer.memory_kv` registered as a forward method
    (``register_fsdp_forward_method``: it reads k/v projections outside ``forward``); then the Step, the root, which
    holds the rest (embedding, final norm, ``lm_head``, BOS rows) unsharded for the whole step. FSDP2 unshards a
    unit's parameters only in its forward (and the registered methods), so every parameter the step reads is whole
    when read. Frozen and trained parameters are sharded alike.

    The memory is not sharded, broadcast or touched: ``fully_shard`` shards parameters only, and buffers (every
    :class:`MemoryState`'s, the RoPE tables) stay the tensors they were, per rank. Call it after
    ``torch.distributed.init_process_group`` and :func:`mplus.training.prepare`, before building the optimiser
    (its parameters become the sharded ones). ``mesh``: a 1-D ``DeviceMesh`` (default: every rank, on the model's
    device type); ``fsdp_kwargs`` go to each ``fully_shard`` call (``reshard_after_forward``, ``mp_policy``...).
    A bare :class:`MPlusForCausalLM` is refused: the root must be the module whose ``forward`` runs the step.
    FSDP2 warns that ``memory_kv`` returns a view (``k[0]``): harmless, as nothing writes it in place.
    """
    if not _is_step(step):
        raise TypeError(
            f"shard: expected a training.Step, got {type(step).__name__}; the root unit must run the step in its "
            "forward: step = training.shard(training.Step(model, memory=...))"
        )
    if isinstance(step, FSDPModule):
        raise ValueError("shard: this Step is already sharded")
    if not _distributed():
        raise RuntimeError("shard: torch.distributed is not initialised (call init_process_group first)")
    if mesh is None:
        mesh = init_device_mesh(step.model.compute_device.type, (_world_size(),))
    for layer in step.model.layers:
        for name in LAYER_UNITS:
            unit = layer.get_submodule(name) if _has_submodule(layer, name) else None
            if unit is not None:
                fully_shard(unit, mesh=mesh, **fsdp_kwargs)
        fully_shard(layer, mesh=mesh, **fsdp_kwargs)
        register_fsdp_forward_method(layer, "memory_kv")
    fully_shard(step, mesh=mesh, **fsdp_kwargs)
    return step


def _has_submodule(module: nn.Module, name: str) -> bool:
    try:
        module.get_submodule(name)
    except AttributeError:
        return False
    return True


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
    state, ``optimizer.*``), ``memory-rank{r}.safetensors`` (rank ``r``'s memory, :meth:`MemoryState.save`: rows,
    ages, long-term store, the drop generator), ``rng-rank{r}.pt`` (rank ``r``'s torch CPU/CUDA RNG states: LoRA
    dropout draws from them), ``checkpoint.json`` (format, world size, ``step``, ``extra``; written last).

    Args:
        model: a :class:`Step`, a ``DistributedDataParallel`` of one, or an :class:`MPlusForCausalLM` (its own memory).
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
    try:
        marker = json.dumps({
            "format": CHECKPOINT_FORMAT, "world_size": _world_size(), "step": step, "optimizer": optimizer is not None,
            "extra": extra or {},
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
    finish), another world size, a missing rank file, a memory file of another shape, an optimiser asked for but not
    saved. Every rank checks every rank's files first, so all raise alike rather than leave the others waiting.
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
