"""Retrieval from the long-term memory (SPEC.md §5.2): the retriever's top-K0 rows of a layer, oldest first.

A mixin of :class:`mplus.memory.ltm.LongTermMemory` (it reads the store's buffers and counters, and changes
nothing): scoring and top-K run on the key device (``retrieve_topk``), rows are gathered from the host by the
device (``gather_rows_``), so retrieval needs no device-to-host sync.
"""

from __future__ import annotations

import dataclasses
from typing import Literal

import torch
from torch import Tensor

from mplus_kernels import gather_rows_
from mplus_kernels.retrieval import retrieve_topk

from .eviction import decay_and_evict

RetrievalMode = Literal["fast", "reference"]


@dataclasses.dataclass
class Retrieved:
    """Rows retrieved for one layer, oldest first (descending age)."""

    index: Tensor  # [R] int64 positions in [LTM rows ; cached rows], in the returned (age) order
    hidden: Tensor | None  # [R, d] (None when not asked for)
    age: Tensor  # [R] float64
    scores: Tensor | None = None  # [R] fp32 retrieval scores (None when nothing was scored)
    k: Tensor | None = None  # [R, Hkv, D] pre-RoPE generation K/V, when the store keeps them
    v: Tensor | None = None



class Retrieval:
    """``retrieve`` over a store's buffers (see :class:`mplus.memory.ltm.LongTermMemory`)."""

    def after_pushes(self, pushes: int) -> list[tuple[Tensor, int]] | None:
        """What ``pushes`` more updates (of ``num_tokens`` dropped rows each, not pushed yet: a training step's own
        injections) would leave as candidates, per layer: ``(mask, merged)`` for :meth:`retrieve`'s ``alive`` —
        ``mask`` flags the rows of [LTM ; cache ; the pushed rows] still held, the first ``merged`` of them form the
        long-term memory. None when none of the updates triggers a merge (every row stays). Nothing changes: the
        merges are replayed on the recall frequencies with :func:`decay_and_evict`, the rule :meth:`merge` applies."""
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
            rf = self.layers[layer].rf[:n].detach().cpu().clone()
            begin = n  # the first row of [cache ; pushed] not merged yet
            for i in merges:
                end = n + m + (i + 1) * k
                ids = torch.cat([ids, torch.arange(begin, end)])
                rf = torch.cat([rf, torch.full((end - begin,), float(self.initial_rf), dtype=rf.dtype)])
                begin = end
                rf, keep = decay_and_evict(rf, self.decay_frequency, self.num_retrieved)
                if keep is not None:
                    ids, rf = ids[keep], rf[keep]
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

