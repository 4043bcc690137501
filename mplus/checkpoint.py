"""Official checkpoint layout (SPEC.md §2) ↔ :class:`MPlusForCausalLM`, and the full memory state in safetensors.

The official state dict has the module parameters under Llama/PEFT names (which ``MPlusForCausalLM`` reproduces,
so they load by name) plus the memory: ``memory`` [L, N, d], ``ltm.{l}``, ``ltm_keys.{l}``, ``ltm_ages.{l}``,
``ltm_recall_frequencies.{l}``. Everything is validated before anything is assigned: a missing or mis-shaped tensor
is a ``ValueError`` naming it, and the model's memory is left as it was.

A checkpoint is a directory or a Hugging Face Hub model id (``owner/name``), resolved through the Hub cache by
``huggingface_hub.snapshot_download`` (offline with ``HF_HUB_OFFLINE=1`` or ``local_files_only=True``).
:func:`save_checkpoint` writes the layout back (``save_pretrained``); :func:`save_memory` keeps the whole memory.
"""

from __future__ import annotations

import contextlib
import glob
import json
import os
import uuid
import warnings

import torch
from huggingface_hub import constants as hub_constants
from huggingface_hub import snapshot_download
from huggingface_hub.errors import (
    HfHubHTTPError,
    HFValidationError,
    LocalEntryNotFoundError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import Tensor

from .config import MPlusConfig

MEMORY_KEYS = ("ltm.", "ltm_keys.", "ltm_ages.", "ltm_recall_frequencies.")
IGNORED = ("rotary_emb.inv_freq",)
CONFIG_NAME, WEIGHTS_NAME, WEIGHTS_INDEX_NAME = "config.json", "model.safetensors", "model.safetensors.index.json"
HUB_PATTERNS = ("*.json", "*.safetensors")  # all a checkpoint needs from a Hub repo (no tokenizer, no *.bin)


def read_tensors(path: str) -> dict[str, Tensor]:
    """Every tensor of the checkpoint directory ``path``, in the files the Hugging Face loaders read:
    ``model.safetensors`` when present, else the shards ``model.safetensors.index.json`` lists, else every
    ``*.safetensors`` file (other names, e.g. a ``save_memory`` file, are not weights when one of the first two is)."""
    single, index = os.path.join(path, WEIGHTS_NAME), os.path.join(path, WEIGHTS_INDEX_NAME)
    if os.path.isfile(single):
        files = [single]
    elif os.path.isfile(index):
        try:
            with open(index) as f:
                weight_map = json.load(f)["weight_map"]
            shards = sorted(set(weight_map.values()))
        except (json.JSONDecodeError, KeyError, TypeError, AttributeError) as exc:
            what = f"{type(exc).__name__}: {exc}"
            raise ValueError(f"from_pretrained: {index} is not a safetensors index ({what})") from None
        files = [os.path.join(path, shard) for shard in shards]
        absent = [shard for shard, f in zip(shards, files) if not os.path.isfile(f)]
        if absent:
            raise FileNotFoundError(f"{index} lists shards that are not in {path}: {absent}")
    else:
        files = sorted(glob.glob(os.path.join(path, "*.safetensors")))
    if not files:
        raise FileNotFoundError(f"no *.safetensors files in {path}")
    tensors: dict[str, Tensor] = {}
    for f in files:
        try:
            tensors.update(load_file(f))
        except Exception as exc:  # safetensors raises its own error types on a truncated or foreign file
            raise ValueError(f"from_pretrained: {f} is not a safetensors file ({type(exc).__name__}: {exc})") from None
    return tensors


def resolve_checkpoint(
    path: str | os.PathLike,
    *,
    revision: str | None = None,
    cache_dir: str | os.PathLike | None = None,
    local_files_only: bool = False,
    token: bool | str | None = None,
) -> str:
    """The local directory of checkpoint ``path``: ``path`` itself when it is a directory, else the snapshot of the
    Hub model id ``path`` (``owner/name`` at ``revision``, default ``main``) in the Hub cache (``cache_dir``, default
    ``HF_HUB_CACHE``), downloaded (``config.json`` and ``*.safetensors`` only) unless it is there or the Hub is off
    (``HF_HUB_OFFLINE=1``, ``local_files_only=True``). ``revision``, ``cache_dir`` and ``token`` are not used for a
    directory. A string that is neither, or an id that resolves to nothing, is a ``ValueError`` naming it."""
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(
            f"from_pretrained: path must be a checkpoint directory or a Hub model id (str or os.PathLike), got {path!r}"
        )
    if os.path.isdir(path):
        return os.fspath(path)
    if os.path.exists(path):
        raise ValueError(f"from_pretrained: {os.fspath(path)!r} is a file, not a checkpoint directory nor a Hub id")
    if not isinstance(path, str):  # a Path names a local directory, never a Hub id
        raise ValueError(f"from_pretrained: {os.fspath(path)!r} is not an existing directory")
    cache = os.fspath(cache_dir) if cache_dir is not None else hub_constants.HF_HUB_CACHE
    at = f"{path!r} (revision {revision or hub_constants.DEFAULT_REVISION!r})"
    try:
        return snapshot_download(
            path,
            revision=revision,
            cache_dir=cache_dir,
            local_files_only=local_files_only,
            token=token,
            allow_patterns=list(HUB_PATTERNS),
        )
    except HFValidationError as exc:
        raise ValueError(
            f"from_pretrained: {path!r} is neither a local directory nor a valid Hub model id ('owner/name'): {exc}"
        ) from None
    except LocalEntryNotFoundError as exc:  # not (completely) in the cache, and the Hub is off or unreachable
        why = "the Hub is off (HF_HUB_OFFLINE=1 or local_files_only=True)"
        if not (local_files_only or hub_constants.is_offline_mode()):
            why = "the Hub could not be reached"
        raise ValueError(
            f"from_pretrained: {path!r} is neither a local directory nor in the Hub cache {cache} (revision "
            f"{revision or hub_constants.DEFAULT_REVISION!r}), and {why} ({type(exc).__name__}: {exc})"
        ) from None
    except RevisionNotFoundError as exc:
        raise ValueError(f"from_pretrained: the Hub has no {at}: {exc}") from None
    except RepositoryNotFoundError as exc:  # also gated / private without a token
        raise ValueError(
            f"from_pretrained: {path!r} is neither a local directory nor a Hub model this token can read "
            f"(not found, private or gated: pass token=): {exc}"
        ) from None
    except HfHubHTTPError as exc:
        raise ValueError(f"from_pretrained: cannot fetch {at} from the Hub: {exc}") from None


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


def load_official_state(model, tensors: dict[str, Tensor]) -> None:
    """Assign an official state dict to ``model`` (weights, STM, LTM) after validating every tensor."""
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
        raise ValueError("checkpoint does not match the config:\n  " + "\n  ".join(problems))

    dtype = model.lm_head.weight.dtype
    model.load_state_dict({k: tensors[k].to(dtype) for k in own if k != "inv_freq"}, strict=False)
    model.stm.hidden.copy_(tensors["memory"].to(dtype))
    model.stm.age.zero_()
    model.stm.pos.copy_(torch.arange(N, dtype=torch.int32).expand(L, N))
    model.stm.order.copy_(model.stm.pos)
    refresh_memory_kv(model)
    if model.ltm is not None:
        model.ltm.clear()
        for layer in range(L):
            rows = tensors[f"ltm.{layer}"].to(dtype)
            kv = model_kv(model, layer, rows)
            model.ltm.append_rows_(
                layer,
                rows,
                tensors[f"ltm_keys.{layer}"].to(dtype),
                tensors[f"ltm_ages.{layer}"].double().trunc(),  # official: .int() (truncation), without bf16 rounding
                tensors[f"ltm_recall_frequencies.{layer}"].double(),
                kv,
            )


@torch.no_grad()
def model_kv(model, layer: int, rows: Tensor) -> tuple[Tensor, Tensor]:
    """Generation-adapter K/V (before RoPE) of memory rows of one layer."""
    with model.adapters.use("decoder_adapter"):
        return model.layers[layer].memory_kv(rows)


@torch.no_grad()
def refresh_memory_kv(model) -> None:
    """Recompute the short-term slots' cached K/V from their hidden rows (after loading weights or memory)."""
    for layer in range(model.config.num_hidden_layers):
        k, v = model_kv(model, layer, model.stm.hidden[layer])
        model.stm.k[layer].copy_(k)
        model.stm.v[layer].copy_(v)


def official_state(model) -> dict[str, Tensor]:
    """The model in the official checkpoint layout (SPEC.md §2), on the host: the weights under the names
    :func:`load_official_state` expects, ``memory`` (the short-term rows in logical order), each layer's long-term
    rows, keys, ages and recall frequencies (ages and frequencies as float64: exact, and the official loader casts
    them), and MemoryLLM's ``initialized = 1``. What the layout has no place for is left out
    (:func:`save_checkpoint`). Tensors may be views of the live memory: hold ``model.memory_lock.read()`` while
    they are used."""
    with model.memory_lock.read():
        sd = {k: v.detach() for k, v in model.state_dict().items() if k != "inv_freq"}
        sd["memory"] = model.stm.logical("hidden")
        if model.ltm is not None:
            ltm = model.ltm.memory_state()
            sd.update({f"{p}{layer}": ltm[f"{p}{layer}"] for p in MEMORY_KEYS for layer in range(model.ltm.num_layers)})
        else:  # MemoryLLM's buffer: 0 would make the official code treat the memory as never filled
            sd["initialized"] = torch.ones(1, dtype=torch.uint8)
        return {k: v.cpu().contiguous() for k, v in sd.items()}


def official_config(model) -> dict:
    """``config.json`` of the official layout: the config's fields, as a ``LlamaConfig`` (``model_type: llama``)
    with the official names (``rope_scaling``, ``architectures``) so that the official code reads it too."""
    fields = model.config.to_dict()
    fields["model_type"] = "llama"  # the official checkpoints are LlamaConfig + memory fields (AutoConfig reads llama)
    fields["architectures"] = model.config.architectures or ["MPlus" if model.config.has_ltm else "MemoryLLM"]
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


def _state_of(obj, fn: str):
    """The :class:`MemoryState` of a model (its default ``model.memory``) or the state itself."""
    from .memory.state import MemoryState

    state = obj if isinstance(obj, MemoryState) else getattr(obj, "memory", None)
    if not isinstance(state, MemoryState):
        raise TypeError(f"{fn}: expected an MPlusForCausalLM or a MemoryState, got {type(obj).__name__}")
    return state


def _stm_names(stm) -> list[str]:
    return [name for name in STM_NAMES if getattr(stm, name) is not None]


def memory_state(model_or_state) -> dict[str, Tensor]:
    """The whole memory state (STM slots + slot layout, ages, LTM, cache, counters, the drop generator's state) of
    a model's default memory or of a :class:`MemoryState`: views of the live buffers where they are contiguous, so
    clone them (or hold the state's ``lock.read()``) to keep them across an inject."""
    state = _state_of(model_or_state, "memory_state")
    stm = state.stm
    with state.lock.read():
        sd = {f"stm.{name}": getattr(stm, name) for name in _stm_names(stm)}
        sd["rng.cpu"] = state.rng_state()
        if state.ltm is not None:
            sd.update({f"ltm_store.{k}": v for k, v in state.ltm.memory_state().items()})
        return {k: v.contiguous() for k, v in sd.items()}


def _check_path(fn: str, path: object) -> None:
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"{fn}: path must be a file path (str or os.PathLike), got {type(path).__name__}")


