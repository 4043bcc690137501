"""Training M+ under ``torch.distributed`` data parallelism (issue 21, first slice: DDP).

DDP averages the gradients of what runs through a module's ``forward``, and :func:`mplus.training.training_step` is a
function, so :class:`Step` makes the step a module::

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
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel

from .memory.state import MemoryState
from .model import MPlusForCausalLM

__all__ = ["Step", "memory_buffer_names", "rank_memory", "rank_seed", "unwrap_model"]

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


def _current_rank() -> int:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank()
    return 0


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


def unwrap_model(model: Any, what: str) -> tuple[MPlusForCausalLM, MemoryState | None, dict]:
    """``model`` as ``training_step`` takes it: an :class:`MPlusForCausalLM` (its own memory), or a :class:`Step`
    (its model, its memory and its default keyword arguments). A DDP-wrapped module is refused: its gradients are
    averaged only when the step runs through its ``forward``."""
    if isinstance(model, MPlusForCausalLM):
        return model, None, {}
    if isinstance(model, Step):
        return model.model, model.memory, model.defaults
    inner = getattr(model, "module", None)
    if isinstance(model, DistributedDataParallel) or isinstance(inner, nn.Module):
        raise TypeError(
            f"{what}: model is a {type(model).__name__} wrapping a {type(inner).__name__}; a wrapped model trains "
            "through its forward: wrap a training.Step(model) and call it, "
            "ddp = DistributedDataParallel(training.Step(model)); out = ddp(context, target)"
        )
    raise TypeError(f"{what}: model must be an MPlusForCausalLM or a training.Step, got {type(model).__name__}")


class Step(nn.Module):
    """:func:`mplus.training.training_step` as a module, the thing DDP wraps: ``Step(model)(context, target,
    **kw)`` is ``training_step(model, context, target, memory=memory, **defaults, **kw)`` and returns its
    :class:`~mplus.training.StepOutput` (DDP finds the tensors of a dataclass output).

    Args:
        model: the :class:`MPlusForCausalLM` (prepared: :func:`mplus.training.prepare`); a submodule, so DDP
            averages its trained parameters' gradients.
        memory: the state trained on (default: the model's own; under DDP, :func:`rank_memory`). Never broadcast:
            its buffers (and the model's default memory's) are in DDP's ignore list (module docstring).
        **defaults: keyword arguments of every step (``retriever_loss``, ``checkpointing``, ``autocast``, ...);
            a call's own keywords override them.
    """

    def __init__(self, model: MPlusForCausalLM, *, memory: MemoryState | None = None, **defaults: Any) -> None:
        super().__init__()
        if isinstance(model, Step):
            raise TypeError(
                f"Step: model is already a training.Step (of a {type(model.model).__name__}): wrap the model once"
            )
        if not isinstance(model, MPlusForCausalLM):
            inner = getattr(model, "module", None)
            got = type(model).__name__ + (f" wrapping a {type(inner).__name__}" if isinstance(inner, nn.Module) else "")
            raise TypeError(
                f"Step: model must be an MPlusForCausalLM, got {got}; wrap the Step instead: "
                "DistributedDataParallel(training.Step(model))"
            )
        for key in ("memory", "context", "target"):
            if key in defaults:
                raise TypeError(f"Step: {key} is not a step default")
        self.model = model
        # a plain attribute, not a submodule: DDP never sees a state given here (nn.Module.__setattr__ would register)
        object.__setattr__(self, "memory", model.resolve_memory(memory, "Step", inject=True))
        self.defaults = defaults
        DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(self, memory_buffer_names(self))

    def forward(self, context: Tensor | list[Tensor], target: Tensor, **step_kwargs: Any):
        from .training import training_step  # training imports this module

        if "memory" in step_kwargs:
            raise TypeError("Step.forward: memory is fixed by the Step (Step(model, memory=state))")
        return training_step(self.model, context, target, memory=self.memory, **{**self.defaults, **step_kwargs})
