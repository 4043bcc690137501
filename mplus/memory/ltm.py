"""The long-term memory (LTM) of M+ and its dropped-row cache (SPEC.md §4.4, §4.6, §5.2; docs/architecture.md §3–4).

Rows dropped from the short-term memory wait in a cache; every ``update_ltm_frequency`` updates the cache is merged
into the LTM: new rows get recall frequency ``initial_rf``, every frequency decays and rows at zero are evicted
(:func:`~mplus.memory.eviction.decay_and_evict`, the one rule, which the training replay applies too). At each
update every LTM and cached age grows by ``num_tokens`` *before* the dropped rows join the cache (the official
order). Unlike the official ``torch.cat`` pattern every buffer is preallocated and written in place: per layer a
:class:`~mplus.memory.buffers.StoreLayer` of growable capacity buffers (1.5×, re-registered on growth), one cache
buffer the short-term update can write its dropped rows into directly (:meth:`LongTermMemory.cache_views`), and
eviction compacts in place. Every tensor is a registered buffer and the counters are extra state, so
``state_dict()``, ``.to()`` and ``to_empty()`` see exactly the store.

Placement: keys and ages (what scoring reads) live on the compute device (``key_device``); rows, their K/V and the
recall frequencies on the host, pinned next to a CUDA device so the GPU gathers retrieved rows zero-copy. Changes are
two-phase like the state's: :meth:`plan_push` / :meth:`plan_load` check and allocate with nothing changed,
:meth:`commit_push` / :meth:`commit_load` write.
"""

from __future__ import annotations

import dataclasses

import torch
from torch import Tensor, nn

from mplus_kernels._utils import check_tensor

from .buffers import StoreLayer, compact_, copy_async_, moved, nbytes_of, row_runs
from .eviction import decay_and_evict
from .retrieval import Retrieval, Retrieved  # noqa: F401 (Retrieved: re-exported)


class LTMBudgetError(MemoryError):
    """Growing the store would exceed its memory budget; nothing was allocated or changed."""


@dataclasses.dataclass
class StoreContents:
    """Everything a store holds, as plain tensors (used rows only): what a memory file or an official state maps to.

    Per layer ``l``: ``hidden[l] [S_l, d]``, ``keys[l] [S_l, ds]``, ``age[l] [S_l]``, ``rf[l] [S_l]``, and when the
    store keeps K/V ``k[l]``, ``v[l] [S_l, Hkv, D]``. The cache: ``cache_hidden [L, m, d]``, ``cache_keys [L, m,
    ds]``, ``cache_age [L, m]``, ``cache_k``/``cache_v [L, m, Hkv, D]``; ``update_step``: the official counter."""

    hidden: list[Tensor]
    keys: list[Tensor]
    age: list[Tensor]
    rf: list[Tensor]
    k: list[Tensor] | None
    v: list[Tensor] | None
    cache_hidden: Tensor
    cache_keys: Tensor
    cache_age: Tensor
    cache_k: Tensor | None
    cache_v: Tensor | None
    update_step: int


@dataclasses.dataclass
class PushPlan:
    """An update's dropped rows, checked and with room made (:meth:`LongTermMemory.plan_push`)."""

    rows: int  # rows dropped per layer
    merges: bool  # the update triggers a merge
    grown: dict[int, dict[str, Tensor]]  # layer -> its buffers at the capacity the merge needs (rows not copied yet)


