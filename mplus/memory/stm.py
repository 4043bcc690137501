"""The short-term memory (STM) as a slot pool (DESIGN.md §3, SPEC.md §4.3–4.7).

Per layer, N slots hold a hidden row (and optionally the generation adapter's K/V before RoPE) and an age; ``pos``
maps slot → logical position and ``order`` the reverse. The logical memory (row i = logical position i) is what the
official code stores; here an update only touches the K victims' slots (O(K·d) bytes) and renumbers positions
(O(N) ints), through ``mplus_kernels.memory_update_``.

The STM is an ``nn.Module`` whose tensors are (non-persistent) buffers, so it follows its model: ``model.to("cuda")``
moves every slot tensor; a dtype cast (``model.to(torch.bfloat16)``) casts the hidden rows and the K/V cache but
leaves the ages float64 and the positions int32.
"""

from __future__ import annotations

import dataclasses
from typing import Literal

import torch
from torch import Tensor

from mplus_kernels import draw_victims, memory_update_
from mplus_kernels._utils import check_tensor
from mplus_kernels.memory_update import logical_view, validate_memory_update

from .._placement import FixedDtypeBuffers

AgeMode = Literal["reference", "training"]


@dataclasses.dataclass
class STMUpdate:
    """One update, checked (:meth:`ShortTermMemory.plan_update`): what :meth:`ShortTermMemory.commit_update` writes."""

    victims: Tensor  # [L, K] logical positions to drop
    slots: list[Tensor]  # the slot buffers written: hidden, age[, k, v]
    fresh: list[Tensor]  # their new rows [L, K, ...]
    dropped: list[Tensor] | None  # where the dropped rows land (None: allocated by the kernel)
    age_step: Tensor | None  # training ages: every age advances by this first (1 + max new age); None: frozen ages
    backend: str | None


@dataclasses.dataclass
class DroppedRows:
    """What one update removed from the STM, per layer, in ascending logical order (for the long-term memory)."""

    hidden: Tensor  # [L, K, d]
    age: Tensor  # [L, K]
    victims: Tensor  # [L, K] logical positions (before the update), ascending
    k: Tensor | None = None  # [L, K, Hkv, D] (pre-RoPE), when the STM caches K/V
    v: Tensor | None = None


