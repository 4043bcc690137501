"""The official checkpoint layout (SPEC.md §2) ↔ :class:`~mplus.model.MPlusForCausalLM`: names only.

The official state dict has the module parameters under Llama/PEFT names (which ``MPlusForCausalLM`` reproduces,
so they load by name) plus the memory: ``memory`` [L, N, d], ``ltm.{l}``, ``ltm_keys.{l}``, ``ltm_ages.{l}``,
``ltm_recall_frequencies.{l}`` (and the inference form's ``memory_ages``, ``cached_dropped_*``, ``update_step``).
Everything is validated before anything is assigned: a missing or mis-shaped tensor is a ``ValueError`` naming it,
and the memory changes through its state (``plan_load`` then ``commit``), all or nothing.
"""

from __future__ import annotations

import contextlib
import json
import os
import uuid
import warnings

import torch
from safetensors.torch import save_file
from torch import Tensor

from ..memory.serialization import ltm_contents, ltm_tensors
from ..update import memory_kv
from .hub import CONFIG_NAME, WEIGHTS_NAME

MEMORY_KEYS = ("ltm.", "ltm_keys.", "ltm_ages.", "ltm_recall_frequencies.")
COUNTED_KEYS = ("ltm_ages.", "ltm_recall_frequencies.")  # float32 in the official layout
IGNORED = ("rotary_emb.inv_freq",)


def load_official_state(model, tensors: dict[str, Tensor], source: str = "checkpoint") -> None:
    """Assign an official state dict to ``model`` (weights, STM, LTM) after validating every tensor. ``source``
    starts the error message (``from_pretrained`` names the file)."""
    check_official_state(model, tensors, source)
    model.load_state_dict(official_weights(model, tensors), strict=False)
    commit_official_memory(model, model.memory, tensors, source)


def check_official_state(model, tensors: dict[str, Tensor], source: str = "checkpoint") -> None:
    """Check that an official state dict fits ``model`` (every weight the model's ``state_dict`` has, by name and
    shape, the memory, nothing else), naming every problem in one ``ValueError`` that starts with ``source``. A
    sharded model's ``state_dict`` gives its weights' whole shapes, so this checks it as it checks an unsharded one."""
    cfg = model.config
    L, N, d = cfg.num_hidden_layers, cfg.stm_size, cfg.hidden_size  # noqa: N806
    own = model.state_dict()
    expected = {k: v.shape for k, v in own.items() if k != "inv_freq"}
    expected["memory"] = torch.Size([L, N, d])
    problems = []
    for key, shape in expected.items():
        if key not in tensors:
            problems.append(f"missing {key} {list(shape)}")
        elif tensors[key].shape != shape:
            problems.append(f"{key} has shape {list(tensors[key].shape)}, expected {list(shape)}")
    ltm_sizes = []
    if model.ltm is not None:
        for layer in range(L):
            names = [f"{p}{layer}" for p in MEMORY_KEYS]
            absent = [n for n in names if n not in tensors]
            if absent:
                problems.append(f"missing {absent}")
                continue
            s = tensors[names[0]].shape[0]
            want = {names[0]: (s, d), names[1]: (s, cfg.selector_hidden_dim), names[2]: (s,), names[3]: (s,)}
            problems += [
                f"{n} has shape {list(tensors[n].shape)}, expected {list(w)}"
                for n, w in want.items()
                if tuple(tensors[n].shape) != w
            ]
            ltm_sizes.append(s)
    if "initialized" in tensors and int(tensors["initialized"].reshape(-1)[0]) == 0:
        problems.append("initialized = 0: this MemoryLLM memory was never filled (training-time state)")
    known = set(expected) | {f"{p}{layer}" for p in MEMORY_KEYS for layer in range(L)} | {"initialized"}
    unknown = [k for k in tensors if k not in known and not k.endswith(IGNORED)]
    problems += [f"unexpected tensor {k}" for k in unknown]
    if problems:
        raise ValueError(f"{source} does not match the config:\n  " + "\n  ".join(problems))


def official_weights(model, tensors: dict[str, Tensor]) -> dict[str, Tensor]:
    """The weights of a checked official state dict (:func:`check_official_state`) under the model's
    ``state_dict`` names, in the model's dtype: what ``model.load_state_dict`` takes (the memory is not a weight)."""
    dtype = model.lm_head.weight.dtype
    return {k: tensors[k].to(dtype) for k in model.state_dict() if k != "inv_freq"}


