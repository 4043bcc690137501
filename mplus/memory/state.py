"""``MemoryState``: one memory of an M+ / MemoryLLM model, as an object a model can hold many of (DESIGN.md §3).

A state is the short-term memory (slots, their generation K/V, ages, slot permutations), the long-term store (rows,
keys, ages, recall frequencies, the dropped-row cache, counters; M+ only) and the generator its drops are drawn from
(None: torch's default CPU generator, as the official code draws them). It carries its own readers-writer lock and
version, so states are used, changed and saved independently: many users, each with a memory of their own, served
by one model (``model.inject(ids, memory=state)``, ``model.generate(ids, memory=state)``).

Placement: a state is an ``nn.Module``. The model's default state (``model.memory``) follows ``model.to(...)``; any
other state moves with ``state.to(device)`` (or ``state.to(device, what="generation")``: only what generation reads),
and ``state.offload()`` brings it back to (pinned) host memory. Switching states is O(1): a call names its state.

**Every change goes through the state, in two phases** (docs/architecture.md, "The update transaction"):
``plan = state.plan_update(...)`` (or ``state.plan_load(...)``) does every check, allocation and random draw and
touches nothing; ``state.commit(plan)`` does only writes that cannot fail. Both run inside ``with state.mutate():``,
which holds the write lock and advances ``version`` once when the block committed something. So a bad argument, a
budget, a full cache or a failed allocation leaves the memory, its generator and its version exactly as they were.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
from collections.abc import Callable, Iterator

import torch
from torch import Tensor, nn

from mplus_kernels import draw_victims

from .._sync import MemoryLock
from . import serialization
from .ltm import LongTermMemory, PushPlan, StoreContents
from .stm import DroppedRows, ShortTermMemory, STMUpdate

FORMAT = "mplus.memory/1"
GENERATION_STM = ("k", "v", "pos")  # what generation reads of the STM (with the LTM's keys, ages and host rows)


@dataclasses.dataclass
class UpdatePlan:
    """One checked update of a state (:meth:`MemoryState.plan_update`): what :meth:`MemoryState.commit` writes."""

    state: MemoryState
    version: int  # the state's version when planned: a plan commits on that version only
    stm: STMUpdate
    keys: Tensor | None  # [L, K, ds] retriever keys of the dropped rows (M+)
    push: PushPlan | None  # the dropped rows' record in the long-term memory (M+)
    in_place: bool  # the dropped rows land straight in the long-term cache (the STM is on the host)
    rng: Tensor | None  # the generator's state after the victims were drawn (None: victims were given)


@dataclasses.dataclass
class LoadPlan:
    """A checked replacement of a whole state (:meth:`MemoryState.plan_load`)."""

    state: MemoryState
    version: int
    stm: dict[str, Tensor]  # the short-term buffers' new values, by buffer name
    ltm: StoreContents | None
    grown: dict  # the long-term buffers grown for it (allocated, not installed)
    rng: Tensor | None  # the generator's new state (None: unchanged)


class MemoryState(nn.Module):
    """A short-term memory, an optional long-term store, and the generator their drops come from.

    Attributes:
        stm: :class:`ShortTermMemory`. ltm: :class:`LongTermMemory` or None (MemoryLLM).
        generator: a ``torch.Generator`` (CPU) for the drop choices, or None for torch's default CPU generator.
        version: advanced by every change (inject, load); a generation cache records it.
        lock: :class:`mplus._sync.MemoryLock` (readers: generation, save; writers: inject, load).
    """

    def __init__(
        self, stm: ShortTermMemory, ltm: LongTermMemory | None = None, *, generator: torch.Generator | None = None
    ) -> None:
        super().__init__()
        if not isinstance(stm, ShortTermMemory):
            raise TypeError(f"MemoryState: stm must be a ShortTermMemory, got {type(stm).__name__}")
        if ltm is not None and not isinstance(ltm, LongTermMemory):
            raise TypeError(f"MemoryState: ltm must be a LongTermMemory or None, got {type(ltm).__name__}")
        if generator is not None and not isinstance(generator, torch.Generator):
            raise TypeError(f"MemoryState: generator must be a torch.Generator or None, got {type(generator)}")
        self.stm = stm
        self.ltm = ltm
        self.generator = generator
        self.version = 0
        self.lock = MemoryLock()
        self._dirty = False  # a commit since the innermost mutate() began: its exit advances the version

    # ------------------------------------------------------------------------------------------- transactions
    @contextlib.contextmanager
    def mutate(self, *, advance: bool = True) -> Iterator[MemoryState]:
        """The write lock, for one change: the version advances once at the end when a commit happened inside (also
        when the block then raised: what was committed stays committed, and caches built before are stale).
        ``advance=False`` only for a state being built (``from_pretrained``): no cache can have read it yet."""
        with self.lock.write():
            try:
                yield self
            finally:
                if self._dirty:
                    self._dirty = False
                    self.version += int(advance)

    def plan_update(
        self,
        delta: Tensor,
        new_k: Tensor | None,
        new_v: Tensor | None,
        *,
        victims: Tensor | None = None,
        keys_of: Callable[[Tensor], Tensor] | None = None,
        backend: str | None = None,
    ) -> UpdatePlan:
        """Plan writing the delta rows ``delta [L, K, d]`` (with their generation K/V ``new_k``/``new_v [L, K, Hkv,
        D]``) as the K newest short-term rows, dropping ``victims [L, K]`` (logical positions; default: drawn from
        the state's generator as the official code draws them). ``keys_of(rows [L, K, d]) -> [L, K, ds]``: the
        retriever keys of the rows about to be dropped (M+: they join the long-term memory's cache).

        Every check (the victims, room in the long-term cache, the budget of the merge the update triggers), every
        allocation (the grown store, the dropped rows' buffers) and the draw happen here; nothing changes (the
        generator is put back: :meth:`commit` advances it)."""
        stm, ltm, rows = self.stm, self.ltm, delta.shape[1] if delta.dim() == 3 else 0
        rng = None
        if victims is None:
            before = self.rng_state()
            try:
                victims = draw_victims(stm.num_layers, stm.size, rows, self.generator)
                rng = self.rng_state()
            finally:
                self.set_rng_state(before)
        in_place = ltm is not None and stm.hidden.device.type == "cpu"
        push = ltm.plan_push(rows) if ltm is not None else None
        if in_place:  # on the host the dropped rows land straight in the long-term cache (zero copy)
            dropped = ltm.cache_views(rows)
        else:  # from a device they come out in device memory; the commit copies them to the (pinned) host cache
            slots = [("hidden", stm.hidden), ("age", stm.age), ("k", stm.k), ("v", stm.v)]
            dropped = {name: torch.empty_like(t[:, :rows]) for name, t in slots if t is not None}
        plan = stm.plan_update(delta, victims=victims, new_k=new_k, new_v=new_v, dropped=dropped, backend=backend)
        keys = None
        if ltm is not None:
            if keys_of is None:
                raise ValueError("plan_update: keys_of is needed: the dropped rows join the long-term memory")
            keys = keys_of(stm.dropped_rows(victims))
        return UpdatePlan(self, self.version, plan, keys, push, in_place, rng)

    def plan_load(
        self, stm: dict[str, Tensor], ltm: StoreContents | None, rng: Tensor | None, where: str
    ) -> LoadPlan:
        """Plan replacing the state: ``stm`` short-term buffers by name (checked by the caller:
        :func:`mplus.memory.serialization.check_stm_tensors`; those not given are kept), ``ltm`` the long-term
        contents (checked: :func:`~mplus.memory.serialization.ltm_contents`; None: the store is kept), ``rng`` the
        generator's state (None: kept). The room the
        store needs is allocated here (``LTMBudgetError`` names ``where``); nothing changes."""
        if ltm is not None and self.ltm is None:
            raise ValueError(f"{where}: long-term contents for a state without a long-term memory (MemoryLLM)")
        grown = self.ltm.plan_load(ltm, where) if ltm is not None else {}
        return LoadPlan(self, self.version, stm, ltm, grown, rng)

    def commit(self, plan: UpdatePlan | LoadPlan) -> DroppedRows | None:
        """Write a plan of this state, inside :meth:`mutate`, on the version it was planned on. Writes only: nothing
        can fail part-way. Returns an update's dropped rows."""
        if plan.state is not self or plan.version != self.version:
            made = "another state" if plan.state is not self else f"version {plan.version}"
            raise RuntimeError(
                f"MemoryState.commit: the plan was made for {made}, this state is at version {self.version}: plan again"
            )
        if not self.lock.held_for_writing():
            raise RuntimeError("MemoryState.commit: commit inside `with state.mutate():` (the write lock)")
        self._dirty = True
        if isinstance(plan, LoadPlan):
            if plan.ltm is not None:
                self.ltm.commit_load(plan.ltm, plan.grown)
            for name, t in plan.stm.items():
                getattr(self.stm, name).copy_(t)
            if plan.rng is not None:
                self.set_rng_state(plan.rng)
            return None
        dropped = self.stm.commit_update(plan.stm)
        ltm = self.ltm
        if ltm is not None:
            if plan.in_place:
                ltm.commit_push(plan.push, plan.keys, written=True)
            else:
                kv = (dropped.k, dropped.v) if ltm.kv_shape is not None else None
                ltm.commit_push(plan.push, plan.keys, hidden=dropped.hidden, age=dropped.age, kv=kv)
        if plan.rng is not None:
            self.set_rng_state(plan.rng)
        return dropped

    # ------------------------------------------------------------------------------------------------ the RNG
    def rng_state(self) -> Tensor:
        """The state of the generator the next drops come from (torch's default CPU generator when None)."""
        return torch.get_rng_state() if self.generator is None else self.generator.get_state()

    def set_rng_state(self, state: Tensor) -> None:
        if self.generator is None:
            torch.set_rng_state(state)
        else:
            self.generator.set_state(state)

    # ------------------------------------------------------------------------------------------------ placement
    @property
    def device(self) -> torch.device:
        """Where the short-term K/V lives (what generation needs on the compute device)."""
        return self.stm.k.device if self.stm.k is not None else self.stm.hidden.device

    def to(self, *args, what: str = "all", **kwargs) -> MemoryState:  # type: ignore[override]
        """``nn.Module.to``; ``what="generation"`` moves only what generation reads (the short-term K/V and
        positions; the long-term keys and ages) and leaves the rest on the host — inject then refuses the state
        until a plain ``to(device)``."""
        if what == "all":
            return super().to(*args, **kwargs)
        if what != "generation":
            raise ValueError(f"MemoryState.to: what={what!r}, expected 'all' or 'generation'")
        device = torch.empty(0).to(*args, **kwargs).device
        for name in GENERATION_STM:
            t = getattr(self.stm, name)
            if t is not None:
                self.stm._buffers[name] = t.to(device)
        if self.ltm is not None:
            self.ltm.place(device)
        return self

    def offload(self) -> MemoryState:
        """Everything to host memory, pinned when CUDA is available (so bringing it back is an async copy)."""
        if any(t is not None and t.device.type == "meta" for t in self.stm._buffers.values()):
            raise ValueError(
                "MemoryState.offload: the state is on the meta device, which holds no values to bring back"
            )
        pin = torch.cuda.is_available()
        for name, t in list(self.stm._buffers.items()):
            if t is not None:
                t = t.cpu()
                self.stm._buffers[name] = t.pin_memory() if pin and not t.is_pinned() else t
        if self.ltm is not None:
            self.ltm.place("cpu")
        return self

    def placed_for_generation_only(self) -> bool:
        """True when some short-term tensor inject needs is not where the K/V is (after ``to(what="generation")``)."""
        device = self.device
        return any(t is not None and t.device != device for t in self.stm._buffers.values())

    def nbytes(self) -> dict[str, int]:
        """Bytes held per placement: ``{"device": ..., "host": ...}`` (capacity buffers of the long-term store)."""
        out = {"device": 0, "host": 0}
        for t in self.buffers():
            out["host" if t.device.type == "cpu" else "device"] += t.numel() * t.element_size()
        return out

    # ------------------------------------------------------------------------------------------------ copies
    def clone(self) -> MemoryState:
        """An independent copy (tensors, counters, the generator's state), with its own lock, at version 0."""
        twin = copy.deepcopy(self)
        twin.version = 0
        return twin

    def __deepcopy__(self, memo: dict) -> MemoryState:
        generator = None
        if self.generator is not None:
            generator = torch.Generator(self.generator.device)
            generator.set_state(self.generator.get_state())
        twin = MemoryState(copy.deepcopy(self.stm, memo), copy.deepcopy(self.ltm, memo), generator=generator)
        twin.version = self.version
        return twin

    # ------------------------------------------------------------------------------------------------ files
    def describe(self) -> dict:
        """What a file needs to rebuild an empty state of this shape (written as safetensors metadata)."""
        stm = self.stm
        desc = {
            "format": FORMAT,
            "stm": {
                "shape": list(stm.hidden.shape),
                "dtype": str(stm.hidden.dtype).removeprefix("torch."),
                "kv_shape": list(stm.k.shape[2:]) if stm.k is not None else None,
                "kv_dtype": str(stm.k.dtype).removeprefix("torch.") if stm.k is not None else None,
                "age_mode": stm.age_mode,
            },
            "ltm": None,
            "own_generator": self.generator is not None,
        }
        if self.ltm is not None:
            ltm = self.ltm
            desc["ltm"] = {
                "num_layers": ltm.num_layers, "hidden_size": ltm.hidden_size, "key_dim": ltm.key_dim,
                "num_tokens": ltm.num_tokens, "update_ltm_frequency": ltm.update_ltm_frequency,
                "num_retrieved": ltm.num_retrieved, "decay_frequency": ltm.decay_frequency,
                "initial_rf": ltm.initial_rf, "dtype": str(ltm.dtype).removeprefix("torch."),
                "kv_shape": list(ltm.kv_shape) if ltm.kv_shape is not None else None,
                "kv_dtype": str(ltm.kv_dtype).removeprefix("torch."), "budget_bytes": ltm.budget_bytes,
            }  # fmt: skip
        return desc

    def mismatch(self, other: MemoryState) -> str | None:
        """What makes ``other`` a state of another shape than this one (None: the same; budgets may differ)."""
        own, theirs = self.describe(), other.describe()
        shape = lambda d: d and {k: v for k, v in d.items() if k != "budget_bytes"}  # noqa: E731
        for part in ("stm", "ltm"):
            if shape(own[part]) != shape(theirs[part]):
                return f"{part}: {theirs[part]}, this model: {own[part]}"
        return None

    def dtypes(self) -> tuple[torch.dtype, ...]:
        """The dtypes the state computes in: its short-term rows and K/V, its long-term rows and K/V."""
        out = [self.stm.hidden.dtype] + ([self.stm.k.dtype] if self.stm.k is not None else [])
        return tuple(out + ([self.ltm.dtype, self.ltm.kv_dtype] if self.ltm is not None else []))

    def check_usable(self, own: MemoryState, device: torch.device, what: str, *, inject: bool = False) -> None:
        """That this state can stand in for ``own`` (a model's default state, on ``device``) in a call named ``what``:
        the same dtypes and shape, on the device; with ``inject`` also writable (not placed for generation only)."""
        name = lambda dtypes: "/".join(dict.fromkeys(str(d) for d in dtypes))  # noqa: E731
        if own.dtypes() != self.dtypes():
            raise ValueError(
                f"{what}: memory holds {name(self.dtypes())} tensors, this model computes in {name(own.dtypes())} "
                f"(dtype): memory.to({name(own.dtypes())}) converts it (ages keep their float64)"
            )
        mismatch = own.mismatch(self)
        if mismatch:
            raise ValueError(f"{what}: memory is a state of another config ({mismatch})")
        if self.device != device:
            raise ValueError(
                f"{what}: memory's short-term K/V is on {self.device}, the model on {device}: memory.to(device) first"
            )
        if inject and self.placed_for_generation_only():
            raise ValueError(
                f"{what}: memory was placed for generation only (to(..., what='generation')): inject also reads and "
                "writes the short-term rows, ages and slot order; memory.to(device) first"
            )

    @classmethod
    def empty(cls, desc: dict) -> MemoryState:
        """An all-zero state of the shape :meth:`describe` gave (then filled by a load)."""
        if not isinstance(desc, dict) or desc.get("format") != FORMAT:
            raise ValueError(f"MemoryState: not an mplus memory description (format {FORMAT!r}): {desc!r:.200}")
        s = desc["stm"]
        dt = lambda name: getattr(torch, name)  # noqa: E731
        kv_shape = tuple(s["kv_shape"]) if s["kv_shape"] is not None else None
        stm = ShortTermMemory(
            torch.zeros(*s["shape"], dtype=dt(s["dtype"])),
            kv_shape=kv_shape,
            kv_dtype=dt(s["kv_dtype"]) if s["kv_dtype"] else None,
            age_mode=s["age_mode"],
        )
        ltm = None
        if desc["ltm"] is not None:
            c = dict(desc["ltm"])
            num_layers, hidden_size, key_dim = c.pop("num_layers"), c.pop("hidden_size"), c.pop("key_dim")
            c["dtype"], c["kv_dtype"] = dt(c["dtype"]), dt(c["kv_dtype"])
            c["kv_shape"] = tuple(c["kv_shape"]) if c["kv_shape"] is not None else None
            ltm = LongTermMemory(num_layers, hidden_size, key_dim, **c)
        return cls(stm, ltm, generator=torch.Generator() if desc.get("own_generator") else None)

    def save(self, path: str) -> None:
        """The whole state in one safetensors file (:mod:`mplus.memory.serialization`), with its description as
        metadata; :meth:`load` and ``mplus.checkpoint.load_memory`` read it."""
        serialization.save_file_of(self, path)

    @classmethod
    def load(cls, path: str, like: MemoryState | nn.Module | None = None) -> MemoryState:
        """A new state from a file of :meth:`save` (its metadata gives the shape) or of ``save_memory`` (give
        ``like``: a model or a state of the same shape). The file is checked whole before the state is returned."""
        sd, metadata = serialization.read_file(path, "MemoryState.load")
        if like is not None:
            template = like.memory if hasattr(like, "memory") and isinstance(like.memory, MemoryState) else like
            if not isinstance(template, MemoryState):
                raise TypeError(f"MemoryState.load: like must be a model or a MemoryState, got {type(like).__name__}")
            state = MemoryState.empty(template.describe())
        else:
            state = MemoryState.empty(serialization.description_of(metadata, path))
        serialization.load_tensors(state, sd, f"MemoryState.load({path})")
        state.version = 0
        return state
