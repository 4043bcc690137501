"""FSDP2 for M+ training: :func:`shard` (``fully_shard`` a :class:`~mplus.training.Step`) and :func:`materialize` (a
Step built on the meta device, sharded, then given its weights and memory per rank) — docs/training.md.

The step reads layer parameters outside the layers' ``forward`` (``memory_kv`` for the memory rows,
``input_layernorm`` and the retriever projectors for queries, keys and the commit), while FSDP2 unshards a unit's
parameters only in its forward (and in methods registered with ``register_fsdp_forward_method``). So the units are
chosen for what the step calls: the norm and projectors are units of their own inside each layer's unit, ``memory_kv``
is a registered forward method, and the Step is the root, whose forward holds the rest (embedding, final norm,
``lm_head``, BOS rows) whole; the model's own code is unchanged. ``Step.run`` is a registered forward method of the
root too: anything but the step (an inject, the memory load of :func:`materialize`) runs through it.

A big model is built without ever holding its whole weights in one process::

    with torch.device("meta"):                                   # shapes only, no memory
        model = MPlusForCausalLM(config, max_length=2048)
    training.prepare(model)
    step = training.Step(model, memory=training.rank_memory(model, seed=0))
    training.shard(step, mesh=init_device_mesh("cuda", (world,)))  # the device the model will live on
    training.materialize(step, "path/to/checkpoint", device="cuda")  # each rank its shards; the memory per rank
    opt = torch.optim.AdamW(training.param_groups(model, lr=...))

Every function here is a collective: every rank calls it, in the same order.
"""

from __future__ import annotations

import os
from typing import Any

import torch
from torch import Tensor, nn
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import FSDPModule, fully_shard, register_fsdp_forward_method
from torch.distributed.tensor import DTensor, distribute_tensor
from torch.nn.parallel import DistributedDataParallel

from .checkpoint import (
    check_official_state,
    commit_official_memory,
    official_weights,
    read_tensors,
    resolve_checkpoint,
)
from .distributed import _distributed, _is_step, _world_size, memory_buffer_names

__all__ = ["LAYER_UNITS", "materialize", "shard"]

LAYER_UNITS = ("input_layernorm", "self_attn.query_proj", "self_attn.key_proj", "self_attn.encoder_query_proj")


def shard(step: nn.Module, mesh: Any = None, **fsdp_kwargs: Any) -> nn.Module:
    """Shard a :class:`Step`'s model over ``mesh`` with FSDP2 (``torch.distributed.fsdp.fully_shard``), in place;
    returns the step, which trains as an unsharded one does: ``out = step(context, target); out.loss.backward()``
    (the gradients, sharded ``DTensor`` s, are the mean over the ranks: ``p.grad.full_tensor()``).

    The units, innermost first: in every decoder layer its ``input_layernorm`` and retriever projectors
    (:data:`LAYER_UNITS`: the step calls them outside the layer's ``forward``), then the layer itself, with
    :meth:`~mplus.llama.DecoderLayer.memory_kv` registered as a forward method
    (``register_fsdp_forward_method``: it reads k/v projections outside ``forward``); then the Step, the root, which
    holds the rest (embedding, final norm, ``lm_head``, BOS rows) unsharded for the whole step, with what ``Step.run``
    calls registered as a forward method. FSDP2 unshards a unit's parameters only in its forward (and the registered
    methods), so every parameter the step reads is whole when read. Frozen and trained parameters are sharded alike.

    The memory is not sharded, broadcast or touched: ``fully_shard`` shards parameters only, and buffers (every
    :class:`MemoryState`'s, the RoPE tables) stay the tensors they were, per rank. Call it after
    ``torch.distributed.init_process_group`` and :func:`mplus.training.prepare`, before building the optimiser
    (its parameters become the sharded ones). ``mesh``: a 1-D ``DeviceMesh`` (default: every rank, on the model's
    device type; a model on the meta device needs it given, on the device it will be materialised on);
    ``fsdp_kwargs`` go to each ``fully_shard`` call (``reshard_after_forward``, ``mp_policy``...).
    A bare :class:`MPlusForCausalLM`, a Step already sharded and a DDP-wrapped Step are refused: the root must be the
    module whose ``forward`` runs the step. FSDP2 warns that ``memory_kv`` returns a view (``k[0]``): harmless, as
    nothing writes it in place.
    """
    if isinstance(step, FSDPModule):
        raise ValueError("shard: this Step is already sharded (shard it once, before building the optimiser)")
    if not _is_step(step):
        inner = getattr(step, "module", None)
        got = type(step).__name__ + (f" wrapping a {type(inner).__name__}" if isinstance(inner, nn.Module) else "")
        raise TypeError(
            f"shard: expected a training.Step, got {got}; the root unit must run the step in its "
            "forward: step = training.shard(training.Step(model, memory=...)) (DDP or FSDP2, not both)"
        )
    if not _distributed():
        raise RuntimeError("shard: torch.distributed is not initialised (call init_process_group first)")
    if mesh is None:
        kind = step.model.compute_device.type
        if kind == "meta":
            raise ValueError(
                "shard: the model is on the meta device, so mesh cannot follow it: pass the device mesh of the device "
                "it will be materialised on, mesh=init_device_mesh('cuda' or 'cpu', (world_size,))"
            )
        mesh = init_device_mesh(kind, (_world_size(),))
    for layer in step.model.layers:
        for name in LAYER_UNITS:
            unit = layer.get_submodule(name) if _has_submodule(layer, name) else None
            if unit is not None:
                fully_shard(unit, mesh=mesh, **fsdp_kwargs)
        fully_shard(layer, mesh=mesh, **fsdp_kwargs)
        register_fsdp_forward_method(layer, "memory_kv")
    fully_shard(step, mesh=mesh, **fsdp_kwargs)
    register_fsdp_forward_method(step, "_run")  # Step.run calls it
    # every parameter is FSDP2's now: DDP must leave them all alone, so DDP of a sharded Step has nothing to
    # synchronise and refuses it ("DistributedDataParallel is not needed when a module doesn't have any parameter
    # that requires a gradient") instead of all-reducing shards
    ignored = memory_buffer_names(step) + [name for name, _ in step.named_parameters()]
    DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(step, ignored)
    return step


