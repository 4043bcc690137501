"""The mplus memory file: a whole :class:`~mplus.memory.state.MemoryState` in one safetensors file.

Names (unchanged since the first memory files, which still load): ``stm.{hidden,age,pos,order[,k,v]}`` (the short-term
slot buffers as they are, slot order), ``rng.cpu`` (the drop generator's state), and the long-term store under
``ltm_store.``: per layer ``ltm.{l}``, ``ltm_keys.{l}``, ``ltm_ages.{l}``, ``ltm_recall_frequencies.{l}`` (the
official names) and ``ltm_k.{l}``/``ltm_v.{l}``, then the cache ``cached_dropped_memories``,
``cached_dropped_keys``, ``cached_dropped_memory_ages``, ``cached_dropped_k``/``_v`` and ``update_step``. A file
of :meth:`MemoryState.save` also holds the state's description as metadata (``mplus.memory``).

This module only maps names to the state's own tensors and checks what a file holds; the state changes itself
(``plan_load`` checks and allocates, ``commit`` writes, inside ``mutate``: the version advances once).
"""

from __future__ import annotations

import json
import os

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor

from .ltm import LongTermMemory, StoreContents

STM_NAMES = ("hidden", "age", "pos", "order", "k", "v")
LTM_PREFIX = "ltm_store."


# ------------------------------------------------------------------------------------------------- long-term store
def ltm_tensors(ltm: LongTermMemory) -> dict[str, Tensor]:
    """Every used row and counter of a store, under the file's names (the official ones where they exist), on the
    host. Views of the host rows: hold the state's read lock while they are used."""
    c = ltm.contents()
    sd: dict[str, Tensor] = {}
    for layer in range(ltm.num_layers):
        sd[f"ltm.{layer}"], sd[f"ltm_keys.{layer}"] = c.hidden[layer], c.keys[layer]
        sd[f"ltm_ages.{layer}"], sd[f"ltm_recall_frequencies.{layer}"] = c.age[layer], c.rf[layer]
        if c.k is not None:
            sd[f"ltm_k.{layer}"], sd[f"ltm_v.{layer}"] = c.k[layer], c.v[layer]
    sd["cached_dropped_memories"], sd["cached_dropped_keys"] = c.cache_hidden, c.cache_keys
    sd["cached_dropped_memory_ages"] = c.cache_age
    if c.cache_k is not None:
        sd["cached_dropped_k"], sd["cached_dropped_v"] = c.cache_k, c.cache_v
    sd["update_step"] = torch.tensor([c.update_step], dtype=torch.int64)
    return {k: v.contiguous() for k, v in sd.items()}


def _expected_ltm(ltm: LongTermMemory, sd: dict[str, Tensor]) -> dict[str, tuple[tuple[int, ...], str]]:
    """Every name of a store's tensors with its expected shape (row counts read from ``sd``) and kind."""
    d, ds, kv = ltm.hidden_size, ltm.key_dim, ltm.kv_shape
    want: dict[str, tuple[tuple[int, ...], str]] = {}
    for layer in range(ltm.num_layers):
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
    L = ltm.num_layers  # noqa: N806
    want["cached_dropped_memories"] = ((L, m, d), "float")
    want["cached_dropped_keys"] = ((L, m, ds), "float")
    want["cached_dropped_memory_ages"] = ((L, m), "float")
    if kv is not None:
        want["cached_dropped_k"] = want["cached_dropped_v"] = ((L, m, *kv), "float")
    want["update_step"] = ((1,), "int")
    return want