class LongTermMemory(Retrieval, nn.Module):
    """Per-layer long-term memory plus the cache of rows dropped since the last merge.

    Args:
        num_layers, hidden_size, key_dim: L, d and the retriever key width ds.
        num_tokens: K, rows dropped (and ``update_step`` advance) per update.
        update_ltm_frequency: merge the cache every this many updates.
        num_retrieved: K0, rows retrieved per layer; also the eviction floor.
        decay_frequency, initial_rf: recall-frequency decay per merge and the value rows enter with.
        dtype: of hidden rows and keys. ``key_device``: where keys live (scoring runs there; default: the CPU).
        capacity: initial per-layer row capacity (grows by 1.5× when exceeded).
        budget_bytes: the store (all buffers) never grows past this; growth that would is an ``LTMBudgetError``.
        kv_shape, kv_dtype: ``(Hkv, D)`` to also keep pre-RoPE generation K/V per row.
    """

    def __init__(
        self,
        num_layers: int,
        hidden_size: int,
        key_dim: int,
        *,
        num_tokens: int,
        update_ltm_frequency: int,
        num_retrieved: int,
        decay_frequency: float = 1.0,
        initial_rf: float = 10.0,
        dtype: torch.dtype = torch.float32,
        key_device: torch.device | str | None = None,
        capacity: int = 0,
        budget_bytes: int | None = None,
        kv_shape: tuple[int, int] | None = None,
        kv_dtype: torch.dtype | None = None,
    ) -> None:
        for name, value in [
            ("num_layers", num_layers),
            ("hidden_size", hidden_size),
            ("key_dim", key_dim),
            ("num_tokens", num_tokens),
            ("update_ltm_frequency", update_ltm_frequency),
        ]:
            if value <= 0:
                raise ValueError(f"LongTermMemory: {name}={value} must be > 0")
        if num_retrieved < 0 or capacity < 0:
            raise ValueError(f"LongTermMemory: num_retrieved={num_retrieved}, capacity={capacity} must be >= 0")
        super().__init__()
        self.num_layers, self.hidden_size, self.key_dim = num_layers, hidden_size, key_dim
        self.num_tokens, self.update_ltm_frequency = num_tokens, update_ltm_frequency
        self.num_retrieved = num_retrieved
        self.decay_frequency, self.initial_rf = float(decay_frequency), float(initial_rf)
        # key_device None: the default device (the CPU; meta under torch.device("meta"))
        self.dtype = dtype
        self.key_device = torch.device(key_device) if key_device is not None else torch.empty(0).device
        self.budget_bytes = budget_bytes
        self.kv_shape, self.kv_dtype = kv_shape, (kv_dtype or dtype)
        self.update_step = 0
        self.cache_len = 0
        self.size = [0] * num_layers
        cache_rows = update_ltm_frequency * num_tokens
        self._check_budget(self._row_bytes() * (num_layers * (capacity + cache_rows)), "allocating the store")
        self.layers = nn.ModuleList(StoreLayer(self._new_rows((capacity,))) for _ in range(num_layers))
        for name, t in self._new_rows((num_layers, cache_rows)).items():
            if name != "rf":
                self.register_buffer(f"cache_{name}", t)

    def _new_rows(self, lead: tuple[int, ...]) -> dict[str, Tensor | None]:
        """Empty buffers for rows of shape ``lead`` (``(C,)`` per layer, ``(L, C)`` for the cache), each where it
        lives: keys and ages on the key device, the rest on the host (pinned next to a CUDA device)."""
        dev, pin, f64 = self.key_device, self.key_device.type == "cuda", torch.float64
        # built under torch.device("meta") (materialised later by to_empty), the host rows are meta too
        on = "meta" if torch.empty(0).device.type == "meta" else "cpu"
        host = lambda *shape, dtype: torch.empty(*lead, *shape, dtype=dtype, device=on, pin_memory=pin)  # noqa: E731
        out = {
            "hidden": host(self.hidden_size, dtype=self.dtype),
            "keys": torch.empty(*lead, self.key_dim, dtype=self.dtype, device=dev),
            "age": torch.empty(*lead, dtype=f64, device=dev),
            "rf": host(dtype=f64),
            "k": None,
            "v": None,
        }
        if self.kv_shape is not None:
            out["k"], out["v"] = host(*self.kv_shape, dtype=self.kv_dtype), host(*self.kv_shape, dtype=self.kv_dtype)
        return out

    # --------------------------------------------------------------------------------------------- views
    # Per-layer lists of the live buffers (read them, write into them; growth re-registers, so never keep one).
    def _per_layer(self, name: str) -> list[Tensor]:
        return [getattr(layer, name) for layer in self.layers]

    hidden = property(lambda self: self._per_layer("hidden"), doc="[C, d] host rows per layer")
    keys = property(lambda self: self._per_layer("keys"), doc="[C, ds] retriever keys per layer (key device)")
    age = property(lambda self: self._per_layer("age"), doc="[C] float64 ages per layer (key device)")
    rf = property(lambda self: self._per_layer("rf"), doc="[C] float64 recall frequencies per layer (host)")

    @property
    def kv(self) -> list[list[Tensor]] | None:
        return None if self.kv_shape is None else [[layer.k, layer.v] for layer in self.layers]

    @property
    def cache_kv(self) -> list[Tensor] | None:
        return None if self.kv_shape is None else [self.cache_k, self.cache_v]

    def get_extra_state(self) -> dict:
        """The counters (``state_dict`` holds the capacity buffers; these say which rows are used)."""
        return {"size": list(self.size), "cache_len": self.cache_len, "update_step": self.update_step}

    def set_extra_state(self, state: dict) -> None:
        size, cache_len, step = list(state["size"]), int(state["cache_len"]), int(state["update_step"])
        if len(size) != self.num_layers or not 0 <= cache_len <= self.cache_hidden.shape[1]:
            raise ValueError(f"LongTermMemory: extra state {state} does not fit this store")
        self.size, self.cache_len, self.update_step = [int(s) for s in size], cache_len, step

    # ------------------------------------------------------------------------------------------------ placement
    def _apply(self, fn, recurse: bool = True):
        """Follow the model: ``fn`` (what ``.to``/``.cuda``/``.half``/``to_empty`` apply) decides the compute device
        and the dtypes of rows and keys, probed on empty tensors; see the module docstring for what lives where."""
        probe, kv_probe = fn(torch.empty(0, dtype=self.dtype)), fn(torch.empty(0, dtype=self.kv_dtype))
        self.place(probe.device, dtype=probe.dtype, kv_dtype=kv_probe.dtype)
        return self

    def place(self, device: torch.device | str, *, dtype: torch.dtype | None = None, kv_dtype=None) -> None:
        """Move keys and ages to ``device`` and cast rows and keys to ``dtype`` (K/V to ``kv_dtype``); rows stay on
        the host, pinned when ``device`` is CUDA. Ages and recall frequencies stay float64."""
        device, dtype, kv_dtype = torch.device(device), dtype or self.dtype, kv_dtype or self.kv_dtype
        if device.type == "cuda" and device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
        pin, cpu, f64 = device.type == "cuda", torch.device("cpu"), torch.float64
        where = {"hidden": (cpu, dtype, pin), "keys": (device, dtype, False), "age": (device, f64, False),
                 "rf": (cpu, f64, pin), "k": (cpu, kv_dtype, pin), "v": (cpu, kv_dtype, pin)}  # fmt: skip
        for module, prefix in [*((layer, "") for layer in self.layers), (self, "cache_")]:
            for name, (dev, dt, pinned) in where.items():
                t = module._buffers.get(prefix + name)
                if t is not None:
                    module._buffers[prefix + name] = moved(t, dev, dt, pinned)
        self.key_device, self.dtype, self.kv_dtype = device, dtype, kv_dtype

    def _host_sync(self) -> None:
        """Wait for the device work that writes or reads the host rows (asynchronous copies, zero-copy gathers)."""
        if self.key_device.type == "cuda":
            torch.cuda.synchronize(self.key_device)

    # ---------------------------------------------------------------------------------------------------- sizes
    def _row_bytes(self) -> int:
        b = nbytes_of((self.hidden_size,), self.dtype) + nbytes_of((self.key_dim,), self.dtype) + 8  # + age
        if self.kv_shape is not None:
            b += 2 * nbytes_of(self.kv_shape, self.kv_dtype)
        return b

    def nbytes(self) -> int:
        """Bytes held by every buffer (capacity, not just used rows), recall frequencies included."""
        return sum(t.numel() * t.element_size() for t in self.buffers())

    def capacity(self, layer: int) -> int:
        return self.layers[layer].capacity

    def _check_budget(self, new_total: int, what: str) -> None:
        if self.budget_bytes is not None and new_total > self.budget_bytes:
            raise LTMBudgetError(
                f"LongTermMemory: {what} needs {new_total / 2**20:.1f} MiB, over the budget of "
                f"{self.budget_bytes / 2**20:.1f} MiB (budget_bytes={self.budget_bytes})"
            )

    def _target_capacity(self, layer: int, rows: int) -> int:
        """The capacity ``layer`` grows to for ``rows`` rows (amortised: 1.5× growth); its capacity if they fit."""
        cap = self.capacity(layer)
        return cap if rows <= cap else max(rows, int(cap * 1.5) + 1)

    def _growth_bytes(self, layer: int, new_cap: int) -> int:
        return max(0, new_cap - self.capacity(layer)) * (self._row_bytes() + 8)  # + recall frequency

    def _plan_growth(self, rows: list[int], what: str, amortised: bool = True) -> dict[int, dict[str, Tensor]]:
        """Budget-checked empty buffers for the layers that need more room for ``rows[l]`` rows (1.5x growth when
        ``amortised``, else exactly that many; nothing changes: :meth:`_install` puts them in place)."""
        target = self._target_capacity if amortised else lambda layer, r: max(r, self.capacity(layer))
        caps = [target(layer, r) for layer, r in enumerate(rows)]
        extra = sum(self._growth_bytes(layer, cap) for layer, cap in enumerate(caps))
        self._check_budget(self.nbytes() + extra, what)
        grown = {}
        for layer, cap in enumerate(caps):
            if cap > self.capacity(layer):
                grown[layer] = {
                    name: torch.empty((cap, *t.shape[1:]), dtype=t.dtype, device=t.device, pin_memory=t.is_pinned())
                    for name, t in self.layers[layer]._buffers.items()
                    if t is not None
                }
        return grown

    def _install(self, grown: dict[int, dict[str, Tensor]]) -> None:
        """Copy each grown layer's used rows into its new buffers and register them (cannot fail: all allocated)."""
        for layer, bufs in grown.items():
            n, module = self.size[layer], self.layers[layer]
            for name, new in bufs.items():
                new[:n].copy_(module._buffers[name][:n])
                module._buffers[name] = new

    def _reserve(self, layer: int, rows: int) -> None:
        """Make room for ``rows`` rows in ``layer``, checking the budget first (growth keeps every row)."""
        wanted = [self.size[i] if i != layer else rows for i in range(self.num_layers)]
        self._install(self._plan_growth(wanted, f"growing layer {layer} to {self._target_capacity(layer, rows)} rows"))

    def clear(self) -> None:
        """Forget every row and counter; capacity buffers are kept for reuse."""
        self.size = [0] * self.num_layers
        self.cache_len = 0
        self.update_step = 0

    # ------------------------------------------------------------------------------------------------- loading
    def append_rows_(
        self, layer: int, hidden: Tensor, keys: Tensor, age: Tensor, rf: Tensor, kv: tuple[Tensor, Tensor] | None = None
    ) -> None:
        """Append rows to one layer's LTM (e.g. from a checkpoint). O(rows) copies."""
        for name, t in [("hidden", hidden), ("keys", keys), ("age", age), ("rf", rf)]:
            check_tensor("append_rows_", name, t)
        if not (isinstance(layer, int) and 0 <= layer < self.num_layers):
            raise ValueError(f"append_rows_: layer={layer!r} out of range [0, {self.num_layers})")
        r = hidden.shape[0]
        if hidden.shape != (r, self.hidden_size) or keys.shape != (r, self.key_dim):
            raise ValueError(
                f"append_rows_: hidden {list(hidden.shape)} / keys {list(keys.shape)} must be [{r}, {self.hidden_size}]"
                f" / [{r}, {self.key_dim}]"
            )
        if age.shape != (r,) or rf.shape != (r,):
            raise ValueError(f"append_rows_: age {list(age.shape)} and rf {list(rf.shape)} must be [{r}]")
        if (kv is None) != (self.kv is None):
            raise ValueError("append_rows_: kv must be given exactly when the store keeps K/V")
        n = self.size[layer]
        self._reserve(layer, n + r)
        module = self.layers[layer]
        copy_async_(module.hidden[n : n + r], hidden)
        module.keys[n : n + r].copy_(keys)
        module.age[n : n + r].copy_(age)
        module.rf[n : n + r].copy_(rf)
        if kv is not None:
            copy_async_(module.k[n : n + r], kv[0])
            copy_async_(module.v[n : n + r], kv[1])
        self.size[layer] = n + r

    def contents(self) -> StoreContents:
        """Every used row and counter on the host (views of the host buffers; keys and ages copied off the device).
        Hold the state's read lock while they are used: an update changes the views."""
        self._host_sync()
        size, m, kv = self.size, self.cache_len, self.kv_shape is not None
        per = lambda name: [getattr(layer, name)[:n].cpu() for layer, n in zip(self.layers, size)]  # noqa: E731
        return StoreContents(
            hidden=per("hidden"), keys=per("keys"), age=per("age"), rf=per("rf"),
            k=per("k") if kv else None, v=per("v") if kv else None,
            cache_hidden=self.cache_hidden[:, :m], cache_keys=self.cache_keys[:, :m].cpu(),
            cache_age=self.cache_age[:, :m].cpu(), cache_k=self.cache_k[:, :m] if kv else None,
            cache_v=self.cache_v[:, :m] if kv else None, update_step=self.update_step,
        )  # fmt: skip

    def check_contents(self, c: StoreContents, where: str) -> list[str]:
        """What keeps ``c`` (shapes already checked by the caller) from being this store's state: the cache's
        capacity, the ``update_step`` range. Returns the problems (empty: it fits; the budget is checked by
        :meth:`plan_load`)."""
        problems = []
        m, period = c.cache_hidden.shape[1], self.update_ltm_frequency * self.num_tokens
        if m > self.cache_hidden.shape[1]:
            problems.append(f"{m} cached rows exceed the cache capacity {self.cache_hidden.shape[1]}")
        if not 0 <= c.update_step < period:
            problems.append(f"update_step={c.update_step} is outside [0, {period}) (update_ltm_frequency x num_tokens)")
        return problems

    def plan_load(self, c: StoreContents, where: str) -> dict[int, dict[str, Tensor]]:
        """Room for the contents ``c`` (checked by the caller), budget included: the buffers to grow, nothing changed.
        ``LTMBudgetError`` names ``where``."""
        sizes = [t.shape[0] for t in c.hidden]
        return self._plan_growth(sizes, f"{where}: loading {sum(sizes)} rows", amortised=False)

    def commit_load(self, c: StoreContents, grown: dict[int, dict[str, Tensor]]) -> None:
        """Replace the whole store by ``c`` (after :meth:`plan_load`): writes only, nothing can fail part-way."""
        self._install(grown)
        self._host_sync()  # device work may still read the rows about to be replaced
        for layer, module in enumerate(self.layers):
            s = c.hidden[layer].shape[0]
            copy_async_(module.hidden[:s], c.hidden[layer])
            module.keys[:s].copy_(c.keys[layer])
            module.age[:s].copy_(c.age[layer])
            module.rf[:s].copy_(c.rf[layer])
            if self.kv_shape is not None:
                copy_async_(module.k[:s], c.k[layer])
                copy_async_(module.v[:s], c.v[layer])
            self.size[layer] = s
        m = c.cache_hidden.shape[1]
        copy_async_(self.cache_hidden[:, :m], c.cache_hidden)
        self.cache_keys[:, :m].copy_(c.cache_keys)
        self.cache_age[:, :m].copy_(c.cache_age)
        if self.kv_shape is not None:
            copy_async_(self.cache_k[:, :m], c.cache_k)
            copy_async_(self.cache_v[:, :m], c.cache_v)
        self.cache_len, self.update_step = m, c.update_step

    # ------------------------------------------------------------------------------------------------- updates
    def cache_views(self, rows: int) -> dict[str, Tensor]:
        """Views ``[L, rows, ...]`` of the next free cache rows: pass them as the short-term update's ``dropped``
        outputs, then commit the push with ``written=True``."""
        if self.cache_len + rows > self.cache_hidden.shape[1]:
            raise ValueError(
                f"cache_views: {rows} rows do not fit the cache ({self.cache_len} of {self.cache_hidden.shape[1]} used)"
            )
        window = slice(self.cache_len, self.cache_len + rows)
        views = {"hidden": self.cache_hidden[:, window], "age": self.cache_age[:, window]}
        if self.kv_shape is not None:
            views["k"], views["v"] = self.cache_k[:, window], self.cache_v[:, window]
        return views

    def plan_push(self, rows: int) -> PushPlan:
        """Check that an update dropping ``rows`` rows per layer can be recorded (room in the cache; the budget of
        the merge it triggers) and allocate the buffers that merge grows into. Raises ``ValueError`` /
        ``LTMBudgetError``; changes nothing."""
        if rows < 0 or self.cache_len + rows > self.cache_hidden.shape[1]:
            raise ValueError(
                f"push_dropped: {rows} rows overflow the cache ({self.cache_len} of {self.cache_hidden.shape[1]} "
                f"used); each update must drop num_tokens={self.num_tokens} rows"
            )
        merges = self.update_step + self.num_tokens >= self.update_ltm_frequency * self.num_tokens
        grown = {}
        if merges:
            m = self.cache_len + rows
            grown = self._plan_growth(
                [n + m for n in self.size], f"merging {m} cached rows into the long-term memory"
            )
        return PushPlan(rows, merges, grown)

    def _check_push(self, keys: Tensor, hidden, age, kv, written: bool) -> int:
        keys = check_tensor("push_dropped", "keys", keys)
        num_layers, k = keys.shape[0], keys.shape[1] if keys.dim() == 3 else -1
        if keys.dim() != 3 or num_layers != self.num_layers or keys.shape[2] != self.key_dim:
            raise ValueError(
                f"push_dropped: keys must be [L={self.num_layers}, k, ds={self.key_dim}], got {list(keys.shape)}"
            )
        if not written:
            if hidden is None or age is None:
                raise ValueError("push_dropped: give hidden and age, or write them into cache_views and written=True")
            if hidden.shape != (self.num_layers, k, self.hidden_size) or age.shape != (self.num_layers, k):
                raise ValueError(
                    f"push_dropped: hidden {list(hidden.shape)} / age {list(age.shape)} must be "
                    f"[{self.num_layers}, {k}, {self.hidden_size}] / [{self.num_layers}, {k}]"
                )
            if (kv is None) != (self.kv_shape is None):
                raise ValueError("push_dropped: kv must be given exactly when the store keeps K/V")
        return k

    def push_dropped(
        self,
        keys: Tensor,
        *,
        hidden: Tensor | None = None,
        age: Tensor | None = None,
        kv: tuple[Tensor, Tensor] | None = None,
        written: bool = False,
    ) -> bool:
        """Record one short-term update's dropped rows (``[L, k, ...]``) and advance the bookkeeping: :meth:`plan_push`
        then :meth:`commit_push`. Returns True when this update triggered a merge. Invalid input changes nothing."""
        k = self._check_push(keys, hidden, age, kv, written)
        return self.commit_push(self.plan_push(k), keys, hidden=hidden, age=age, kv=kv, written=written)

    def commit_push(
        self,
        plan: PushPlan,
        keys: Tensor,
        *,
        hidden: Tensor | None = None,
        age: Tensor | None = None,
        kv: tuple[Tensor, Tensor] | None = None,
        written: bool = False,
    ) -> bool:
        """Write a planned push: ``keys [L, k, ds]`` are the dropped rows' retriever keys; with ``written=True``
        their rows and ages are already in :meth:`cache_views` (zero copy), otherwise ``hidden``/``age`` (and
        ``kv``) are copied in. Writes only (every check and allocation was :meth:`plan_push`'s)."""
        k = plan.rows
        window = slice(self.cache_len, self.cache_len + k)
        if not written:  # rows from the device land in (pinned) host memory asynchronously; ages stay on the device
            copy_async_(self.cache_hidden[:, window], hidden)
            self.cache_age[:, window].copy_(age)
            if kv is not None:
                copy_async_(self.cache_k[:, window], kv[0])
                copy_async_(self.cache_v[:, window], kv[1])
        # Official order: every existing LTM and cached age grows, then the just-dropped rows join the cache.
        for layer, module in enumerate(self.layers):
            module.age[: self.size[layer]] += self.num_tokens
        self.cache_age[:, : self.cache_len] += self.num_tokens
        self.cache_keys[:, window].copy_(keys)
        self.cache_len += k
        self.update_step += self.num_tokens
        if plan.merges:
            self._merge(plan.grown)
        return plan.merges

    def merge(self) -> None:
        """Move the cache into the LTM, decay recall frequencies, evict (SPEC.md §4.4), reset the cache."""
        self._merge(self._plan_growth([n + self.cache_len for n in self.size], "merging the cache"))

    def _merge(self, grown: dict[int, dict[str, Tensor]]) -> None:
        m = self.cache_len
        self._host_sync()  # the host compacts rows that device copies may still be writing or reading
        self._install(grown)
        for layer, module in enumerate(self.layers):
            n = self.size[layer]
            module.hidden[n : n + m].copy_(self.cache_hidden[layer, :m])
            module.keys[n : n + m].copy_(self.cache_keys[layer, :m])
            module.age[n : n + m].copy_(self.cache_age[layer, :m])
            module.rf[n : n + m].fill_(self.initial_rf)
            if self.kv_shape is not None:
                module.k[n : n + m].copy_(self.cache_k[layer, :m])
                module.v[n : n + m].copy_(self.cache_v[layer, :m])
            n += m
            rf, keep = decay_and_evict(module.rf[:n], self.decay_frequency, self.num_retrieved)
            module.rf[:n].copy_(rf)
            if keep is not None:
                runs = row_runs(keep.nonzero().squeeze(1))
                for buf in module._buffers.values():
                    if buf is not None:
                        compact_(buf, runs)
                n = int(keep.sum())
            self.size[layer] = n
        self.cache_len = 0
        self.update_step = 0