def _has_submodule(module: nn.Module, name: str) -> bool:
    try:
        module.get_submodule(name)
    except AttributeError:
        return False
    return True


def materialize(
    step: nn.Module, tensors: dict[str, Tensor] | str | os.PathLike, *, device: torch.device | str
) -> nn.Module:
    """Give a :class:`Step` built on the meta device (sharded by :func:`shard` or not) its tensors on ``device``, in
    place; returns the step. A collective when the step is sharded (every rank calls it).

    ``tensors``: the weights and the memory in the official layout (what ``from_pretrained`` reads: a checkpoint
    directory or Hub id, or the dict of its tensors, e.g. :func:`mplus.checkpoint.read_tensors`), checked whole
    against the model (:func:`~mplus.checkpoint.check_official_state`) before anything is allocated. Then:

    * the model and the Step's memory are allocated on ``device`` (``to_empty``; the RoPE tables computed anew);
    * every weight is loaded, cast to the model's dtype: a sharded parameter takes this rank's shard of the whole
      tensor (``distribute_tensor`` with no communication: each rank slices its own copy), an unsharded one the whole;
    * the memory is loaded into the model's default memory and into the Step's (if another: e.g. :func:`rank_memory`
      's), as ``from_pretrained`` loads it (its rows' K/V computed under the weights just loaded, through
      ``Step.run`` on a sharded model), each state keeping its own drop generator and training ages.

    The result is what building the model eagerly gives — ``from_pretrained``, ``prepare``, ``rank_memory``, ``Step``
    and :func:`shard` — bit for bit (tests/test_distributed_meta.py). A model not on the meta device is refused
    (it holds weights already), as is a ``device`` that is meta.
    """
    fn = "materialize"
    if not _is_step(step):
        raise TypeError(f"{fn}: expected a training.Step built on the meta device, got {type(step).__name__}")
    model = step.model
    if model.compute_device.type != "meta":
        raise ValueError(
            f"{fn}: the model is on {model.compute_device}, not the meta device: it holds its weights already "
            "(build it under `with torch.device('meta'):`)"
        )
    device = torch.device(device)
    if device.type == "meta":
        raise ValueError(f"{fn}: device={device}: give the device the model is to live on (cpu, cuda:N)")
    source = f"{fn}: the tensors given"
    if isinstance(tensors, (str, os.PathLike)):
        source = f"{fn}: {os.fspath(tensors)}"
        tensors = read_tensors(resolve_checkpoint(tensors))
    elif not isinstance(tensors, dict):
        raise TypeError(
            f"{fn}: tensors must be a checkpoint directory, a Hub id or a dict of tensors, got {type(tensors).__name__}"
        )
    check_official_state(model, tensors, source)
    states = [model.memory] + ([step.memory] if step.memory is not model.memory else [])
    model.to_empty(device=device)
    if step.memory is not model.memory:
        step.memory.to_empty(device=device)
    own = model.state_dict()
    weights = {name: _like(t, own[name]) for name, t in official_weights(model, tensors).items()}
    model.load_state_dict(weights, strict=True)
    for state in states:
        step.run(commit_official_memory, model, state, tensors, source)
    return step


def _like(full: Tensor, param: Tensor) -> Tensor:
    """``full`` as ``param`` holds it: this rank's shard when ``param`` is a ``DTensor`` (sliced locally, as FSDP2
    shards: ``src_data_rank=None`` skips the scatter, every rank having the whole tensor), else ``full`` itself."""
    if isinstance(param, DTensor):
        return distribute_tensor(full, param.device_mesh, param.placements, src_data_rank=None)
    return full