def save_state(state, path: str, metadata: dict[str, str] | None = None, fn: str = "MemoryState.save") -> None:
    """Write a state's :func:`memory_state` to ``path`` (safetensors), whole or not at all (safetensors writes a
    temporary file and renames it: a failed save never damages an older file)."""
    _check_path(fn, path)
    if state.device.type == "meta":
        raise ValueError(f"{fn}: the memory is on the meta device, which holds no memory to save ({path})")
    with state.lock.read():  # memory_state's tensors are views of the live buffers: no inject until written
        try:
            save_file(memory_state(state), path, metadata=metadata)
        except Exception as exc:  # safetensors' own error type for I/O failures
            raise OSError(f"{fn}: cannot write {path}: {exc}") from None


def save_memory(model, path: str) -> None:
    """Write the model's whole default memory state (:func:`memory_state`) to ``path`` (safetensors), whole or not
    at all. ``MemoryState.load(path)`` reads it back as a new state, ``load_memory`` into a model."""
    state = _state_of(model, "save_memory")
    save_state(state, path, metadata={"mplus.memory": json.dumps(state.describe())}, fn="save_memory")


STM_NAMES = ("hidden", "age", "pos", "order", "k", "v")


def _check_stm_state(stm, sd: dict[str, Tensor], where: str) -> None:
    """Everything a load reads of the STM, checked before anything is written: names, shapes, dtypes, and that
    ``stm.order`` / ``stm.pos`` are inverse permutations of the slots of each layer (the kernels index with them)."""
    for name in _stm_names(stm):
        key, have = f"stm.{name}", getattr(stm, name)
        if key not in sd:
            raise ValueError(f"{where} has no {key!r} (a memory file from save_memory has it); nothing was loaded")
        got = sd[key]
        if not isinstance(got, Tensor) or got.shape != have.shape or got.dtype != have.dtype:
            what = f"{got.dtype} {tuple(got.shape)}" if isinstance(got, Tensor) else type(got).__name__
            raise ValueError(
                f"{where}: {key} is {what}, this memory's is {have.dtype} {tuple(have.shape)}; nothing was loaded"
            )
    order, pos = sd["stm.order"].long(), sd["stm.pos"].long()
    n = order.shape[-1]
    in_range = bool(((order >= 0) & (order < n)).all() and ((pos >= 0) & (pos < n)).all())
    if not in_range or not torch.equal(pos.gather(-1, order), torch.arange(n).expand_as(order)):
        raise ValueError(
            f"{where}: stm.order and stm.pos are not inverse permutations of the {n} slots of each "
            "layer (a corrupt file); nothing was loaded"
        )
    if not bool(torch.isfinite(sd["stm.age"]).all()):
        raise ValueError(f"{where}: stm.age holds non-finite values (a corrupt file); nothing was loaded")


