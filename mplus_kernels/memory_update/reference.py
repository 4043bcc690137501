"""Pure-PyTorch references of the random-drop memory update (SPEC.md §4.3, DESIGN.md §2.2).

Two functions, both written to be read:

* :func:`official_memory_update_` is the official implementation's pattern on a *logical* memory (row i = logical
  position i): per layer, ``dropped = memory[l][drop]`` and ``memory[l] = cat(memory[l][keep], new[l])``. It is what
  benchmarks compare against, and what the golden state files were produced with.
* :func:`memory_update_reference_` has the fused op's signature (slot pool + ``pos``/``order``) and is defined by
  the official semantics: it reads the logical view, applies :func:`official_memory_update_`, and writes the result
  back in identity layout (slot i = logical position i). Any slot layout with the same logical view is correct.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .._utils import check_int


def draw_victims(num_layers: int, n: int, k: int, generator: torch.Generator | None = None) -> Tensor:
    """Drop choices of one update, exactly as the official code draws them (SPEC.md §4.3).

    Per layer, in layer order: ``perm = torch.randperm(n, generator=generator)``; the victims are
    ``sort(perm[n - k:])`` (the survivors, ``sort(perm[:n - k])``, are the complement). With ``generator=None``
    this consumes torch's default CPU generator the way ``MPlus.drop_memory`` does, so seeding it with
    ``torch.manual_seed`` reproduces an official run; pass a ``torch.Generator`` for an independent seeded stream.

    Returns: ``[num_layers, k]`` int64 logical positions, ascending per layer (CPU).
    """
    num_layers = check_int("draw_victims", "num_layers", num_layers, minimum=0)
    n, k = check_int("draw_victims", "n", n, minimum=0), check_int("draw_victims", "k", k)
    if not 0 <= k <= n:
        raise ValueError(f"draw_victims: k={k} must be in [0, n={n}]")
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(f"draw_victims: generator must be a torch.Generator or None, got {type(generator).__name__}")
    out = torch.empty(num_layers, k, dtype=torch.int64)
    for layer in range(num_layers):
        perm = torch.randperm(n, generator=generator)
        out[layer] = perm[n - k :].sort().values
    return out


def official_memory_update_(
    memory: list[Tensor] | Tensor, victims: Tensor, new_rows: list[Tensor] | Tensor
) -> list[Tensor]:
    """The official cat-based update, in place on logical tensors.

    Args:
        memory: tensors ``[L, N, *F]`` in logical order (row i = logical position i), e.g. hidden rows and ages.
        victims: ``[L, K]`` logical positions to drop per layer, ascending.
        new_rows: ``[L, K, *F]`` per tensor of ``memory``, appended after the survivors.

    Returns:
        the dropped rows ``[L, K, *F]`` per tensor, in ascending logical order.
    """
    memory = [memory] if isinstance(memory, Tensor) else list(memory)
    new_rows = [new_rows] if isinstance(new_rows, Tensor) else list(new_rows)
    if not memory:  # nothing stored per slot: nothing to drop
        return []
    num_layers, n = memory[0].shape[:2]
    dropped = [torch.empty((num_layers, victims.shape[1], *t.shape[2:]), dtype=t.dtype) for t in memory]
    for layer in range(num_layers):
        drop = victims[layer].to(device="cpu", dtype=torch.int64)
        keep_mask = torch.ones(n, dtype=torch.bool)
        keep_mask[drop] = False
        keep = keep_mask.nonzero().squeeze(1)  # ascending: survivors keep their relative order
        for t, fresh, out in zip(memory, new_rows, dropped):
            out[layer] = t[layer][drop.to(t.device)].cpu()
            t[layer] = torch.cat([t[layer][keep.to(t.device)], fresh[layer]])
    return [d.to(memory[0].device) for d in dropped]


def memory_update_reference_(
    pos: Tensor,
    order: Tensor,
    victims: Tensor,
    slots: list[Tensor],
    new_rows: list[Tensor],
    dropped: list[Tensor],
) -> None:
    """Reference of ``torch.ops.mplus.memory_update_`` (same arguments, same contract; see ``op.py``).

    Reads the logical view of every slot tensor through ``order``, applies the official update to it, and stores the
    result back in identity layout (``pos = order = arange(N)``).
    """
    n = pos.shape[1]
    logical = [logical_view(t, order) for t in slots]
    out = official_memory_update_(logical, victims, new_rows)
    for t, view, d, o in zip(slots, logical, dropped, out):
        t.copy_(view)
        d.copy_(o)
    identity = torch.arange(n, dtype=pos.dtype, device=pos.device).expand_as(pos)
    pos.copy_(identity)
    order.copy_(identity)


def logical_view(slot_tensor: Tensor, order: Tensor) -> Tensor:
    """Rows of ``slot_tensor [L, N, *F]`` in logical order: ``out[l, p] = slot_tensor[l, order[l, p]]``."""
    index = order.long().reshape(*order.shape, *([1] * (slot_tensor.dim() - 2))).expand_as(slot_tensor)
    return slot_tensor.gather(1, index)
