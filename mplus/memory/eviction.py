"""The long-term memory's eviction rule (SPEC.md §4.4), one pure function: the merge
(:meth:`mplus.memory.ltm.LongTermMemory.merge`) applies it to the store, the training step's replay of the merges
its injections trigger (:meth:`~mplus.memory.retrieval.Retrieval.after_pushes`) to a copy of the frequencies."""

from __future__ import annotations

from torch import Tensor

ALIVE_THRESHOLD = 0.01  # the official `rf > 0.01`


def decay_and_evict(rf: Tensor, decay: float, floor: int) -> tuple[Tensor, Tensor | None]:
    """The merge's eviction rule (SPEC.md §4.4), pure: the recall frequencies ``rf [n]`` (float64) after a merge,
    and the mask of the rows kept (None: every row stays).

    Every frequency drops by ``decay``; rows left at ``<= 0.01`` are evicted, unless ``floor`` (K0) rows or fewer
    would remain: then the decay is undone (as the official code does it, ``(rf - decay) + decay``) and nothing is
    evicted."""
    decayed = rf - decay
    live = decayed > ALIVE_THRESHOLD
    if int(live.sum()) > floor:
        return decayed, None if bool(live.all()) else live
    return decayed + decay, None