def _check_rng(state, sd: dict[str, Tensor], where: str) -> None:
    rng = sd.get("rng.cpu")
    expected = state.rng_state()
    if not isinstance(rng, Tensor) or rng.dtype != expected.dtype or rng.shape != expected.shape:
        what = "missing" if rng is None else f"{getattr(rng, 'dtype', type(rng))} {tuple(getattr(rng, 'shape', ()))}"
        raise ValueError(
            f"{where}: rng.cpu is {what}, expected torch's CPU RNG state "
            f"({expected.dtype} {tuple(expected.shape)}); nothing was loaded"
        )


def read_memory_file(path: str, fn: str) -> tuple[dict[str, Tensor], dict[str, str]]:
    """The tensors and the metadata of a memory file; a missing or foreign file is a ``ValueError``."""
    _check_path(fn, path)
    try:
        with safe_open(path, framework="pt") as f:
            return {k: f.get_tensor(k) for k in f.keys()}, (f.metadata() or {})  # noqa: SIM118 (not iterable)
    except FileNotFoundError:
        raise ValueError(f"{fn}: {path} does not exist") from None
    except Exception as exc:  # safetensors raises its own error types on a truncated or foreign file
        raise ValueError(f"{fn}: {path} is not a safetensors file ({type(exc).__name__}: {exc})") from None


