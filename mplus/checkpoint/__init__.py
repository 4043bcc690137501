"""Checkpoints: the official layout (:mod:`.official`), where its files are (:mod:`.hub`), and the whole memory
state in the mplus memory file (:mod:`mplus.memory.serialization`, through :func:`save_memory` / :func:`load_memory`).

A checkpoint is a directory or a Hugging Face Hub model id (``owner/name``). :func:`load_checkpoint` builds a model
(``from_pretrained``), :func:`save_checkpoint` writes the official layout back (``save_pretrained``);
:func:`save_memory` keeps the whole memory.
"""

from __future__ import annotations

import inspect
import json
import os

import torch
from torch import Tensor

from ..config import MPlusConfig
from ..memory import serialization
from ..memory.state import MemoryState
from .hub import CONFIG_NAME, read_files, read_tensors, resolve_checkpoint, weight_files
from .official import (
    check_official_state,
    commit_official_memory,
    load_official_memory,
    load_official_state,
    model_kv,
    official_config,
    official_state,
    official_weights,
    refresh_memory_kv,
    save_checkpoint,
)

__all__ = [
    "IGNORED_KEYWORDS",
    "REFUSED_KEYWORDS",
    "check_official_state",
    "commit_official_memory",
    "load_checkpoint",
    "load_memory",
    "load_official_memory",
    "load_official_state",
    "memory_state",
    "model_kv",
    "official_config",
    "official_state",
    "official_weights",
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


# transformers' from_pretrained keywords (what AutoModelForCausalLM and pipeline pass, and common user ones) that are
# harmless for mplus: taken whatever their value, and ignored
IGNORED_KEYWORDS = {
    "trust_remote_code": "mplus runs no code from a checkpoint",
    "low_cpu_mem_usage": "mplus builds the model once on the host and loads the weights into it",
    "weights_only": "safetensors files hold no code",
    "code_revision": "no remote code",
    "_from_auto": "set by AutoModelForCausalLM",
    "_from_pipeline": "set by pipeline()",
    "_commit_hash": "set by older transformers",
}
# ... and those mplus cannot honour: taken unset (None or False) only, refused by name otherwise
REFUSED_KEYWORDS = {
    "variant": "mplus reads model.safetensors (or its shards) only",
    "gguf_file": "mplus reads safetensors checkpoints only",
    "quantization_config": "mplus does not quantize (dtype= picks the precision)",
    "output_loading_info": "a load either matches the checkpoint exactly or raises, naming each problem",
    "ignore_mismatched_sizes": "every tensor must match the config (a mismatch is an error naming it)",
    "max_memory": "mplus places the whole model on one device (device=)",
    "offload_folder": "mplus places the whole model on one device (device=)",
    "offload_state_dict": "mplus places the whole model on one device (device=)",
    "offload_buffers": "mplus places the whole model on one device (device=)",
    "tp_plan": "mplus places the whole model on one device (device=)",
    "tp_size": "mplus places the whole model on one device (device=)",
    "device_mesh": "mplus places the whole model on one device (device=)",
    "distributed_config": "mplus places the whole model on one device (device=)",
    "key_mapping": "mplus reads the official names (SPEC.md §2) only",
    "state_dict": "mplus reads the weights from the checkpoint's files",
    "proxies": "huggingface_hub reads proxies from the environment (HTTPS_PROXY)",
    "use_kernels": "mplus runs its own kernels (kernels=)",
    "generation_config": "set model.generation_config after loading",
}


def _checked_keywords(cls, kwargs: dict) -> dict:
    """The constructor's keywords out of ``from_pretrained``'s ``kwargs``: transformers' harmless keywords dropped,
    the ones mplus cannot honour and unknown names refused by name (a ``ValueError``, not the constructor's
    ``TypeError``)."""
    kwargs = dict(kwargs)
    for name in IGNORED_KEYWORDS:
        kwargs.pop(name, None)
    adapter = kwargs.pop("adapter_kwargs", None) or {}
    if not isinstance(adapter, dict) or adapter.get("_adapter_model_path") is not None:
        raise ValueError("from_pretrained: a PEFT adapter folder is not an mplus checkpoint (mplus holds its LoRA)")
    attn = kwargs.pop("attn_implementation", None)
    if attn not in (None, "mplus"):
        raise ValueError(
            f"from_pretrained: attn_implementation={attn!r}: an mplus model attends [memory ; chunk] with its fused "
            'memory attention, the one implementation it has; leave it unset (or "mplus")'
        )
    if kwargs.pop("use_safetensors", None) is False:
        raise ValueError("from_pretrained: use_safetensors=False: mplus reads safetensors checkpoints only")
    for name, why in REFUSED_KEYWORDS.items():
        value = kwargs.pop(name, None)
        if value is not None and value is not False:
            raise ValueError(f"from_pretrained: {name} is not supported: {why}")
    own = {
        name
        for name, p in inspect.signature(cls.__init__).parameters.items()
        if p.kind == inspect.Parameter.KEYWORD_ONLY and name != "dtype"
    }
    unknown = sorted(set(kwargs) - own)
    if unknown:
        raise ValueError(
            f"from_pretrained: unknown keyword argument(s) {unknown}; mplus takes dtype/torch_dtype, device/"
            f"device_map, config, the Hub's (revision, subfolder, cache_dir, force_download, local_files_only, token) "
            f"and the model's ({', '.join(sorted(own))})"
        )
    return kwargs


def _checked_dtype(dtype, torch_dtype) -> torch.dtype | str | None:
    """``dtype`` (or its Hugging Face spelling ``torch_dtype``): a floating torch.dtype, its name, "auto" or None."""
    if dtype is not None and torch_dtype is not None and dtype != torch_dtype:
        raise ValueError(f"from_pretrained: dtype={dtype} and torch_dtype={torch_dtype} disagree; give one")
    dtype = dtype if dtype is not None else torch_dtype
    if isinstance(dtype, str) and dtype != "auto":
        dtype = getattr(torch, dtype, None) if isinstance(getattr(torch, dtype, None), torch.dtype) else dtype
    if not (dtype is None or isinstance(dtype, torch.dtype) or (isinstance(dtype, str) and dtype == "auto")):
        raise ValueError(f"from_pretrained: dtype {dtype!r} is not a torch.dtype (e.g. torch.bfloat16) or 'auto'")
    if isinstance(dtype, torch.dtype) and not dtype.is_floating_point:
        raise ValueError(
            f"from_pretrained: dtype={dtype} is not a floating dtype: the weights and the memory are floats "
            "(torch.float32, torch.bfloat16, torch.float16)"
        )
    return dtype


def load_checkpoint(
    cls,
    path: str | os.PathLike,
    *,
    dtype: torch.dtype | None = None,
    torch_dtype: torch.dtype | None = None,
    device: torch.device | str | int | None = None,
    device_map: str | dict | None = None,
    config: MPlusConfig | None = None,
    revision: str | None = None,
    subfolder: str = "",
    cache_dir: str | os.PathLike | None = None,
    force_download: bool = False,
    local_files_only: bool = False,
    token: bool | str | None = None,
    **kwargs,
):
    """Build ``cls`` from a checkpoint directory or Hub model id (:func:`resolve_checkpoint`) on the host, then move
    it to its device (state included). ``config``: an :class:`MPlusConfig` used instead of the checkpoint's
    ``config.json`` (``AutoModelForCausalLM`` passes the one it read). transformers' other keywords are taken when
    harmless (:data:`IGNORED_KEYWORDS`) and refused by name when mplus cannot honour them
    (:data:`REFUSED_KEYWORDS`); the rest go to the constructor."""
    dtype = _checked_dtype(dtype, torch_dtype)
    kwargs = _checked_keywords(cls, kwargs)
    if config is not None and not isinstance(config, MPlusConfig):
        raise ValueError(
            f"from_pretrained: config must be an MPlusConfig (or None: the checkpoint's config.json), got "
            f"{type(config).__name__}"
        )
    target = _single_device(device, device_map)
    directory = resolve_checkpoint(
        path, revision=revision, cache_dir=cache_dir, local_files_only=local_files_only, token=token,
        subfolder=subfolder, force_download=force_download,
    )  # fmt: skip
    config_path = os.path.join(directory, CONFIG_NAME)
    if config is None:
        config = MPlusConfig(**_config_fields(config_path, path))
    files = weight_files(directory)
    tensors = read_files(files)
    if dtype is None or dtype == "auto":
        dtype = tensors["lm_head.weight"].dtype if "lm_head.weight" in tensors else torch.float32
    model = cls(config, dtype=dtype, **kwargs)
    model.eval()
    source = files[0] if len(files) == 1 else f"the {len(files)} safetensors files of {directory}"
    load_official_state(model, tensors, f"from_pretrained: {source}")
    return model if target is None else model.to(target)


def _config_fields(config_path: str, path) -> dict:
    try:
        with open(config_path) as f:
            fields = json.load(f)
    except FileNotFoundError:
        raise ValueError(f"from_pretrained: {config_path} does not exist (is {path!r} a checkpoint?)") from None
    except json.JSONDecodeError as exc:
        raise ValueError(f"from_pretrained: {config_path} is not valid JSON: {exc}") from None
    if not isinstance(fields, dict):
        raise ValueError(f"from_pretrained: {config_path} must hold a JSON object, got {type(fields).__name__}")
    return fields


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