@torch.no_grad()
def commit_official_memory(model, state, tensors: dict[str, Tensor], source: str = "checkpoint") -> None:
    """Load the memory of a checked official state dict (:func:`check_official_state`) into ``state`` (a
    :class:`~mplus.memory.state.MemoryState` of ``model``): the short-term rows in identity slot order with ages 0,
    their K/V and the long-term rows' under the model's weights (load them first), the long-term store; one
    ``plan_load``/``commit`` that keeps the state's drop generator and its version (a state being built stays at
    version 0)."""
    cfg, dtype = model.config, model.lm_head.weight.dtype
    L, N = cfg.num_hidden_layers, cfg.stm_size  # noqa: N806
    stm = _stm_of(model, tensors["memory"].to(dtype), torch.zeros(L, N, dtype=torch.float64))
    contents = None
    if state.ltm is not None:
        sd = _official_ltm_state(model, {**{k: tensors[k] for k in tensors if k.startswith(MEMORY_KEYS)},
                                         "update_step": torch.zeros(1, dtype=torch.int64)})  # fmt: skip
        contents = ltm_contents(state.ltm, sd, source)
    with state.mutate(advance=False):
        state.commit(state.plan_load(stm, contents, None, source))


@torch.no_grad()
def model_kv(model, layer: int, rows: Tensor) -> tuple[Tensor, Tensor]:
    """Generation-adapter K/V (before RoPE) of memory rows of one layer."""
    with model.adapters.use("decoder_adapter"):
        return model.layers[layer].memory_kv(rows)


def _stm_of(model, hidden: Tensor, ages: Tensor) -> dict[str, Tensor]:
    """The short-term buffers of logical rows ``hidden [L, N, d]`` with ``ages [L, N]``: identity slot order, and
    each slot's K/V under the generation adapter."""
    L, N = hidden.shape[:2]  # noqa: N806
    k, v = memory_kv(model, hidden)
    identity = torch.arange(N, dtype=torch.int32).expand(L, N)
    return {"hidden": hidden, "age": ages, "pos": identity, "order": identity, "k": k, "v": v}


@torch.no_grad()
def refresh_memory_kv(model) -> None:
    """Recompute the short-term slots' cached K/V from their hidden rows (after writing ``model.stm.hidden`` by
    hand): a change of the memory, so it advances its version."""
    state = model.memory
    with state.mutate():
        k, v = memory_kv(model, state.stm.hidden)
        state.commit(state.plan_load({"k": k, "v": v}, None, None, "refresh_memory_kv"))


def official_state(model) -> dict[str, Tensor]:
    """The model in the official checkpoint layout (SPEC.md §2), on the host: the weights under the names
    :func:`load_official_state` expects, ``memory`` (the short-term rows in logical order), each layer's long-term
    rows, keys, ages and recall frequencies (ages and frequencies in the official float32, :func:`official_float32`),
    and MemoryLLM's ``initialized = 1``. What the layout has no place for is left out (:func:`save_checkpoint`).
    Tensors may be views of the live memory: hold ``model.memory_lock.read()`` while they are used."""
    with model.memory_lock.read():
        sd = {k: v.detach() for k, v in model.state_dict().items() if k != "inv_freq"}
        sd["memory"] = model.stm.logical("hidden")
        if model.ltm is not None:
            ltm = ltm_tensors(model.ltm)
            sd.update({f"{p}{layer}": ltm[f"{p}{layer}"] for p in MEMORY_KEYS for layer in range(model.ltm.num_layers)})
            sd.update(official_float32({k: v for k, v in sd.items() if k.startswith(COUNTED_KEYS)}))
        else:  # MemoryLLM's buffer: 0 would make the official code treat the memory as never filled
            sd["initialized"] = torch.ones(1, dtype=torch.uint8)
        return {k: v.cpu().contiguous() for k, v in sd.items()}


def official_float32(counted: dict[str, Tensor]) -> dict[str, Tensor]:
    """Long-term ages and recall frequencies (float64 in the store: exact counts) in the official layout's float32
    (SPEC.md §2: the official loader reads them as float32 and int32). Ages are whole numbers, exact in float32 up to
    2^24 = 16,777,216 (65,536 injections of 256 tokens); frequencies start at ``initial_rf`` and fall by
    ``decay_frequency`` per merge, exact for the official whole numbers. A value float32 does not hold exactly
    warns, naming the tensor (``save_memory`` keeps the float64 state exactly)."""
    out = {}
    for name, t in counted.items():
        single = t.float()
        if not torch.equal(single.double(), t.double()):
            worst = float((single.double() - t.double()).abs().max())
            warnings.warn(
                f"save_pretrained: {name} holds values float32 (the official layout's dtype) rounds, by up to "
                f"{worst:g}; save_memory(model, path) keeps the memory state exactly",
                stacklevel=5,  # the caller of model.save_pretrained
            )
        out[name] = single
    return out


