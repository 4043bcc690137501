"""Memory segments: what a layer's attention sees of the memory, and the one builder inference and training share.

A layer's memory is a few disjoint *segments* (DESIGN.md §3): the short-term rows (each with its slot's RoPE
position) and the prefix [BOS ; retrieved long-term rows]. :class:`~mplus.attention.FusedMemoryAttention` attends the
first segment together with the chunk and each other one alone, and merges the partial results exactly through
their LSE, so the segments are never concatenated. The types:

* :class:`MemoryKV` — one segment (keys before RoPE, values, positions, the RoPE tables; or keys already rotated,
  :meth:`MemoryKV.rotated`, what a generation's decode steps read);
* a list of B :class:`MemoryKV` of batch 1 — a per-row segment (each row its own memory: no stacking copy);
* :class:`PendingSegment` — a segment still being fetched (the long-term retrieval on the transfer engine's worker),
  resolved once, when the attention reaches it, after the segments before it;
* :class:`MemorySegments` — the ordered segments of one layer (immutable: attending never rewrites it).

:func:`layer_segments` builds a layer's [short-term ; prefix] segments from their K/V and positions: generation
(:func:`mplus.generation.prefill_segments`) and training (``mplus.training``) both call it.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator, Sequence
from typing import Any, Protocol

import torch
from torch import Tensor

from mplus_kernels import rotate_keys

__all__ = [
    "Memory",
    "MemoryKV",
    "MemorySegments",
    "PendingSegment",
    "Segment",
    "as_segments",
    "layer_segments",
    "prefix_segment",
    "rotated_segment",
    "shared_segment",
]


@dataclasses.dataclass
class MemoryKV:
    """One layer's memory segment as its attention sees it.

    Attributes:
        k: ``[B, M, Hkv, D]`` memory keys *before* RoPE (model dtype), or already rotated when ``positions`` is None;
            a memory shared by the batch may be ``x.expand(B, -1, -1, -1)`` (no copy).
        v: ``[B, M, Hkv, D]`` memory values.
        positions: ``[M]`` int32/int64, the RoPE position of each row (generation: BOS 0, long-term rows 1..K0,
            short-term rows K0+1..K0+N in logical order — DESIGN.md §3), indexing the tables below; None: ``k`` is
            rotated already (:meth:`rotated`).
        rope_cos, rope_sin: ``[P, D/2]`` fp32 (see :func:`mplus.attention.rope_tables`), ``P > max(positions)``;
            None with ``positions``.
    """

    k: Tensor
    v: Tensor
    positions: Tensor | None
    rope_cos: Tensor | None
    rope_sin: Tensor | None

    def rotated(self, backend: str | None = None) -> MemoryKV:
        """The segment with its keys rotated by their positions, once (``mplus_kernels.rotate_keys``: fp32
        arithmetic on the widened keys, as the kernels rotate, rounded to the keys' dtype, as a plain Llama's KV cache
        holds its keys), ``positions`` None. A shared expand (batch stride 0) is rotated once and expanded again, so
        the batch still shares one copy. What a generation's decode steps read
        (:func:`mplus.generation.settle_segments`): the kernels then skip the rotation and the RoPE-table reads at
        every step, for one rotated copy of the keys while the generation lives. ``backend``: the op's (the model's
        ``kernels="reference"`` passes ``"reference"``)."""
        if self.positions is None:
            return self
        k = self.k
        shared = k.shape[0] > 1 and k.stride(0) == 0
        out = rotate_keys(k[:1] if shared else k, self.positions, self.rope_cos, self.rope_sin, backend=backend)
        return MemoryKV(out.expand(k.shape) if shared else out, self.v, None, None, None)


Ready = MemoryKV | list[MemoryKV]  # a segment ready to attend


class _Waitable(Protocol):
    def wait(self) -> Any: ...


class PendingSegment:
    """A memory segment still being fetched: ``handle.wait()`` (a :class:`mplus.memory.transfer.Handle`, or anything
    with ``wait()``) gives the job's result, ``build(result)`` the segment (a :class:`MemoryKV` or a per-row list).

    :meth:`resolve` waits once and caches both: ``result`` (the raw job result, e.g. the retrieved row indices the
    model records) and the segment. The attention resolves it only after attending the segments before it, so the
    fetch overlaps that compute."""

    def __init__(self, handle: _Waitable, build: Callable[[Any], Ready]) -> None:
        self.handle, self.build = handle, build
        self.result: Any = None
        self._segment: Ready | None = None

    @property
    def done(self) -> bool:
        """Whether :meth:`resolve` has run."""
        return self._segment is not None

    def resolve(self) -> Ready:
        """The segment (waits for the fetch the first time; later calls return the same object)."""
        if self._segment is None:
            result = self.handle.wait()
            segment = _checked(self.build(result), "PendingSegment: build(result)")
            if isinstance(segment, PendingSegment):
                raise TypeError("PendingSegment: build(result) returned another PendingSegment, expected a MemoryKV")
            self.result, self._segment = result, segment
        return self._segment


Segment = MemoryKV | list[MemoryKV] | PendingSegment


def _checked(segment: Any, what: str) -> Segment:
    if isinstance(segment, (MemoryKV, PendingSegment)):
        return segment
    if isinstance(segment, (list, tuple)) and segment and all(isinstance(s, MemoryKV) for s in segment):
        return list(segment)
    got = type(segment).__name__
    if isinstance(segment, (list, tuple)):
        got = f"{got} of " + (", ".join(sorted({type(s).__name__ for s in segment})) or "nothing")
    raise TypeError(
        f"{what} must be a MemoryKV, a non-empty list of MemoryKV (one per batch row) or a PendingSegment, got {got}"
    )


@dataclasses.dataclass(frozen=True, eq=False)  # eq=False: comparing would compare tensors
class MemorySegments:
    """The ordered memory segments of one layer: ``parts[0]`` is attended together with the chunk, each later one
    alone, and the partial attentions are merged through their LSE. Index, slice and iterate it like a tuple."""

    parts: tuple[Segment, ...] = ()

    def __post_init__(self) -> None:
        parts = tuple(_checked(p, f"MemorySegments: part {i}") for i, p in enumerate(self.parts))
        object.__setattr__(self, "parts", parts)

    def __len__(self) -> int:
        return len(self.parts)

    def __getitem__(self, i: int | slice) -> Segment | tuple[Segment, ...]:
        return self.parts[i]

    def __iter__(self) -> Iterator[Segment]:
        return iter(self.parts)

    def resolved(self) -> MemorySegments:
        """The same segments with every pending one resolved (waits for any fetch still in flight)."""
        return MemorySegments(tuple(p.resolve() if isinstance(p, PendingSegment) else p for p in self.parts))


Memory = MemoryKV | MemorySegments | Sequence[Segment] | None  # what the attention's forward takes


def as_segments(memory: Memory) -> tuple[Segment, ...]:
    """The segments of ``memory`` as :meth:`mplus.attention.FusedMemoryAttention.forward` takes it: None (no memory),
    one :class:`MemoryKV`, a :class:`MemorySegments`, or a list of segments (:class:`MemoryKV`, per-row lists of
    them, :class:`PendingSegment`). Anything else is a ``TypeError`` naming ``memory``."""
    if memory is None:
        return ()
    if isinstance(memory, MemoryKV):
        return (memory,)
    if isinstance(memory, MemorySegments):
        return memory.parts
    if isinstance(memory, (list, tuple)):
        return tuple(_checked(p, f"FusedMemoryAttention: memory[{i}]") for i, p in enumerate(memory))
    raise TypeError(
        "FusedMemoryAttention: memory must be None, a MemoryKV, a MemorySegments or a list of segments (MemoryKV, "
        f"per-row lists of MemoryKV, PendingSegment), got {type(memory).__name__}"
    )


def shared_segment(
    k: Tensor, v: Tensor, positions: Tensor, rope_cos: Tensor, rope_sin: Tensor, batch: int = 1
) -> MemoryKV:
    """A segment of rows ``k/v [M, Hkv, D]`` at ``positions [M]`` shared by ``batch`` sequences (an expand: never a
    copy)."""
    k, v = k[None].expand(batch, *k.shape), v[None].expand(batch, *v.shape)
    return MemoryKV(k, v, positions, rope_cos, rope_sin)


def prefix_segment(
    bos_k: Tensor, bos_v: Tensor, rows: Sequence[tuple[Tensor, Tensor]], rope_cos: Tensor, rope_sin: Tensor
) -> MemoryKV:
    """The prefix segment of len(rows) sequences, each its own: row b attends [BOS ; ``rows[b]``] at positions
    ``0 .. R`` (BOS 0, its long-term rows 1..R in age order). ``bos_k/bos_v [1, Hkv, D]``, ``rows[b] = (k, v)`` each
    ``[R, Hkv, D]`` (the same R for every row) → ``k/v [len(rows), 1 + R, Hkv, D]``."""
    r = rows[0][0].shape[0]
    seg_k = bos_k.new_empty((len(rows), 1 + r, *bos_k.shape[1:]))  # one copy of each row (not a cat, then a stack)
    seg_v = bos_v.new_empty(seg_k.shape)
    seg_k[:, 0], seg_v[:, 0] = bos_k[0], bos_v[0]
    for b, (k, v) in enumerate(rows):
        if k.shape != (r, *seg_k.shape[2:]) or v.shape != k.shape:
            raise ValueError(f"prefix_segment: rows[{b}] has k {tuple(k.shape)}, v {tuple(v.shape)}; expected "
                             f"{(r, *seg_k.shape[2:])} like rows[0] (R rows of [Hkv, D] each)")  # fmt: skip
        seg_k[b, 1:], seg_v[b, 1:] = k, v
    positions = torch.arange(seg_k.shape[1], dtype=torch.int32, device=seg_k.device)
    return MemoryKV(seg_k, seg_v, positions, rope_cos, rope_sin)


def layer_segments(
    stm: tuple[Tensor, Tensor, Tensor] | list[tuple[Tensor, Tensor, Tensor]],
    prefix: tuple[Tensor, Tensor] | PendingSegment,
    rope_cos: Tensor,
    rope_sin: Tensor,
    batch: int = 1,
) -> MemorySegments:
    """A layer's memory: [short-term rows] attended with the chunk, then the prefix [BOS ; long-term rows].

    Args:
        stm: ``(k, v, positions)`` of the short-term rows, ``k/v [N, Hkv, D]`` (pre-RoPE) at ``positions [N]``
            (``1 + K0 + `` each row's logical position): a tuple is shared by the batch (an expand), a list holds one
            tuple per batch row (each row its own memory: a per-row segment of views).
        prefix: ``(k, v)`` ``[P, Hkv, D]`` of [BOS ; long-term rows] at positions ``0 .. P-1``, shared by the batch;
            or a :class:`PendingSegment` (each row's long-term rows being retrieved: see :func:`prefix_segment`).
        rope_cos, rope_sin: the model's RoPE tables ``[P_max, D/2]`` fp32.
        batch: B, the sequences sharing the shared parts.
    """
    if isinstance(stm, tuple):
        short = shared_segment(*stm, rope_cos, rope_sin, batch)
    else:
        short = [shared_segment(k, v, pos, rope_cos, rope_sin) for k, v, pos in stm]
    if isinstance(prefix, PendingSegment):
        return MemorySegments((short, prefix))
    k, v = prefix
    positions = torch.arange(k.shape[0], dtype=torch.int32, device=k.device)
    return MemorySegments((short, shared_segment(k, v, positions, rope_cos, rope_sin, batch)))


def rotated_segment(part: MemoryKV | list[MemoryKV], backend: str | None = None) -> MemoryKV | list[MemoryKV]:
    """A ready segment with its keys rotated (:meth:`MemoryKV.rotated`); the rows of a per-row list that are views
    of the same keys at the same positions tensor (one state serving several rows) share one rotated copy."""
    if isinstance(part, MemoryKV):
        return part.rotated(backend)
    done: dict[tuple, MemoryKV] = {}
    out = []
    for seg in part:
        key = (seg.k.data_ptr(), tuple(seg.k.shape), seg.k.stride(), id(seg.positions))
        if key not in done:
            done[key] = seg.rotated(backend)
        out.append(done[key])
    return out