def ltm_contents(ltm: LongTermMemory, sd: dict[str, Tensor], where: str) -> StoreContents:
    """The store contents the tensors ``sd`` (:func:`ltm_tensors`' names) hold, checked whole against ``ltm``
    (every name, shape and dtype, finite ages and frequencies, the counters; the budget is the state's
    ``plan_load``'s) without changing anything. ``where`` starts each error message (e.g. the file)."""
    if not isinstance(sd, dict):
        raise TypeError(f"{where}: the state must be a dict of tensors, got {type(sd).__name__}")
    want = _expected_ltm(ltm, sd)
    counted = {f"{p}.{layer}" for p in ("ltm_ages", "ltm_recall_frequencies") for layer in range(ltm.num_layers)}
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
        elif name in counted and t.device.type != "meta" and not all_finite(t):
            problems.append(f"{name} holds non-finite values")  # (a meta tensor, a device stand-in, has none)
    problems += [f"unexpected tensor {name} (not part of this store's state)" for name in sd if name not in want]
    contents = None
    if not problems:
        per = lambda p: [sd[f"{p}.{layer}"] for layer in range(ltm.num_layers)]  # noqa: E731
        kv = ltm.kv_shape is not None
        contents = StoreContents(
            hidden=per("ltm"), keys=per("ltm_keys"), age=per("ltm_ages"), rf=per("ltm_recall_frequencies"),
            k=per("ltm_k") if kv else None, v=per("ltm_v") if kv else None,
            cache_hidden=sd["cached_dropped_memories"], cache_keys=sd["cached_dropped_keys"],
            cache_age=sd["cached_dropped_memory_ages"], cache_k=sd.get("cached_dropped_k"),
            cache_v=sd.get("cached_dropped_v"), update_step=int(sd["update_step"][0]),
        )  # fmt: skip
        problems = ltm.check_contents(contents, where)
    if problems:
        raise ValueError(f"{where}: not a memory state of this store; nothing was loaded:\n  " + "\n  ".join(problems))
    return contents


# --------------------------------------------------------------------------------------------------- whole state
def _stm_names(stm) -> list[str]:
    return [name for name in STM_NAMES if getattr(stm, name) is not None]


def state_tensors(state) -> dict[str, Tensor]:
    """The whole memory state (STM slots + slot layout, ages, LTM, cache, counters, the drop generator's state) under
    the file's names: views of the live buffers where they are contiguous, so clone them (or hold the state's
    ``lock.read()``) to keep them across an inject."""
    stm = state.stm
    with state.lock.read():
        sd = {f"stm.{name}": getattr(stm, name) for name in _stm_names(stm)}
        sd["rng.cpu"] = state.rng_state()
        if state.ltm is not None:
            sd.update({f"{LTM_PREFIX}{k}": v for k, v in ltm_tensors(state.ltm).items()})
        return {k: v.contiguous() for k, v in sd.items()}


def all_finite(t: Tensor) -> bool:
    """Whether ``t`` holds no NaN or inf: its sum first (one fast reduction, no mask the size of ``t``: a non-finite
    element always makes the sum non-finite), and the element-wise check only when that sum is not finite (finite
    values whose sum overflows)."""
    total = t.sum(dtype=torch.float64 if t.dtype == torch.float64 else torch.float32)
    return bool(torch.isfinite(total)) or bool(torch.isfinite(t).all())


def check_stm_tensors(stm, sd: dict[str, Tensor], where: str) -> None:
    """Everything a load reads of the STM (``sd``: ``stm.*`` names), checked before anything is written: names,
    shapes, dtypes, that ``order``/``pos`` are inverse permutations of the slots of each layer (the kernels index with
    them), finite ages, finite rows and K/V (a NaN or inf row would poison every query that attends it)."""
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
    if not all_finite(sd["stm.age"]):
        raise ValueError(f"{where}: stm.age holds non-finite values (a corrupt file); nothing was loaded")
    for name in ("hidden", "k", "v"):
        t = sd.get(f"stm.{name}") if name in _stm_names(stm) else None
        if t is not None and t.device.type != "meta" and not all_finite(t):
            raise ValueError(
                f"{where}: stm.{name} holds non-finite values (NaN or inf: a corrupt file); nothing was loaded"
            )


def _check_rng(state, sd: dict[str, Tensor], where: str) -> None:
    rng = sd.get("rng.cpu")
    expected = state.rng_state()
    if not isinstance(rng, Tensor) or rng.dtype != expected.dtype or rng.shape != expected.shape:
        what = "missing" if rng is None else f"{getattr(rng, 'dtype', type(rng))} {tuple(getattr(rng, 'shape', ()))}"
        raise ValueError(
            f"{where}: rng.cpu is {what}, expected torch's CPU RNG state "
            f"({expected.dtype} {tuple(expected.shape)}); nothing was loaded"
        )


