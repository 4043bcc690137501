"""Paths to the official implementation's golden outputs (../shared/golden beside the repository)."""

from __future__ import annotations

from pathlib import Path

from safetensors.torch import load_file

GOLDEN = Path(__file__).resolve().parents[2] / "shared" / "golden"
STATE_FILES = sorted((GOLDEN / "state").glob("state_0*.safetensors"))


def load_state(k: int) -> dict:
    """The official state after injection ``k`` (0 = initial, inference form)."""
    if not STATE_FILES:
        raise FileNotFoundError(f"golden state files not found under {GOLDEN / 'state'}")
    return load_file(str(STATE_FILES[k]))