def official_config(model) -> dict:
    """``config.json`` of an mplus checkpoint: the config's fields under the official names (``rope_scaling``, the
    memory fields: the official code reads it, as ``LlamaConfig`` with a warning on the model type), with
    ``model_type: "mplus"`` and ``architectures: ["MPlusForCausalLM"]``, so that transformers' Auto classes build an
    mplus model from it (``import mplus`` registers them) and, without mplus, refuse it instead of building a plain
    Llama that drops the memory. Official checkpoints (``model_type: "llama"``) load with ``from_pretrained`` too."""
    fields = model.config.to_dict()
    fields["model_type"] = "mplus"
    fields["architectures"] = ["MPlusForCausalLM"]
    rope = fields.pop("rope_parameters", None) or {}
    fields["rope_scaling"] = {k: v for k, v in rope.items() if k != "rope_theta"} or None  # rope_theta is top-level
    fields["dtype"] = str(model.lm_head.weight.dtype).removeprefix("torch.")
    fields.setdefault("use_cache", True)  # a LlamaConfig field of the official files (transformers 5 drops it)
    return fields


def _fsync(path: str) -> None:
    with open(path, "rb+") as f:
        os.fsync(f.fileno())


def save_checkpoint(
    model, directory: str | os.PathLike, *, safe_serialization: bool = True, max_shard_size: int | str | None = None
) -> None:
    """Write ``model`` to ``directory`` in the official layout: ``config.json`` (:func:`official_config`) and one
    ``model.safetensors`` (:func:`official_state`: weights + the current memory). ``from_pretrained(directory)``
    gives back bit-identical weights, the short-term rows in logical order and the long-term store.

    The layout has no place for (the official model does not save them either): the short-term ages and slot
    layout (reloaded as ages 0 in identity order), the rows dropped since the last merge into the long-term memory
    and ``update_step`` (a ``UserWarning`` says when rows are lost), per-row K/V caches (recomputed on load) and
    torch's RNG state. :func:`save_memory` keeps the whole memory state.

    Each file is written to a temporary name in ``directory`` and renamed over the old one only when complete:
    a failed save leaves no half-written ``model.safetensors`` or ``config.json`` in place of a good one.
    ``safe_serialization`` must be True and ``max_shard_size`` None (one safetensors file, no shards)."""
    if not isinstance(directory, (str, os.PathLike)):
        raise TypeError(f"save_pretrained: save_directory must be a path (str or os.PathLike), got {directory!r}")
    directory = os.fspath(directory)
    if safe_serialization is not True:
        raise ValueError(f"save_pretrained: safe_serialization={safe_serialization!r}: mplus writes safetensors only")
    if max_shard_size is not None:
        raise ValueError(
            f"save_pretrained: max_shard_size={max_shard_size!r}: mplus writes one model.safetensors (no shards)"
        )
    if model.compute_device.type == "meta":
        raise ValueError(f"save_pretrained: the model is on the meta device, which holds nothing to save ({directory})")
    if os.path.exists(directory) and not os.path.isdir(directory):
        raise ValueError(f"save_pretrained: {directory} is a file, not a directory")
    os.makedirs(directory, exist_ok=True)
    stamp = uuid.uuid4().hex[:8]  # hidden names that match neither *.safetensors nor *.json (readers skip them)
    staged = {name: os.path.join(directory, f".{name}.{stamp}.partial") for name in (WEIGHTS_NAME, CONFIG_NAME)}
    with model.memory_lock.read():  # official_state's tensors are views of the live memory: no inject until written
        if model.ltm is not None and model.ltm.cache_len:
            warnings.warn(
                f"save_pretrained: the {model.ltm.cache_len} rows per layer dropped since the last merge into the "
                f"long-term memory (and update_step={model.ltm.update_step}) have no place in the official layout "
                "and are not saved; save_memory(model, path) keeps the whole memory state",
                stacklevel=3,
            )
        tensors, fields = official_state(model), official_config(model)
        try:
            save_file(tensors, staged[WEIGHTS_NAME], metadata={"format": "pt"})
            _fsync(staged[WEIGHTS_NAME])
            with open(staged[CONFIG_NAME], "w") as f:
                f.write(json.dumps(fields, indent=2, sort_keys=True) + "\n")
                f.flush()
                os.fsync(f.fileno())
            for name, tmp in staged.items():
                os.replace(tmp, os.path.join(directory, name))
        except Exception as exc:  # safetensors' own error type for I/O failures
            raise OSError(f"save_pretrained: cannot write {directory}: {type(exc).__name__}: {exc}") from None
        finally:
            for tmp in staged.values():
                with contextlib.suppress(FileNotFoundError):
                    os.remove(tmp)


