"""A memory's whole state, for the tests that check an operation left it exactly as it was (or changed it)."""

from __future__ import annotations

import torch

from mplus.checkpoint import memory_state
from mplus.memory.state import MemoryState
from mplus_kernels.testing import assert_equal


def snapshot(model_or_state) -> dict[str, object]:
    """Every tensor and counter of a memory (a state, or a model's default one), its version, and torch's RNG (the
    default state's drop generator)."""
    state = model_or_state if isinstance(model_or_state, MemoryState) else model_or_state.memory
    out: dict[str, object] = {k: v.clone() for k, v in memory_state(state).items()}
    out["torch rng"], out["version"] = torch.get_rng_state(), state.version
    if state.ltm is not None:
        out["ltm counters"] = (list(state.ltm.size), state.ltm.cache_len, state.ltm.update_step)
    return out


def assert_same(after: dict, before: dict) -> None:
    """Two :func:`snapshot`\\ s hold the same, bit for bit."""
    assert after.keys() == before.keys(), sorted(set(after) ^ set(before))
    for key, value in before.items():
        if isinstance(value, torch.Tensor):
            assert_equal(after[key], value, name=key)
        else:
            assert after[key] == value, key
