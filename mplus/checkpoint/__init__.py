"""Checkpoints: the official layout (:mod:`.official`), where its files are (:mod:`.hub`), and the whole memory
state in the mplus memory file (:mod:`mplus.memory.serialization`, through :func:`save_memory` / :func:`load_memory`).

A checkpoint is a directory or a Hugging Face Hub model id (``owner/name``). :func:`load_checkpoint` builds a model
(``from_pretrained``), :func:`save_checkpoint` writes the official layout back (``save_pretrained``);
:func:`save_memory` keeps the whole memory.
"""

from __future__ import annotations

import json
import os

import torch
from torch import Tensor

from ..config import MPlusConfig
from ..memory import serialization
from ..memory.state import MemoryState
from .hub import CONFIG_NAME, read_tensors, resolve_checkpoint
from .official import (
    load_official_memory,
    load_official_state,
    model_kv,
    official_config,
    official_state,
    refresh_memory_kv,
    save_checkpoint,
)

__all__ = [
    "load_checkpoint",
    "load_memory",
    "load_official_memory",
    "load_official_state",
    "memory_state",
    "model_kv",
    "official_config",
    "official_state",
    "read_tensors",
    "refresh_memory_kv",
    "resolve_checkpoint",
    "save_checkpoint",
    "save_memory",
]


def _single_device(device, device_map) -> torch.device | None:
    """The one device of ``device=`` / ``device_map=`` (Hugging Face spelling); multi-device maps are refused."""
    if device is not None and device_map is not None:
        raise ValueError(f"from_pretrained: give device= or device_map=, not both (got {device!r}, {device_map!r})")
    if device_map is not None:
        if isinstance(device_map, dict):
            if set(device_map) != {""}:
                raise ValueError(
                    f"from_pretrained: device_map={device_map!r} splits the model across devices; mplus places the "
                    'whole model on one device: pass device_map="cuda" (or {"": "cuda:0"}, "cpu", "auto")'
                )
            device_map = device_map[""]
        if device_map == "auto":
            device_map = "cuda" if torch.cuda.is_available() else "cpu"
        elif isinstance(device_map, str) and device_map in ("balanced", "balanced_low_0", "sequential"):
            raise ValueError(f"from_pretrained: device_map={device_map!r} is multi-device; mplus uses one device")
        device = device_map
    if device is None:
        return None
    if isinstance(device, int):
        device = f"cuda:{device}"
    try:
        return torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise ValueError(f"from_pretrained: device {device!r} is not a device ({exc})") from None


def load_checkpoint(
    cls,
    path: str | os.PathLike,
    *,
    dtype: torch.dtype | None = None,
    torch_dtype: torch.dtype | None = None,
    device: torch.device | str | int | None = None,
    device_map: str | dict | None = None,
    revision: str | None = None,
    cache_dir: str | os.PathLike | None = None,
    local_files_only: bool = False,
    token: bool | str | None = None,
    **kwargs,
):
    """Build ``cls`` from a checkpoint directory or Hub model id (:func:`resolve_checkpoint`) on the host, then move
    it to its device (state included)."""
    if dtype is not None and torch_dtype is not None and dtype != torch_dtype:
        raise ValueError(f"from_pretrained: dtype={dtype} and torch_dtype={torch_dtype} disagree; give one")
    dtype = dtype if dtype is not None else torch_dtype
    if isinstance(dtype, str) and dtype != "auto":
        dtype = getattr(torch, dtype, None) if isinstance(getattr(torch, dtype, None), torch.dtype) else dtype
    if not (dtype is None or dtype == "auto" or isinstance(dtype, torch.dtype)):
        raise ValueError(f"from_pretrained: dtype {dtype!r} is not a torch.dtype (e.g. torch.bfloat16) or 'auto'")
    target = _single_device(device, device_map)
    directory = resolve_checkpoint(
        path, revision=revision, cache_dir=cache_dir, local_files_only=local_files_only, token=token
    )
    config_path = os.path.join(directory, CONFIG_NAME)
    try:
        with open(config_path) as f:
            fields = json.load(f)
    except FileNotFoundError:
        raise ValueError(f"from_pretrained: {config_path} does not exist (is {path!r} a checkpoint?)") from None
    except json.JSONDecodeError as exc:
        raise ValueError(f"from_pretrained: {config_path} is not valid JSON: {exc}") from None
    if not isinstance(fields, dict):
        raise ValueError(f"from_pretrained: {config_path} must hold a JSON object, got {type(fields).__name__}")
    config = MPlusConfig(**fields)
    tensors = read_tensors(directory)
    if dtype is None or dtype == "auto":
        dtype = tensors["lm_head.weight"].dtype if "lm_head.weight" in tensors else torch.float32
    model = cls(config, dtype=dtype, **kwargs)
    model.eval()
    load_official_state(model, tensors)
    return model if target is None else model.to(target)


def _state_of(obj, fn: str) -> MemoryState:
    """The :class:`MemoryState` of a model (its default ``model.memory``) or the state itself."""
    state = obj if isinstance(obj, MemoryState) else getattr(obj, "memory", None)
    if not isinstance(state, MemoryState):
        raise TypeError(f"{fn}: expected an MPlusForCausalLM or a MemoryState, got {type(obj).__name__}")
    return state


def memory_state(model_or_state) -> dict[str, Tensor]:
    """The whole memory state of a model's default memory or of a :class:`MemoryState`, under the memory file's
    names (:func:`mplus.memory.serialization.state_tensors`): views of the live buffers where they are contiguous, so
    clone them (or hold the state's ``lock.read()``) to keep them across an inject."""
    return serialization.state_tensors(_state_of(model_or_state, "memory_state"))


def save_memory(model, path: str) -> None:
    """Write the model's whole default memory state to ``path`` (safetensors), whole or not at all.
    ``MemoryState.load(path)`` reads it back as a new state, ``load_memory`` into a model."""
    serialization.save_file_of(_state_of(model, "save_memory"), path, fn="save_memory")


def load_memory(model, path: str) -> None:
    """Restore a state written by :func:`save_memory` or ``MemoryState.save`` into the model's default memory
    (including the drop generator's state, so drops continue identically).

    All or nothing: the whole file is checked first (every name, shape and dtype; the slot permutations; finite
    ages; the long-term store's counters; its budget) and a bad one is a ``ValueError`` naming the tensor and the
    file (``LTMBudgetError`` for the budget) with the model's memory exactly as it was."""
    state = _state_of(model, "load_memory")
    sd, _ = serialization.read_file(path, "load_memory")
    serialization.load_tensors(state, sd, f"load_memory({path})")