class ShortTermMemory(FixedDtypeBuffers):
    """STM of ``num_layers`` layers × ``n`` slots of width ``d``.

    Args:
        hidden: ``[L, N, d]`` initial rows in logical order (e.g. the checkpoint's ``memory``); stored as given
            (no copy when already contiguous).
        age: ``[L, N]`` initial ages (default zeros, float64 like the official ``memory_ages``).
        kv_shape: ``(Hkv, D)`` to keep a per-slot K/V cache (pre-RoPE) of ``kv_dtype``; None for no cache.
        age_mode: ``"reference"`` (official inference code: survivors' ages frozen) or ``"training"`` (all ages
            advance by ``1 + max(new ages)`` before the drop, SPEC.md §4.7).
    """

    def __init__(
        self,
        hidden: Tensor,
        age: Tensor | None = None,
        *,
        kv_shape: tuple[int, int] | None = None,
        kv_dtype: torch.dtype | None = None,
        age_mode: AgeMode = "reference",
    ) -> None:
        if check_tensor("ShortTermMemory", "hidden", hidden).dim() != 3:
            raise ValueError(f"ShortTermMemory: hidden must be [L, N, d], got {list(hidden.shape)}")
        if age_mode not in ("reference", "training"):
            raise ValueError(f"ShortTermMemory: age_mode={age_mode!r}, expected 'reference' or 'training'")
        super().__init__()
        num_layers, n, _ = hidden.shape
        device = hidden.device
        if age is None:
            age = torch.zeros(num_layers, n, dtype=torch.float64, device=device)
        if tuple(age.shape) != (num_layers, n):
            raise ValueError(f"ShortTermMemory: age must be [L={num_layers}, N={n}], got {list(age.shape)}")
        pos = torch.arange(n, dtype=torch.int32, device=device).repeat(num_layers, 1)
        k = v = None
        if kv_shape is not None:
            k = torch.zeros(num_layers, n, *kv_shape, dtype=kv_dtype or hidden.dtype, device=device)
            v = torch.zeros_like(k)
        # Registered buffers: state_dict(), .to() and to_empty() see the memory (the model's own state_dict leaves it
        # out: weights and memory are saved apart, see MPlusForCausalLM).
        for name, t in [("hidden", hidden.contiguous()), ("age", age.to(device).contiguous()), ("pos", pos),
                        ("order", pos.clone()), ("k", k), ("v", v)]:  # fmt: skip
            self.register_buffer(name, t)
        self.age_mode = age_mode

    # moves and casts apply to every buffer, but ages stay float64 (a cast would round them); positions stay int32
    fixed_dtype_buffers = ("age",)

    @property
    def num_layers(self) -> int:
        return self.hidden.shape[0]

    @property
    def size(self) -> int:
        return self.hidden.shape[1]

    def logical(self, name: str = "hidden") -> Tensor:
        """A copy of ``hidden``/``age``/``k``/``v`` in logical order (row i = logical position i)."""
        t = getattr(self, name) if name in ("hidden", "age", "k", "v") else None
        if t is None:
            raise ValueError(f"ShortTermMemory has no {name!r} cache")
        return logical_view(t, self.order)

    def _rows_of(self, new_hidden: Tensor) -> int:
        """K, the rows per layer of ``new_hidden [L, K, d]`` (checked)."""
        num_layers, n, d = self.num_layers, self.size, self.hidden.shape[2]
        if (
            check_tensor("update", "new_hidden", new_hidden).dim() != 3
            or new_hidden.shape[0] != num_layers
            or new_hidden.shape[2] != d
        ):
            raise ValueError(f"update: new_hidden must be [L={num_layers}, K, d={d}], got {list(new_hidden.shape)}")
        if new_hidden.shape[1] > n:
            k = new_hidden.shape[1]
            raise ValueError(f"update: new_hidden brings K={k} rows, more than the N={n} slots per layer")
        return new_hidden.shape[1]

    def plan_update(
        self,
        new_hidden: Tensor,
        *,
        victims: Tensor,
        new_age: Tensor | None = None,
        new_k: Tensor | None = None,
        new_v: Tensor | None = None,
        dropped: dict[str, Tensor] | None = None,
        backend: str | None = None,
    ) -> STMUpdate:
        """Check an update that drops the logical positions ``victims [L, K]`` and appends ``new_hidden [L, K, d]``
        (and ``new_k``/``new_v``, exactly when the STM caches K/V) as the K newest logical rows. ``new_age``
        defaults to ``K-1, …, 0`` (the official ages of a new chunk). ``dropped`` may hold caller-owned output
        buffers ``{"hidden", "age"[, "k", "v"]}`` of shape ``[L, K, ...]`` (e.g. ``LongTermMemory.cache_views(K)``),
        so the dropped rows land where they are kept, with no extra copy. Raises on any invalid argument; changes
        nothing."""
        num_layers, k = self.num_layers, self._rows_of(new_hidden)
        if (new_k is None) != (self.k is None) or (new_v is None) != (self.v is None):
            raise ValueError("update: new_k/new_v must be given exactly when the STM keeps a K/V cache")
        if new_age is None:
            new_age = torch.arange(k - 1, -1, -1, dtype=self.age.dtype, device=self.age.device)
        new_age = new_age.to(self.age.device, self.age.dtype)
        if new_age.dim() == 1:
            new_age = new_age.expand(num_layers, k)
        slots, fresh = [self.hidden, self.age], [new_hidden, new_age]
        if self.k is not None:
            slots += [self.k, self.v]
            fresh += [new_k, new_v]
        outs = None
        if dropped is not None:
            outs = [dropped["hidden"], dropped["age"]] + ([dropped["k"], dropped["v"]] if self.k is not None else [])
        validate_memory_update(self.pos, self.order, victims, slots, fresh, outs)  # every check, before any write
        age_step = 1 + new_age.max() if self.age_mode == "training" and k > 0 else None
        return STMUpdate(victims, slots, fresh, outs, age_step, backend)

    def dropped_rows(self, victims: Tensor) -> Tensor:
        """The rows ``[L, K, d]`` an update dropping ``victims [L, K]`` (logical positions) removes, in ascending
        logical order (a read: nothing changes)."""
        v = victims.to(self.order.device).long().sort(dim=1).values
        index = self.order.gather(1, v).long()[..., None].expand(-1, -1, self.hidden.shape[2])
        return self.hidden.gather(1, index)

    def commit_update(self, plan: STMUpdate) -> DroppedRows:
        """Write a planned update (writes only: every check was :meth:`plan_update`'s). Returns the dropped rows."""
        if plan.age_step is not None:
            self.age += plan.age_step
        out = memory_update_(
            self.pos, self.order, plan.victims, plan.slots, plan.fresh, dropped=plan.dropped, backend=plan.backend
        )
        v_sorted = plan.victims.to(torch.int64).sort(dim=1).values
        return DroppedRows(out[0], out[1], v_sorted, *(out[2:4] if self.k is not None else ()))

    def update(
        self,
        new_hidden: Tensor,
        *,
        new_age: Tensor | None = None,
        new_k: Tensor | None = None,
        new_v: Tensor | None = None,
        victims: Tensor | None = None,
        generator: torch.Generator | None = None,
        dropped: dict[str, Tensor] | None = None,
        backend: str | None = None,
    ) -> DroppedRows:
        """Drop K rows per layer and append ``new_hidden [L, K, d]``: :meth:`plan_update` then
        :meth:`commit_update`. ``victims [L, K]`` gives the logical positions to drop; when None they are drawn as
        the official code does (``draw_victims``: per layer ``torch.randperm(N)`` on ``generator``, default torch's
        global CPU generator). The state is unchanged when an argument is invalid. (A model's memory changes through
        its :class:`~mplus.memory.state.MemoryState`, which also records the dropped rows in the long-term memory.)
        """
        k = self._rows_of(new_hidden)
        if victims is None:
            victims = draw_victims(self.num_layers, self.size, k, generator)
        plan = self.plan_update(
            new_hidden, victims=victims, new_age=new_age, new_k=new_k, new_v=new_v, dropped=dropped, backend=backend
        )
        return self.commit_update(plan)