def load_state(state, sd: dict[str, Tensor], where: str) -> None:
    """Replace a :class:`MemoryState` by the tensors of a memory file, all or nothing (see :func:`load_memory`)."""
    stm, ltm = state.stm, state.ltm
    with state.lock.write():
        _check_stm_state(stm, sd, where)
        _check_rng(state, sd, where)
        ltm_sd = {k[len("ltm_store.") :]: v for k, v in sd.items() if k.startswith("ltm_store.")}
        unknown = [k for k in sd if not (k.startswith(("stm.", "ltm_store.")) or k == "rng.cpu")]
        unknown += [k for k in sd if k.startswith("stm.") and k[4:] not in _stm_names(stm)]
        if unknown:
            raise ValueError(f"{where}: unexpected tensors {unknown}; nothing was loaded")
        if ltm is None and ltm_sd:
            raise ValueError(f"{where}: the file holds a long-term memory but this memory (MemoryLLM) has none")
        if ltm is not None:  # checks the whole store's state and makes room before its first write
            ltm.load_memory_state(ltm_sd, where)
        for name in _stm_names(stm):
            getattr(stm, name).copy_(sd[f"stm.{name}"])
        state.set_rng_state(sd["rng.cpu"])
        state.version += 1


def load_memory(model, path: str) -> None:
    """Restore a state written by :func:`save_memory` or ``MemoryState.save`` into the model's default memory
    (including the drop generator's state, so drops continue identically).

    All or nothing: the whole file is checked first (every name, shape and dtype; the slot permutations; finite
    ages; the long-term store's counters; its budget) and a bad one is a ``ValueError`` naming the tensor and the
    file (``LTMBudgetError`` for the budget) with the model's memory exactly as it was."""
    state = _state_of(model, "load_memory")
    sd, _ = read_memory_file(path, "load_memory")
    load_state(state, sd, f"load_memory({path})")


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
    ages = state.get("memory_ages", torch.zeros(L, N, dtype=torch.float64))
    kv = [model_kv(model, layer, hidden[layer].to(model.compute_device)) for layer in range(L)]
    sd = _official_ltm_state(model, state) if model.ltm is not None else {}
    with model.memory.lock.write():
        if model.ltm is not None:  # checked whole before its first write; the short-term writes below cannot fail
            model.ltm.load_memory_state(sd, where)
        model.stm.hidden.copy_(hidden)
        model.stm.age.copy_(ages)
        model.stm.pos.copy_(torch.arange(N, dtype=torch.int32).expand(L, N))
        model.stm.order.copy_(model.stm.pos)
        for layer, (k, v) in enumerate(kv):
            model.stm.k[layer].copy_(k)
            model.stm.v[layer].copy_(v)
        model.memory.version += 1


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
            kv = [model_kv(model, layer, rows[layer].to(model.compute_device)) for layer in range(L)]
            sd["cached_dropped_k"], sd["cached_dropped_v"] = (
                torch.stack([a for a, _ in kv]),
                torch.stack([b for _, b in kv]),
            )
    else:
        ds, hkv, dh = cfg.selector_hidden_dim, cfg.num_key_value_heads, cfg.head_dim
        sd["cached_dropped_memories"] = torch.empty(L, 0, cfg.hidden_size, dtype=dtype)
        sd["cached_dropped_keys"] = torch.empty(L, 0, ds, dtype=dtype)
        sd["cached_dropped_memory_ages"] = torch.empty(L, 0, dtype=torch.float64)
        sd["cached_dropped_k"] = sd["cached_dropped_v"] = torch.empty(L, 0, hkv, dh, dtype=dtype)
    sd["update_step"] = state["update_step"]
    return sd
