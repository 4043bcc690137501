"""``MemoryState``: one memory of an M+ / MemoryLLM model, as an object a model can hold many of (DESIGN.md §3).

A state is the short-term memory (slots, their generation K/V, ages, slot permutations), the long-term store (rows,
keys, ages, recall frequencies, the dropped-row cache, counters; M+ only) and the generator its drops are drawn from
(None: torch's default CPU generator, as the official code draws them). It carries its own readers-writer lock and
version, so states are used, changed and saved independently: many users, each with a memory of their own, served
by one model (``model.inject(ids, memory=state)``, ``model.generate(ids, memory=state)``).

Placement: a state is an ``nn.Module``. The model's default state (``model.memory``) follows ``model.to(...)``; any
other state moves with ``state.to(device)`` (or ``state.to(device, what="generation")``: only what generation reads),
and ``state.offload()`` brings it back to (pinned) host memory. Switching states is O(1): a call names its state.
"""

from __future__ import annotations

import copy
import json

import torch
from torch import Tensor, nn

from .._sync import MemoryLock
from .ltm import LongTermMemory
from .stm import ShortTermMemory

FORMAT = "mplus.memory/1"
GENERATION_STM = ("k", "v", "pos")  # what generation reads of the STM (with the LTM's keys, ages and host rows)


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
        tensors = [t for t in self.stm._buffers.values() if t is not None]
        if self.ltm is not None:
            ltm = self.ltm
            tensors += [*ltm.hidden, *ltm.keys, *ltm.age, *ltm.rf, ltm.cache_hidden, ltm.cache_keys, ltm.cache_age]
            if ltm.kv is not None:
                tensors += [t for pair in ltm.kv for t in pair] + list(ltm.cache_kv)
        for t in tensors:
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
        """The whole state in one safetensors file (the names of ``mplus.checkpoint.save_memory``, which
        :meth:`load` and ``load_memory`` both read), with its description as metadata."""
        from ..checkpoint import save_state

        save_state(self, path, metadata={"mplus.memory": json.dumps(self.describe())})

    @classmethod
    def load(cls, path: str, like: MemoryState | nn.Module | None = None) -> MemoryState:
        """A new state from a file of :meth:`save` (its metadata gives the shape) or of ``save_memory`` (give
        ``like``: a model or a state of the same shape). The file is checked whole before the state is returned."""
        from ..checkpoint import load_state, read_memory_file

        sd, metadata = read_memory_file(path, "MemoryState.load")
        if like is not None:
            template = like.memory if hasattr(like, "memory") and isinstance(like.memory, MemoryState) else like
            if not isinstance(template, MemoryState):
                raise TypeError(f"MemoryState.load: like must be a model or a MemoryState, got {type(like).__name__}")
            state = MemoryState.empty(template.describe())
        elif "mplus.memory" in metadata:
            state = MemoryState.empty(json.loads(metadata["mplus.memory"]))
        else:
            raise ValueError(
                f"MemoryState.load: {path} has no mplus.memory description (a save_memory file): pass like=model"
            )
        load_state(state, sd, f"MemoryState.load({path})")
        state.version = 0
        return state
