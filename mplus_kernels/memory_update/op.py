"""``torch.ops.mplus.memory_update_``: contract, validation, backend dispatch and fake kernel.

Short-term memory is a pool of N slots per layer (DESIGN.md §3): per-slot tensors ``[L, N, *F]`` (hidden rows,
cached K/V, ages, ...), and ``pos``/``order`` ``[L, N]`` int32 mapping slot → logical position and back. One update
drops K victims per layer and writes K new rows into their slots, so that the *logical* memory afterwards equals the
official ``cat(memory[keep], new)`` bit for bit, and returns the victims' old rows (for the long-term memory).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from .. import _backend
from .._utils import (
    check_integer,
    check_no_grad,
    check_same_device,
    check_tensor,
    dense_rows,
    host_values,
    register_no_backward,
    rows_disjoint,
)
from .._utils import shape_str as _shape
from .reference import memory_update_reference_

OP = "mplus::memory_update_"


def _dense_rows(t: Tensor) -> bool:  # slot tensors [L, N, *F]: each (l, n) row is contiguous
    return dense_rows(t, 1)


def _check_tensor(name: str, t: object) -> Tensor:
    return check_tensor("memory_update_", name, t)


def validate_memory_update(
    pos: Tensor,
    order: Tensor,
    victims: Tensor,
    slots: Sequence[Tensor],
    new_rows: Sequence[Tensor],
    dropped: Sequence[Tensor] | None,
) -> tuple[Tensor, list[Tensor]]:
    """Check everything before anything is written; return victims (sorted, int64, on device) and new rows."""
    pos = _check_tensor("pos", pos)
    order = _check_tensor("order", order)
    victims = _check_tensor("victims", victims)
    if pos.dim() != 2 or pos.dtype != torch.int32:
        raise ValueError(f"memory_update_: pos must be an int32 [L, N] tensor, got {pos.dtype} {_shape(pos)}")
    if order.shape != pos.shape or order.dtype != torch.int32:
        raise ValueError(
            f"memory_update_: order must be int32 shaped like pos {_shape(pos)}, got {order.dtype} {_shape(order)}"
        )
    if not (pos.is_contiguous() and order.is_contiguous()):
        raise ValueError("memory_update_: pos and order must be contiguous (they are updated in place)")
    device = pos.device
    if order.device != device:
        raise ValueError(f"memory_update_: order is on {order.device}, pos on {device}; they must share a device")
    num_layers, n = pos.shape
    if victims.dim() != 2 or victims.shape[0] != num_layers:
        raise ValueError(f"memory_update_: victims must be [L={num_layers}, K], got {_shape(victims)}")
    check_integer("memory_update_", "victims", victims)
    k = victims.shape[1]
    if k > n:
        raise ValueError(f"memory_update_: victims {_shape(victims)} asks to drop K={k} rows of only N={n} per layer")
    if victims.device not in (device, torch.device("cpu")):
        raise ValueError(f"memory_update_: victims are on {victims.device}; expected {device} or cpu")
    # Values are checked where they are (host victims, e.g. drawn by draw_victims), before the move to the device:
    # no device-to-host sync. Device victims are checked by the raw op (C++) or under MPLUS_DEBUG_CHECKS=1.
    v = victims.to(torch.int64).sort(dim=1).values
    if v.numel() and host_values(v):
        lo, hi = (int(x) for x in torch.aminmax(v))
        if lo < 0 or hi >= n:
            raise ValueError(f"memory_update_: victims must be logical positions in [0, {n}), got range [{lo}, {hi}]")
        dup = (v[:, 1:] == v[:, :-1]).any(dim=1)
        if bool(dup.any()):
            layer = int(dup.nonzero()[0])
            raise ValueError(f"memory_update_: victims of layer {layer} contain duplicates: {v[layer].tolist()}")
    v = v.to(device).contiguous()

    for name, seq in (("slots", slots), ("new_rows", new_rows), ("dropped", dropped)):
        if not isinstance(seq, (list, tuple)) and not (name == "dropped" and seq is None):
            raise TypeError(f"memory_update_: {name} must be a list of tensors, got {type(seq).__name__}")
    if len(new_rows) != len(slots):
        raise ValueError(f"memory_update_: {len(slots)} slot tensors but {len(new_rows)} new_rows tensors")
    if dropped is not None and len(dropped) != len(slots):
        raise ValueError(f"memory_update_: {len(slots)} slot tensors but {len(dropped)} dropped tensors")
    fresh_rows = []
    for i, slot in enumerate(slots):
        slot = _check_tensor(f"slots[{i}]", slot)
        if slot.dim() < 2 or slot.shape[:2] != (num_layers, n):
            raise ValueError(f"memory_update_: slots[{i}] must be [L={num_layers}, N={n}, ...], got {_shape(slot)}")
        if slot.device != device:
            raise ValueError(f"memory_update_: slots[{i}] is on {slot.device}, expected {device} (where pos is)")
        if not _dense_rows(slot):
            raise ValueError(f"memory_update_: slots[{i}] {_shape(slot)} must have contiguous rows (dims >= 2)")
        if not rows_disjoint(slot, 1):
            raise ValueError(
                f"memory_update_: slots[{i}] {_shape(slot)} with strides {list(slot.stride())} has overlapping rows "
                "(an expand()ed or stride-0 view?); every slot it writes needs its own memory"
            )
        expected = (num_layers, k, *slot.shape[2:])
        fresh = _check_tensor(f"new_rows[{i}]", new_rows[i])
        if tuple(fresh.shape) != expected:
            raise ValueError(f"memory_update_: new_rows[{i}] must be {list(expected)}, got {_shape(fresh)}")
        if fresh.dtype != slot.dtype:
            raise TypeError(f"memory_update_: new_rows[{i}] has dtype {fresh.dtype}, slots[{i}] has {slot.dtype}")
        if fresh.device != device:
            raise ValueError(f"memory_update_: new_rows[{i}] is on {fresh.device}, expected {device}")
        fresh_rows.append(fresh if _dense_rows(fresh) else fresh.contiguous())
        if dropped is not None:
            out = _check_tensor(f"dropped[{i}]", dropped[i])
            if tuple(out.shape) != expected or out.dtype != slot.dtype or out.device != device:
                raise ValueError(
                    f"memory_update_: dropped[{i}] must be {list(expected)} {slot.dtype} on {device}, "
                    f"got {_shape(out)} {out.dtype} on {out.device}"
                )
            if not _dense_rows(out):
                raise ValueError(f"memory_update_: dropped[{i}] {_shape(out)} must have contiguous rows (dims >= 2)")
            if not rows_disjoint(out, 1):
                raise ValueError(
                    f"memory_update_: dropped[{i}] {_shape(out)} with strides {list(out.stride())} has overlapping "
                    "rows (an expand()ed or stride-0 view?); every row it writes needs its own memory"
                )
    return v, fresh_rows


def check_permutations(pos: Tensor, order: Tensor) -> None:
    """``order[l]`` a permutation of ``[0, N)`` and ``pos[l]`` its inverse, or a ``ValueError`` (host tensors only: the
    raw C++ op checks the same itself; here for the backends that index with them unchecked)."""
    if pos.numel() == 0 or not host_values(pos):
        return
    n = pos.shape[1]
    o = order.long()
    bad = (o < 0) | (o >= n)
    if bool(bad.any()):
        layer, p = (int(x) for x in bad.nonzero()[0])
        raise ValueError(
            f"memory_update_: order {_shape(order)} has order[{layer}, {p}]={int(o[layer, p])}, expected slot ids "
            f"in [0, N={n})"
        )
    bad = pos.long().gather(1, o) != torch.arange(n, device=pos.device)
    if bool(bad.any()):
        layer, p = (int(x) for x in bad.nonzero()[0])
        raise ValueError(
            f"memory_update_: pos and order {_shape(pos)} must be inverse permutations per layer, but "
            f"order[{layer}, {p}]={int(o[layer, p])} while pos[{layer}, {int(o[layer, p])}]="
            f"{int(pos[layer, o[layer, p]])} (expected {p})"
        )


def memory_update_(
    pos: Tensor,
    order: Tensor,
    victims: Tensor,
    slots: Sequence[Tensor],
    new_rows: Sequence[Tensor],
    *,
    dropped: Sequence[Tensor] | None = None,
    backend: str | None = None,
) -> list[Tensor]:
    """Drop K victims per layer and write K new rows into their slots, in place.

    Args:
        pos: ``[L, N]`` int32, slot → logical position (updated in place).
        order: ``[L, N]`` int32, logical position → slot, the inverse of ``pos`` (updated in place).
        victims: ``[L, K]`` integer logical positions to drop per layer (distinct; any order; cpu or pos's device).
        slots: per-slot tensors ``[L, N, *F]`` (updated in place), each with contiguous rows.
        new_rows: ``[L, K, *F]`` per slot tensor, same dtype; row i becomes logical position ``N - K + i``.
        dropped: optional caller-owned outputs ``[L, K, *F]`` (e.g. a slice of the long-term cache buffer).
        backend: ``auto`` / ``cpp`` / ``triton`` / ``reference`` (default: ``MPLUS_BACKEND``, else auto).

    Returns:
        ``dropped``: the victims' rows ``[L, K, *F]`` per slot tensor, in ascending logical order (the official
        ``memory[l][sort(perm[N-K:])]``).

    Raises ``ValueError``/``TypeError`` before anything is written when an argument is malformed (including victims
    out of range or repeated within a layer, written tensors with overlapping rows, and, where their values are on
    the host, ``pos``/``order`` that are not inverse permutations), and ``BackendUnavailableError`` when the chosen
    backend cannot run.
    """
    v, fresh = validate_memory_update(pos, order, victims, slots, new_rows, dropped)
    check_no_grad("memory_update_", {"slots": slots, "new_rows": new_rows, "dropped": dropped})
    which = _backend.resolve("memory_update_", pos.device, backend)
    if which != "cpp":  # the C++ op checks pos/order itself (O(L·N), with the renumbering sweep)
        check_permutations(pos, order)
    k = v.shape[1]
    if dropped is None:
        dropped = [torch.empty((s.shape[0], k, *s.shape[2:]), dtype=s.dtype, device=s.device) for s in slots]
    slots, dropped = list(slots), list(dropped)
    # Meta tensors have no values: every backend there is the fake kernel (the reference would copy them to the host).
    if _backend.through_dispatcher(which, pos.device) or pos.device.type == "meta":
        torch.ops.mplus.memory_update_(pos, order, v, slots, fresh, dropped)
    elif which == "triton":
        _backend.import_triton_impl("memory_update").memory_update_fwd(pos, order, v, slots, fresh, dropped)
    else:
        memory_update_reference_(pos, order, v, slots, fresh, dropped)
    return dropped


def _register() -> None:
    """Fake kernel (for torch.compile / FakeTensor) and the CUDA → Triton kernel, when the schema exists."""
    if not _backend.cpp_available():
        return

    register_no_backward(OP, ("pos", "order", "victims", "slots", "new_rows", "dropped"))

    @torch.library.register_fake(OP)
    def _fake(pos, order, victims, slots, new_rows, dropped):  # mutates only; nothing to allocate
        named = {"order": order, "victims": victims}
        for key, seq in (("slots", slots), ("new_rows", new_rows), ("dropped", dropped)):
            named.update((f"{key}[{i}]", t) for i, t in enumerate(seq))
        check_same_device("memory_update_", "pos", pos.device, named)
        return None

    @torch.library.impl(OP, "CUDA")
    def _cuda(pos, order, victims, slots, new_rows, dropped):
        _backend.import_triton_impl("memory_update").memory_update_fwd(pos, order, victims, slots, new_rows, dropped)


_register()