@torch.no_grad()
def load_official_memory(model, state: dict[str, Tensor]) -> None:
    """Set the memory from an official *inference-form* state (``memory``, ``memory_ages``, ``ltm.*``,
    ``cached_dropped_*``, ``update_step``), as the official model holds it after ``put_ltm_to_numpy`` and
    injections; K/V caches are recomputed with the generation adapter. All or nothing: everything is computed and
    checked before the model's memory is written (``ValueError`` naming the tensor)."""
    if not isinstance(state, dict):
        raise TypeError(f"load_official_memory: state must be a dict of tensors, got {type(state).__name__}")
    cfg, dtype = model.config, model.lm_head.weight.dtype
    L, N, d = cfg.num_hidden_layers, cfg.stm_size, cfg.hidden_size  # noqa: N806
    where = "load_official_memory"
    for key, shape in [("memory", (L, N, d)), ("memory_ages", (L, N))]:
        t = state.get(key)
        if key == "memory_ages" and t is None:
            continue
        if not isinstance(t, Tensor) or tuple(t.shape) != shape or not t.is_floating_point():
            what = "missing" if t is None else f"{getattr(t, 'dtype', type(t))} {list(getattr(t, 'shape', []))}"
            raise ValueError(f"{where}: {key} is {what}, expected a floating tensor {list(shape)}")
    hidden = state["memory"].to(dtype)
    ages = state.get("memory_ages", torch.zeros(L, N, dtype=torch.float64)).double()
    stm = _stm_of(model, hidden, ages)
    sd = _official_ltm_state(model, state) if model.ltm is not None else {}
    memory = model.memory
    with memory.mutate():
        contents = ltm_contents(model.ltm, sd, where) if model.ltm is not None else None
        memory.commit(memory.plan_load(stm, contents, None, where))


def _official_ltm_state(model, state: dict[str, Tensor]) -> dict[str, Tensor]:
    """The long-term store's state (``LongTermMemory.memory_state`` names) of an official inference-form state."""
    cfg, dtype = model.config, model.lm_head.weight.dtype
    L = cfg.num_hidden_layers  # noqa: N806
    missing = [f"{p}{layer}" for layer in range(L) for p in MEMORY_KEYS if f"{p}{layer}" not in state]
    missing += [] if "update_step" in state else ["update_step"]
    if missing:
        raise ValueError(f"load_official_memory: missing {missing}")
    sd: dict[str, Tensor] = {}
    for layer in range(L):
        rows = state[f"ltm.{layer}"].to(dtype)
        sd[f"ltm.{layer}"], sd[f"ltm_keys.{layer}"] = rows, state[f"ltm_keys.{layer}"].to(dtype)
        sd[f"ltm_ages.{layer}"] = state[f"ltm_ages.{layer}"].double().trunc()
        sd[f"ltm_recall_frequencies.{layer}"] = state[f"ltm_recall_frequencies.{layer}"].double()
        if rows.dim() == 2 and rows.shape[1] == cfg.hidden_size:  # else check_memory_state names the shape
            sd[f"ltm_k.{layer}"], sd[f"ltm_v.{layer}"] = model_kv(model, layer, rows.to(model.compute_device))
    if "cached_dropped_memories" in state:  # after a merge the official cache is None (stale keys ignored)
        rows = state["cached_dropped_memories"].to(dtype)
        sd["cached_dropped_memories"], sd["cached_dropped_keys"] = rows, state["cached_dropped_keys"].to(dtype)
        sd["cached_dropped_memory_ages"] = state["cached_dropped_memory_ages"].double()
        if rows.dim() == 3 and rows.shape[0] == L and rows.shape[2] == cfg.hidden_size:
            sd["cached_dropped_k"], sd["cached_dropped_v"] = memory_kv(model, rows)
    else:
        ds, hkv, dh = cfg.selector_hidden_dim, cfg.num_key_value_heads, cfg.head_dim
        sd["cached_dropped_memories"] = torch.empty(L, 0, cfg.hidden_size, dtype=dtype)
        sd["cached_dropped_keys"] = torch.empty(L, 0, ds, dtype=dtype)
        sd["cached_dropped_memory_ages"] = torch.empty(L, 0, dtype=torch.float64)
        sd["cached_dropped_k"] = sd["cached_dropped_v"] = torch.empty(L, 0, hkv, dh, dtype=dtype)
    sd["update_step"] = state["update_step"]
    return sd
