"""The long-term memory (LTM) of M+ and its dropped-row cache (SPEC.md §4.4, §4.6, §5.2; DESIGN.md §3).

Rows dropped from the short-term memory wait in a cache; every ``update_ltm_frequency`` updates the cache is merged
into the LTM, recall frequencies decay, and rows whose frequency reaches zero are evicted (unless too few would
remain). Here, unlike the official ``torch.cat`` pattern, every buffer is preallocated and written in place:

* per layer, growable capacity buffers for hidden rows (CPU), retriever keys (``key_device``, e.g. the GPU), ages
  and recall frequencies (float64, exact), and optionally the generation K/V before RoPE;
* one cache buffer ``[L, update_ltm_frequency · num_tokens, ...]``, into which the short-term update can write its
  dropped rows directly (``cache_views``), so an update copies only the rows it adds;
* eviction compacts in place (non-overlapping chunked moves), never through a second copy of the store.

Placement (DESIGN.md §3): the store is an ``nn.Module`` that follows its model. What retrieval reads on the hot path
— retriever keys and ages (LTM and cache) — lives on the compute device (``key_device``); the rows themselves (hidden
rows and pre-RoPE K/V, the bulk of the bytes) and the recall frequencies stay on the host, pinned when the device is
CUDA so the GPU gathers the retrieved rows straight from host memory (``gather_rows_``, zero-copy). Retrieval then
needs no device-to-host sync. The one sync is at a merge (every ``update_ltm_frequency`` updates), where the host
compacts its rows and reads the recall frequencies; :meth:`memory_state` syncs too.

Bookkeeping reproduces the official inference code exactly (reference semantics): at each update every LTM age and
every cached age grows by ``num_tokens`` *before* the just-dropped rows are appended; at a merge new rows get recall
frequency ``initial_rf``, then all frequencies drop by ``decay_frequency`` and rows with frequency <= 0.01 are
removed — unless that would leave ``num_retrieved`` rows or fewer, in which case the decay is undone.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Literal

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from mplus_kernels import gather_rows_
from mplus_kernels._utils import check_tensor

RetrievalMode = Literal["fast", "reference"]
_ALIVE_THRESHOLD = 0.01  # the official `rf > 0.01`


class LTMBudgetError(MemoryError):
    """Growing the store would exceed its memory budget; nothing was allocated or changed."""


@dataclasses.dataclass
class Retrieved:
    """Rows retrieved for one layer, oldest first (descending age)."""

    index: Tensor  # [R] int64 positions in [LTM rows ; cached rows], in the returned (age) order
    hidden: Tensor | None  # [R, d] (None when not asked for)
    age: Tensor  # [R] float64
    scores: Tensor | None = None  # [R] fp32 retrieval scores (None when nothing was scored)
    k: Tensor | None = None  # [R, Hkv, D] pre-RoPE generation K/V, when the store keeps them
    v: Tensor | None = None


def _nbytes(shape: tuple[int, ...], dtype: torch.dtype) -> int:
    return math.prod(shape) * torch.empty((), dtype=dtype).element_size()


def _copy_(dst: Tensor, src: Tensor) -> None:
    """``dst.copy_(src)``, asynchronous into pinned host memory. A meta source (the stand-in for a GPU) has no data
    to move: the copy is skipped, which is all the meta device can model."""
    if src.device.type == "meta" and dst.device.type != "meta":
        return
    dst.copy_(src, non_blocking=dst.is_pinned())


def _runs(keep: Tensor) -> list[tuple[int, int]]:
    """Maximal runs ``(start, length)`` of consecutive indices in the ascending index list ``keep``."""
    if keep.numel() == 0:
        return []
    breaks = (keep[1:] - keep[:-1] != 1).nonzero().squeeze(1) + 1
    starts = torch.cat([torch.zeros(1, dtype=torch.long), breaks])
    ends = torch.cat([breaks, torch.tensor([keep.numel()])])
    return [(int(keep[s]), int(e - s)) for s, e in zip(starts.tolist(), ends.tolist())]


def _compact_(buf: Tensor, runs: list[tuple[int, int]]) -> None:
    """Move the row runs of ``buf`` down to the front, in place, in chunks whose source and target never overlap."""
    dst = 0
    for start, length in runs:
        if start != dst:
            step = start - dst  # > 0: rows only move towards the front
            for off in range(0, length, step):
                c = min(step, length - off)
                buf[dst + off : dst + off + c].copy_(buf[start + off : start + off + c])
        dst += length


class LongTermMemory(nn.Module):
    """Per-layer long-term memory plus the cache of rows dropped since the last merge.

    Args:
        num_layers, hidden_size, key_dim: L, d and the retriever key width ds.
        num_tokens: K, rows dropped (and ``update_step`` advance) per update.
        update_ltm_frequency: merge the cache every this many updates.
        num_retrieved: K0, rows retrieved per layer; also the eviction floor.
        decay_frequency, initial_rf: recall-frequency decay per merge and the value rows enter with.
        dtype: of hidden rows and keys. ``key_device``: where keys live (scoring runs there).
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
        key_device: torch.device | str = "cpu",
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
        self.dtype, self.key_device = dtype, torch.device(key_device)
        dev = self.key_device
        pin = dev.type == "cuda"
        self.budget_bytes = budget_bytes
        self.kv_shape, self.kv_dtype = kv_shape, (kv_dtype or dtype)
        self.update_step = 0
        self.cache_len = 0
        cache_rows = update_ltm_frequency * num_tokens
        self._check_budget(self._row_bytes() * (num_layers * (capacity + cache_rows)), "allocating the store")
        f64 = torch.float64
        self.hidden = [torch.empty(capacity, hidden_size, dtype=dtype, pin_memory=pin) for _ in range(num_layers)]
        self.keys = [torch.empty(capacity, key_dim, dtype=dtype, device=dev) for _ in range(num_layers)]
        self.age = [torch.empty(capacity, dtype=f64, device=dev) for _ in range(num_layers)]
        self.rf = [torch.empty(capacity, dtype=f64) for _ in range(num_layers)]
        self.kv: list[list[Tensor]] | None = None
        if kv_shape is not None:
            self.kv = [
                [torch.empty(capacity, *kv_shape, dtype=self.kv_dtype, pin_memory=pin) for _ in range(2)]
                for _ in range(num_layers)
            ]
        self.size = [0] * num_layers
        self.cache_hidden = torch.empty(num_layers, cache_rows, hidden_size, dtype=dtype, pin_memory=pin)
        self.cache_keys = torch.empty(num_layers, cache_rows, key_dim, dtype=dtype, device=dev)
        self.cache_age = torch.empty(num_layers, cache_rows, dtype=f64, device=dev)
        self.cache_kv = None
        if kv_shape is not None:
            self.cache_kv = [
                torch.empty(num_layers, cache_rows, *kv_shape, dtype=self.kv_dtype, pin_memory=pin) for _ in range(2)
            ]

    # ------------------------------------------------------------------------------------------------ placement
    def _apply(self, fn, recurse: bool = True):
        """Follow the model: ``fn`` (what ``.to``/``.cuda``/``.half`` apply) decides the compute device and the
        dtypes of rows and keys, probed on empty tensors; see the module docstring for what lives where."""
        probe, kv_probe = fn(torch.empty(0, dtype=self.dtype)), fn(torch.empty(0, dtype=self.kv_dtype))
        self.place(probe.device, dtype=probe.dtype, kv_dtype=kv_probe.dtype)
        return self

    def place(self, device: torch.device | str, *, dtype: torch.dtype | None = None, kv_dtype=None) -> None:
        """Move keys and ages to ``device`` and cast rows and keys to ``dtype`` (K/V to ``kv_dtype``); rows stay on
        the host, pinned when ``device`` is CUDA. Ages and recall frequencies stay float64."""
        device, dtype, kv_dtype = torch.device(device), dtype or self.dtype, kv_dtype or self.kv_dtype
        if device.type == "cuda" and device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
        pin = device.type == "cuda"

        def host(t: Tensor, dt: torch.dtype) -> Tensor:
            t = t.to("cpu", dt)
            return t.pin_memory() if pin and not t.is_pinned() else t

        self.hidden = [host(t, dtype) for t in self.hidden]
        self.cache_hidden = host(self.cache_hidden, dtype)
        if self.kv is not None:
            self.kv = [[host(t, kv_dtype) for t in pair] for pair in self.kv]
            self.cache_kv = [host(t, kv_dtype) for t in self.cache_kv]
        self.keys = [t.to(device, dtype) for t in self.keys]
        self.cache_keys = self.cache_keys.to(device, dtype)
        self.age = [t.to(device) for t in self.age]
        self.cache_age = self.cache_age.to(device)
        self.key_device, self.dtype, self.kv_dtype = device, dtype, kv_dtype

    def _host_sync(self) -> None:
        """Wait for the device work that writes or reads the host rows (asynchronous copies, zero-copy gathers)."""
        if self.key_device.type == "cuda":
            torch.cuda.synchronize(self.key_device)

    # ---------------------------------------------------------------------------------------------------- sizes
    def _row_bytes(self) -> int:
        b = _nbytes((self.hidden_size,), self.dtype) + _nbytes((self.key_dim,), self.dtype) + 8  # + age
        if self.kv_shape is not None:
            b += 2 * _nbytes(self.kv_shape, self.kv_dtype)
        return b

    def nbytes(self) -> int:
        """Bytes held by every buffer (capacity, not just used rows), recall frequencies included."""
        total = sum(t.numel() * t.element_size() for t in [*self.hidden, *self.keys, *self.age, *self.rf])
        total += sum(t.numel() * t.element_size() for t in [self.cache_hidden, self.cache_keys, self.cache_age])
        if self.kv is not None:
            total += sum(t.numel() * t.element_size() for pair in self.kv for t in pair)
            total += sum(t.numel() * t.element_size() for t in self.cache_kv)
        return total

    def capacity(self, layer: int) -> int:
        return self.hidden[layer].shape[0]

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

    def _reserve(self, layer: int, rows: int) -> None:
        """Make room for ``rows`` rows in ``layer``, checking the budget first."""
        self._grow(layer, self._target_capacity(layer, rows))

    def _growth_bytes(self, layer: int, new_cap: int) -> int:
        return max(0, new_cap - self.capacity(layer)) * (self._row_bytes() + 8)  # + recall frequency

    def _grow(self, layer: int, new_cap: int) -> None:
        """Reallocate ``layer``'s buffers to ``new_cap`` rows (budget checked first), keeping its rows."""
        if new_cap <= self.capacity(layer):
            return
        self._check_budget(
            self.nbytes() + self._growth_bytes(layer, new_cap), f"growing layer {layer} to {new_cap} rows"
        )
        n = self.size[layer]

        def grown(t: Tensor) -> Tensor:
            out = torch.empty((new_cap, *t.shape[1:]), dtype=t.dtype, device=t.device, pin_memory=t.is_pinned())
            out[:n].copy_(t[:n])
            return out

        # every buffer is made before any is replaced: a failed allocation leaves the layer as it was
        bufs = [grown(t) for t in [self.hidden[layer], self.keys[layer], self.age[layer], self.rf[layer]]]
        kv = [grown(t) for t in self.kv[layer]] if self.kv is not None else None
        self.hidden[layer], self.keys[layer], self.age[layer], self.rf[layer] = bufs
        if kv is not None:
            self.kv[layer] = kv

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
        _copy_(self.hidden[layer][n : n + r], hidden)
        self.keys[layer][n : n + r].copy_(keys)
        self.age[layer][n : n + r].copy_(age)
        self.rf[layer][n : n + r].copy_(rf)
        if kv is not None:
            for dst, src in zip(self.kv[layer], kv):
                _copy_(dst[n : n + r], src)
        self.size[layer] = n + r

    # ------------------------------------------------------------------------------------------------- updates
    def cache_views(self, rows: int) -> dict[str, Tensor]:
        """Views ``[L, rows, ...]`` of the next free cache rows: pass them as the short-term update's ``dropped``
        outputs, then call :meth:`push_dropped` with ``written=True``."""
        if self.cache_len + rows > self.cache_hidden.shape[1]:
            raise ValueError(
                f"cache_views: {rows} rows do not fit the cache ({self.cache_len} of {self.cache_hidden.shape[1]} used)"
            )
        window = slice(self.cache_len, self.cache_len + rows)
        views = {"hidden": self.cache_hidden[:, window], "age": self.cache_age[:, window]}
        if self.cache_kv is not None:
            views["k"], views["v"] = self.cache_kv[0][:, window], self.cache_kv[1][:, window]
        return views

    def prepare_push(self, rows: int) -> None:
        """Check that an update dropping ``rows`` rows per layer can be recorded (room in the cache; the budget of
        the merge it triggers) and make that room now, so :meth:`push_dropped` cannot fail part-way. Raises
        ``ValueError`` / ``LTMBudgetError`` with nothing changed (growth keeps every row). The model calls it
        before it changes the short-term memory, so that an over-budget update changes nothing at all."""
        if rows < 0 or self.cache_len + rows > self.cache_hidden.shape[1]:
            raise ValueError(
                f"push_dropped: {rows} rows overflow the cache ({self.cache_len} of {self.cache_hidden.shape[1]} "
                f"used); each update must drop num_tokens={self.num_tokens} rows"
            )
        if self.update_step + self.num_tokens < self.update_ltm_frequency * self.num_tokens:
            return  # no merge: nothing grows
        m = self.cache_len + rows
        caps = [self._target_capacity(layer, self.size[layer] + m) for layer in range(self.num_layers)]
        extra = sum(self._growth_bytes(layer, cap) for layer, cap in enumerate(caps))
        self._check_budget(self.nbytes() + extra, f"merging {m} cached rows into the long-term memory")
        for layer, cap in enumerate(caps):
            self._grow(layer, cap)

    def push_dropped(
        self,
        keys: Tensor,
        *,
        hidden: Tensor | None = None,
        age: Tensor | None = None,
        kv: tuple[Tensor, Tensor] | None = None,
        written: bool = False,
    ) -> bool:
        """Record one short-term update's dropped rows (``[L, k, ...]``) and advance the bookkeeping.

        ``keys [L, k, ds]`` are their retriever keys. With ``written=True`` the rows and ages were already written
        into :meth:`cache_views` (zero-copy); otherwise ``hidden``/``age`` (and ``kv``) are copied in.
        Returns True when this update triggered a merge into the LTM. Invalid input changes nothing.
        """
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
            if (kv is None) != (self.cache_kv is None):
                raise ValueError("push_dropped: kv must be given exactly when the store keeps K/V")
        self.prepare_push(k)
        views = self.cache_views(k)
        if not written:  # rows from the device land in (pinned) host memory asynchronously; ages stay on the device
            _copy_(views["hidden"], hidden)
            views["age"].copy_(age)
            if kv is not None:
                _copy_(views["k"], kv[0])
                _copy_(views["v"], kv[1])
        # Official order: every existing LTM and cached age grows, then the just-dropped rows join the cache.
        for layer in range(self.num_layers):
            self.age[layer][: self.size[layer]] += self.num_tokens
        self.cache_age[:, : self.cache_len] += self.num_tokens
        self.cache_keys[:, self.cache_len : self.cache_len + k].copy_(keys)
        self.cache_len += k
        self.update_step += self.num_tokens
        if self.update_step >= self.update_ltm_frequency * self.num_tokens:
            self.merge()
            return True
        return False

    def merge(self) -> None:
        """Move the cache into the LTM, decay recall frequencies, evict (SPEC.md §4.4), reset the cache."""
        m = self.cache_len
        self._host_sync()  # the host compacts rows that device copies may still be writing or reading
        for layer in range(self.num_layers):
            self._reserve(layer, self.size[layer] + m)
        for layer in range(self.num_layers):
            n = self.size[layer]
            self.hidden[layer][n : n + m].copy_(self.cache_hidden[layer, :m])
            self.keys[layer][n : n + m].copy_(self.cache_keys[layer, :m])
            self.age[layer][n : n + m].copy_(self.cache_age[layer, :m])
            self.rf[layer][n : n + m].fill_(self.initial_rf)
            if self.kv is not None:
                for dst, src in zip(self.kv[layer], self.cache_kv):
                    dst[n : n + m].copy_(src[layer, :m])
            n += m
            rf = self.rf[layer][:n]
            rf -= self.decay_frequency
            alive = rf > _ALIVE_THRESHOLD
            count = int(alive.sum())
            if count > self.num_retrieved:
                if count < n:
                    runs = _runs(alive.nonzero().squeeze(1))
                    for buf in [
                        self.hidden[layer],
                        self.keys[layer],
                        self.age[layer],
                        self.rf[layer],
                        *(self.kv[layer] if self.kv is not None else []),
                    ]:
                        _compact_(buf, runs)
                    n = count
            else:
                rf += self.decay_frequency  # too few would remain: undo the decay, evict nothing
            self.size[layer] = n
        self.cache_len = 0
        self.update_step = 0

    # ----------------------------------------------------------------------------------------------- retrieval
    def after_pushes(self, pushes: int) -> list[tuple[Tensor, int]] | None:
        """What ``pushes`` more updates (of ``num_tokens`` dropped rows each, not pushed yet: a training step's own
        injections) would leave as candidates, per layer: ``(mask, merged)`` for :meth:`retrieve`'s ``alive`` —
        ``mask`` flags the rows of [LTM ; cache ; the pushed rows] still held, the first ``merged`` of them form the
        long-term memory. None when none of the updates triggers a merge (every row stays). Nothing changes."""
        k, step, merges = self.num_tokens, self.update_step, []
        for i in range(pushes):
            step += k
            if step >= self.update_ltm_frequency * k:
                merges.append(i)
                step = 0
        if not merges:
            return None
        m, out = self.cache_len, []
        for layer in range(self.num_layers):
            n = self.size[layer]
            ids = torch.arange(n)
            rf = self.rf[layer][:n].detach().cpu().clone()
            begin = n  # the first row of [cache ; pushed] not merged yet
            for i in merges:
                end = n + m + (i + 1) * k
                ids = torch.cat([ids, torch.arange(begin, end)])
                rf = torch.cat([rf, torch.full((end - begin,), float(self.initial_rf), dtype=rf.dtype)])
                begin = end
                rf -= self.decay_frequency
                live = rf > _ALIVE_THRESHOLD
                if int(live.sum()) > self.num_retrieved:
                    ids, rf = ids[live], rf[live]
                else:
                    rf += self.decay_frequency
            mask = torch.zeros(n + m + pushes * k, dtype=torch.bool)
            mask[ids] = True
            mask[begin:] = True  # still cached after the last merge
            out.append((mask, begin))
        return out

    def retrieve(
        self,
        layer: int,
        queries: Tensor,
        *,
        num_retrieved: int | None = None,
        mode: RetrievalMode = "fast",
        backend: str | None = None,
        with_hidden: bool = True,
        extra: tuple[Tensor, Tensor, Tensor] | None = None,
        age_offset: float = 0.0,
        alive: tuple[Tensor, int] | None = None,
    ) -> Retrieved:
        """The rows of ``layer`` that the retriever picks for ``queries [T, ds]``, oldest first.

        Scores ``mean_t sigmoid(q_t · k)`` over [LTM keys ; cached keys] and keeps the top K0 (``retrieve_topk``),
        then orders them by descending age, ties broken as ``np.argsort(ages, kind="stable")[::-1]`` (the later
        candidate first). When the LTM is smaller than K0: ``reference`` mode applies the official rule (no
        scoring; the LTM indices ``0..S-1`` repeated to K0 entries, cache ignored; S = 0 returns nothing where the
        official code hangs); ``fast`` mode returns every LTM and cached row once (no duplicates).

        Every returned tensor is on the key device (no device-to-host sync): the hidden rows (unless
        ``with_hidden=False``; generation needs only K/V) and K/V are gathered from the host rows there.

        ``extra = (keys [E, ds], age [E], hidden [E, d])``: candidates that are not in the store yet, ranked after the
        cached rows (a training step's own dropped rows, which may carry gradients: their hidden rows are selected
        differentiably); ``age_offset`` is added to the store's ages first (the injections since). Indices ``>= S +
        cached`` are extra rows. With extra candidates the K/V are not gathered (``k``/``v`` stay None).
        ``alive = (mask, merged)`` (from :meth:`after_pushes`): only the rows flagged in ``mask`` (host bool over
        [LTM ; cache ; extra]) are candidates, and the first ``merged`` of them form the long-term memory (the rest
        are cached): what the store would hold after merges the extra rows' updates trigger.
        """
        k0 = self.num_retrieved if num_retrieved is None else num_retrieved
        if k0 < 0:
            raise ValueError(f"retrieve: num_retrieved={k0} must be >= 0")
        if mode not in ("fast", "reference"):
            raise ValueError(f"retrieve: mode={mode!r}, expected 'fast' or 'reference'")
        if not 0 <= layer < self.num_layers:
            raise ValueError(f"retrieve: layer={layer} out of range [0, {self.num_layers})")
        n, m = self.size[layer], self.cache_len
        e = 0 if extra is None else extra[0].shape[0]
        dev = self.key_device
        scores = None
        ids = None  # the candidates' indices when not all of [LTM ; cache ; extra] are (host int64)
        stored = n  # rows in the long-term memory (the small-store rule of reference mode reads it)
        if alive is not None:
            mask, merged = alive
            if mask.shape != (n + m + e,):
                raise ValueError(f"retrieve: alive mask {list(mask.shape)} must be [{n + m + e}] (LTM, cache, extra)")
            stored = int(mask[:merged].sum())
            if not bool(mask.all()):
                ids = mask.nonzero().squeeze(1)
        count = n + m + e if ids is None else ids.numel()
        pick = (lambda i: i) if ids is None else (lambda i: ids.to(dev)[i])  # noqa: E731
        if mode == "reference" and stored < k0:
            reps = -(-k0 // stored) if stored else 0  # S = 0: nothing (the official code hangs)
            index = pick(torch.arange(stored, device=dev).repeat(reps)[-k0:])
        elif mode == "fast" and count <= k0:
            index = pick(torch.arange(count, device=dev))
        else:
            from mplus_kernels.retrieval import retrieve_topk

            keys1, keys2 = self.keys[layer][:n], self.cache_keys[layer, :m] if m else None
            if e:
                keys2 = extra[0] if keys2 is None else torch.cat([keys2, extra[0].to(keys2.dtype)])
            if ids is not None:  # evicted rows are no candidates (the index order is kept: ties resolve alike)
                split = int((ids < n).sum())
                keys1 = keys1.index_select(0, ids[:split].to(dev))
                keys2 = keys2.index_select(0, (ids[split:] - n).to(dev)) if split < ids.numel() else None
            index, scores = retrieve_topk(queries, keys1, k0, keys2=keys2, backend=backend)
            index = pick(index)
        # Everything below stays on the key device: ages are there, rows are gathered from the host by the device.
        # extra rows' indices point past the store: clamped for its gathers, then replaced by the extra rows' values
        stored_index = index.clamp_max(max(n + m - 1, 0)) if e else index
        extra_index = (index - (n + m)).clamp_min(0) if e else None
        ages = self._gather(layer, "age", stored_index, backend, torch.float64) + age_offset
        if e:
            ages = torch.where(index >= n + m, extra[1].to(dev, torch.float64)[extra_index], ages)
        order = torch.sort(ages, stable=True).indices.flip(0)
        index, ages, stored_index = index[order], ages[order], stored_index[order]
        extra_index = extra_index[order] if e else None
        if scores is not None:
            scores = scores[order]
        out = Retrieved(index=index, hidden=None, age=ages, scores=scores)
        if with_hidden:
            out.hidden = self._gather(layer, "hidden", stored_index, backend)
            if e:
                rows = extra[2].to(dev).index_select(0, extra_index)
                out.hidden = torch.where((index >= n + m)[:, None], rows, out.hidden.to(rows.dtype))
        if self.kv is not None and not e:
            out.k, out.v = (self._gather(layer, name, index, backend) for name in "kv")
        return out

    def _gather(self, layer: int, name: str, index: Tensor, backend: str | None, dtype=None) -> Tensor:
        """``name`` (hidden, age, k, v) of the ``[store ; cache]`` rows at ``index``, on the key device (zeros when
        both are empty: every index is then an extra candidate of :meth:`retrieve`)."""
        n, m = self.size[layer], self.cache_len
        if name == "hidden":
            src, cache = self.hidden[layer][:n], self.cache_hidden[layer, :m]
        elif name == "age":
            src, cache = self.age[layer][:n], self.cache_age[layer, :m]
        else:
            src, cache = self.kv[layer]["kv".index(name)][:n], self.cache_kv["kv".index(name)][layer, :m]
        dst = torch.empty((index.numel(), *src.shape[1:]), dtype=dtype or src.dtype, device=self.key_device)
        if n + m == 0:
            return dst.zero_()
        return gather_rows_(dst, src, cache, index, backend=backend)

    # -------------------------------------------------------------------------------------------- save / load
    def memory_state(self) -> dict[str, Tensor]:
        """Every used row and counter, in the official names where they exist (plus cache, counters, K/V), on the
        host. (Not ``state_dict``: the store's contents are memory, saved apart from the model's weights.)"""
        self._host_sync()
        sd: dict[str, Tensor] = {}
        for layer in range(self.num_layers):
            n = self.size[layer]
            sd[f"ltm.{layer}"] = self.hidden[layer][:n]
            sd[f"ltm_keys.{layer}"] = self.keys[layer][:n].cpu()
            sd[f"ltm_ages.{layer}"] = self.age[layer][:n].cpu()
            sd[f"ltm_recall_frequencies.{layer}"] = self.rf[layer][:n]
            if self.kv is not None:
                sd[f"ltm_k.{layer}"], sd[f"ltm_v.{layer}"] = (t[:n] for t in self.kv[layer])
        m = self.cache_len
        sd["cached_dropped_memories"] = self.cache_hidden[:, :m]
        sd["cached_dropped_keys"] = self.cache_keys[:, :m].cpu()
        sd["cached_dropped_memory_ages"] = self.cache_age[:, :m].cpu()
        if self.cache_kv is not None:
            sd["cached_dropped_k"], sd["cached_dropped_v"] = (t[:, :m] for t in self.cache_kv)
        sd["update_step"] = torch.tensor([self.update_step], dtype=torch.int64)
        return {k: v.contiguous() for k, v in sd.items()}

    def _expected_state(self, sd: dict[str, Tensor]) -> dict[str, tuple[tuple[int, ...], str]]:
        """Every name of a memory state with its expected shape (row counts read from ``sd``) and kind."""
        d, ds, kv = self.hidden_size, self.key_dim, self.kv_shape
        want: dict[str, tuple[tuple[int, ...], str]] = {}
        for layer in range(self.num_layers):
            rows = sd.get(f"ltm.{layer}")
            s = rows.shape[0] if isinstance(rows, Tensor) and rows.dim() >= 1 else 0
            want[f"ltm.{layer}"] = ((s, d), "float")
            want[f"ltm_keys.{layer}"] = ((s, ds), "float")
            want[f"ltm_ages.{layer}"] = ((s,), "float")
            want[f"ltm_recall_frequencies.{layer}"] = ((s,), "float")
            if kv is not None:
                want[f"ltm_k.{layer}"] = want[f"ltm_v.{layer}"] = ((s, *kv), "float")
        cached = sd.get("cached_dropped_memories")
        m = cached.shape[1] if isinstance(cached, Tensor) and cached.dim() >= 2 else 0
        L = self.num_layers  # noqa: N806
        want["cached_dropped_memories"] = ((L, m, d), "float")
        want["cached_dropped_keys"] = ((L, m, ds), "float")
        want["cached_dropped_memory_ages"] = ((L, m), "float")
        if kv is not None:
            want["cached_dropped_k"] = want["cached_dropped_v"] = ((L, m, *kv), "float")
        want["update_step"] = ((1,), "int")
        return want

    def check_memory_state(self, sd: dict[str, Tensor], where: str = "load_memory_state") -> list[int]:
        """Check that ``sd`` is a whole state this store can take (:meth:`memory_state`'s names, shapes and dtypes,
        finite ages and frequencies, counters in range, the budget) without changing anything; returns the rows
        per layer. ``where`` starts each error message (e.g. the file being loaded)."""
        if not isinstance(sd, dict):
            raise TypeError(f"{where}: the state must be a dict of tensors, got {type(sd).__name__}")
        want = self._expected_state(sd)
        counted = {f"{p}.{layer}" for p in ("ltm_ages", "ltm_recall_frequencies") for layer in range(self.num_layers)}
        counted.add("cached_dropped_memory_ages")  # ages and frequencies order and evict rows: they must be finite
        problems = []
        for name, (shape, kind) in want.items():
            t = sd.get(name)
            if t is None:
                problems.append(f"missing {name} {list(shape)}")
            elif not isinstance(t, Tensor):
                problems.append(f"{name} is a {type(t).__name__}, not a tensor")
            elif tuple(t.shape) != shape:
                problems.append(f"{name} has shape {list(t.shape)}, expected {list(shape)}")
            elif kind == "float" and not t.is_floating_point():
                problems.append(f"{name} has dtype {t.dtype}, expected a floating dtype")
            elif kind == "int" and (t.is_floating_point() or t.is_complex() or t.dtype == torch.bool):
                problems.append(f"{name} has dtype {t.dtype}, expected an integer dtype")
            elif name in counted and t.device.type != "meta" and not bool(torch.isfinite(t).all()):
                problems.append(f"{name} holds non-finite values")  # (a meta tensor, a device stand-in, has none)
        problems += [f"unexpected tensor {name} (not part of this store's state)" for name in sd if name not in want]
        if not problems:
            m, step = sd["cached_dropped_memories"].shape[1], int(sd["update_step"][0])
            period = self.update_ltm_frequency * self.num_tokens
            if m > self.cache_hidden.shape[1]:
                problems.append(f"{m} cached rows exceed the cache capacity {self.cache_hidden.shape[1]}")
            if not 0 <= step < period:
                problems.append(f"update_step={step} is outside [0, {period}) (update_ltm_frequency x num_tokens)")
        if problems:
            raise ValueError(
                f"{where}: not a memory state of this store; nothing was loaded:\n  " + "\n  ".join(problems)
            )
        sizes = [sd[f"ltm.{layer}"].shape[0] for layer in range(self.num_layers)]
        extra = sum(self._growth_bytes(layer, s) for layer, s in enumerate(sizes))
        self._check_budget(self.nbytes() + extra, f"{where}: loading {sum(sizes)} rows")
        return sizes

    def load_memory_state(self, sd: dict[str, Tensor], where: str = "load_memory_state") -> None:
        """Replace the whole state by ``sd`` (as written by :meth:`memory_state`), all or nothing: everything is
        checked (:meth:`check_memory_state`, the budget included) and room is made (growth keeps the current rows)
        before the first row is replaced, so a rejected state (``ValueError``, ``LTMBudgetError``) or a failed
        allocation leaves the store exactly as it was. ``where`` starts each error message."""
        sizes = self.check_memory_state(sd, where)
        for layer, s in enumerate(sizes):
            self._grow(layer, max(s, self.capacity(layer)))
        m = sd["cached_dropped_memories"].shape[1]
        self._host_sync()  # device work may still read the rows about to be replaced
        for layer, s in enumerate(sizes):
            _copy_(self.hidden[layer][:s], sd[f"ltm.{layer}"])
            self.keys[layer][:s].copy_(sd[f"ltm_keys.{layer}"])
            self.age[layer][:s].copy_(sd[f"ltm_ages.{layer}"])
            self.rf[layer][:s].copy_(sd[f"ltm_recall_frequencies.{layer}"])
            if self.kv is not None:
                _copy_(self.kv[layer][0][:s], sd[f"ltm_k.{layer}"])
                _copy_(self.kv[layer][1][:s], sd[f"ltm_v.{layer}"])
        _copy_(self.cache_hidden[:, :m], sd["cached_dropped_memories"])
        self.cache_keys[:, :m].copy_(sd["cached_dropped_keys"])
        self.cache_age[:, :m].copy_(sd["cached_dropped_memory_ages"])
        if self.cache_kv is not None:
            _copy_(self.cache_kv[0][:, :m], sd["cached_dropped_k"])
            _copy_(self.cache_kv[1][:, :m], sd["cached_dropped_v"])
        self.size, self.cache_len = sizes, m
        self.update_step = int(sd["update_step"][0])

    def save(self, path: str) -> None:
        save_file(self.memory_state(), path)

    def load(self, path: str) -> None:
        self.load_memory_state(load_file(path))