def load_tensors(state, sd: dict[str, Tensor], where: str) -> None:
    """Replace ``state`` by the tensors of a memory file, all or nothing: everything is checked and every allocation
    made (``state.plan_load``) before the first write (``state.commit``), inside ``state.mutate()``."""
    stm, ltm = state.stm, state.ltm
    with state.mutate():
        check_stm_tensors(stm, sd, where)
        _check_rng(state, sd, where)
        ltm_sd = {k[len(LTM_PREFIX) :]: v for k, v in sd.items() if k.startswith(LTM_PREFIX)}
        unknown = [k for k in sd if not (k.startswith(("stm.", LTM_PREFIX)) or k == "rng.cpu")]
        unknown += [k for k in sd if k.startswith("stm.") and k[4:] not in _stm_names(stm)]
        if unknown:
            raise ValueError(f"{where}: unexpected tensors {unknown}; nothing was loaded")
        if ltm is None and ltm_sd:
            raise ValueError(f"{where}: the file holds a long-term memory but this memory (MemoryLLM) has none")
        contents = ltm_contents(ltm, ltm_sd, where) if ltm is not None else None
        stm_sd = {name: sd[f"stm.{name}"] for name in _stm_names(stm)}
        state.commit(state.plan_load(stm_sd, contents, sd["rng.cpu"], where))


# ----------------------------------------------------------------------------------------------------------- files
def check_path(fn: str, path: object) -> None:
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"{fn}: path must be a file path (str or os.PathLike), got {type(path).__name__}")


def save_file_of(state, path: str, fn: str = "MemoryState.save") -> None:
    """Write a state's :func:`state_tensors` and its description (metadata ``mplus.memory``) to ``path``, whole or not
    at all (safetensors writes a temporary file and renames it: a failed save never damages an older file)."""
    check_path(fn, path)
    if state.device.type == "meta":
        raise ValueError(f"{fn}: the memory is on the meta device, which holds no memory to save ({path})")
    with state.lock.read():  # state_tensors' tensors are views of the live buffers: no inject until written
        try:
            save_file(state_tensors(state), path, metadata={"mplus.memory": json.dumps(state.describe())})
        except Exception as exc:  # safetensors' own error type for I/O failures
            raise OSError(f"{fn}: cannot write {path}: {exc}") from None


def read_file(path: str, fn: str) -> tuple[dict[str, Tensor], dict[str, str]]:
    """The tensors and the metadata of a memory file; a missing or foreign file is a ``ValueError``."""
    check_path(fn, path)
    try:
        with safe_open(path, framework="pt") as f:
            return {k: f.get_tensor(k) for k in f.keys()}, (f.metadata() or {})  # noqa: SIM118 (not iterable)
    except FileNotFoundError:
        raise ValueError(f"{fn}: {path} does not exist") from None
    except Exception as exc:  # safetensors raises its own error types on a truncated or foreign file
        raise ValueError(f"{fn}: {path} is not a safetensors file ({type(exc).__name__}: {exc})") from None


def description_of(metadata: dict[str, str], path: str) -> dict:
    """The state description a :meth:`MemoryState.save` file carries (a ``save_memory`` file of old has none)."""
    if "mplus.memory" not in metadata:
        raise ValueError(
            f"MemoryState.load: {path} has no mplus.memory description (a save_memory file): pass like=model"
        )
    return json.loads(metadata["mplus.memory"])


def load_ltm_tensors(ltm: LongTermMemory, sd: dict[str, Tensor], where: str = "load_ltm_tensors") -> None:
    """Replace the contents of a store that belongs to no state (tests, tools) by the tensors ``sd``
    (:func:`ltm_tensors`' names), all or nothing. A state's store changes through its state (:func:`load_tensors`)."""
    contents = ltm_contents(ltm, sd, where)
    ltm.commit_load(contents, ltm.plan_load(contents, where))
