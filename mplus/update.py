"""The update path (SPEC.md §4): write a context into a memory state.

* :func:`encode` — the update forward under the encoder adapter: per layer the context attends to [BOS ; last K
  short-term rows]; the last K outputs of each layer are that layer's new memory rows (the delta). Differentiable:
  training calls it with gradients on.
* :func:`commit_update` — the all-or-nothing write of a delta into a state: K rows dropped per layer (official RNG:
  per layer ``torch.randperm(N)`` on the state's generator), the new rows' generation K/V cached, the dropped rows to
  the long-term memory (M+) or discarded (MemoryLLM); the state's version advances.
* :func:`inject` — both, for a whole document: split as the official LongBench evaluation splits it
  (:func:`split_chunks`), each chunk under the state's write lock.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import TYPE_CHECKING

import torch
from torch import Tensor
from tqdm.auto import tqdm

from .llama import check_ids
from .lora import DECODER, ENCODER
from .memory.state import MemoryState
from .segments import shared_segment

if TYPE_CHECKING:  # annotations only: mplus.model imports this module
    from .model import MPlusForCausalLM

__all__ = ["CHUNK_SIZE", "MIN_CHUNK", "commit_update", "encode", "inject", "split_chunks"]

CHUNK_SIZE = 512  # tokens per injected chunk: the official training cap and LongBench evaluation chunk
MIN_CHUNK = 16  # the training minimum (the official README: shorter contexts disturb the memory)


def split_chunks(length: int, chunk_size: int = CHUNK_SIZE) -> list[tuple[int, int]]:
    """``[start, end)`` of the chunks of a ``length``-token document, as the official LongBench evaluation cuts
    it: full ``chunk_size`` chunks aligned to the end, the remainder (if any) first."""
    head = length % chunk_size
    bounds = ([0] if head else []) + list(range(head, length + 1, chunk_size))
    return list(zip(bounds[:-1], bounds[1:]))


@torch.no_grad()
def inject(
    model: MPlusForCausalLM,
    context_ids: Tensor,
    *,
    update_memory: bool = True,
    victims: Tensor | None = None,
    output_hidden_states: bool = False,
    chunk_size: int = CHUNK_SIZE,
    progress: bool = True,
    memory: MemoryState | None = None,
) -> Tensor | tuple[Tensor, list[Tensor]]:
    """Write a context into memory (SPEC.md §4). ``context_ids [1, T]``; returns the delta memory ``[L, K, d]``
    (and the per-layer input hidden states with ``output_hidden_states``). Runs without gradients.

    ``victims [L, K]`` overrides the drop choices (logical positions); by default they are drawn as the official
    code does, from torch's default CPU generator. With ``update_memory=False`` nothing changes.

    **Long documents.** A context of more than ``chunk_size`` tokens (default 512, the official training and
    evaluation cap) is split as the official LongBench evaluation splits it: full ``chunk_size`` chunks aligned
    to the *end* of the document, the remainder (``T mod chunk_size`` tokens, when not 0) as the first chunk;
    the chunks are injected in order, exactly as ``inject`` called on each one, with a ``tqdm`` progress bar
    (``progress=False``: none). A chunk under 16 tokens (the training minimum) warns: the official README says
    such chunks disturb the memory. Returns the last chunk's delta. Each chunk is all-or-nothing; when chunk i
    fails (e.g. ``LTMBudgetError``), the chunks before it stay injected and the error's note says how many.
    ``victims``, ``output_hidden_states`` and ``update_memory=False`` apply to a single chunk only.

    ``memory``: the :class:`MemoryState` to write (default: the model's own, ``model.memory``).
    """
    check_ids(context_ids, model.config.vocab_size, "inject", name="context_ids")
    mem = model.resolve_memory(memory, "inject", inject=True)
    if not isinstance(chunk_size, int) or chunk_size <= 0:
        raise ValueError(f"inject: chunk_size={chunk_size!r} must be an int > 0")
    t = context_ids.shape[1]
    chunks = split_chunks(t, chunk_size)
    if len(chunks) > 1 and (victims is not None or output_hidden_states or not update_memory):
        raise ValueError(
            f"inject: a context of {t} tokens is {len(chunks)} chunks of <= {chunk_size}; victims, "
            "output_hidden_states and update_memory=False apply to one chunk: inject the chunks one by one"
        )
    limit = model.rope_cos.shape[0] - model.config.num_tokens - 1
    if max(b - a for a, b in chunks) > limit:
        raise ValueError(
            f"inject: a context of {min(t, chunk_size)} tokens exceeds the {limit}-token limit of "
            f"max_length={model.max_length} (lower chunk_size or load with a larger max_length)"
        )
    short = [b - a for a, b in chunks if b - a < MIN_CHUNK]
    if short:
        warnings.warn(
            f"inject: {len(short)} chunk(s) of {short[0]} tokens, under the {MIN_CHUNK}-token training minimum "
            "(the official README: shorter contexts disturb the memory)",
            stacklevel=4,  # the caller of model.inject (past this function, torch.no_grad's wrapper, model.inject)
        )
    if victims is not None:  # checked where they are: on the host (a device tensor is read once, here)
        cfg = model.config
        victims = check_victims(victims, (cfg.num_hidden_layers, cfg.num_tokens), cfg.stm_size, "inject: victims")
    if len(chunks) == 1:
        with mem.lock.write() if update_memory else mem.lock.read():
            delta, hiddens = _inject_chunk(model, mem, context_ids, update_memory, victims)
        return (delta, hiddens) if output_hidden_states else delta
    with mem.lock.write():  # readers never see half a document
        bar = tqdm(chunks, desc="inject", unit="chunk", disable=not progress, leave=False)
        for i, (a, b) in enumerate(bar):
            try:
                delta, _ = _inject_chunk(model, mem, context_ids[:, a:b], True, None)
            except BaseException as exc:
                exc.add_note(
                    f"inject: chunk {i} of {len(chunks)} (tokens {a}:{b}) failed with the memory as it was before "
                    f"it; the {i} chunk(s) before it are injected"
                )
                raise
    return delta


def check_victims(victims: Tensor, shape: tuple[int, int], n: int, what: str) -> Tensor:
    """Drop choices given by a caller (``inject``'s ``victims``, the training step's ``victims[i]``), checked here, not
    by the memory update op (whose argument names are its own): integers ``shape = [L, K]``, each layer K distinct
    logical positions in ``[0, n)``. Returns them on the host as int64 (a meta tensor, a device stand-in, is passed
    on unread); ``what`` names them in errors."""
    if not isinstance(victims, Tensor) or victims.dtype.is_floating_point or victims.dtype == torch.bool:
        got = f"{victims.dtype}" if isinstance(victims, Tensor) else type(victims).__name__
        raise TypeError(f"{what} must be an integer tensor [L, K] = {list(shape)}, got {got}")
    if tuple(victims.shape) != shape:
        raise ValueError(f"{what} must be [L={shape[0]}, K={shape[1]}], got {list(victims.shape)}")
    if victims.device.type == "meta":
        return victims
    v = victims.detach().cpu().long()
    if v.numel() and (int(v.min()) < 0 or int(v.max()) >= n):
        raise ValueError(f"{what} holds positions outside [0, N={n}) (logical short-term rows)")
    if shape[1] > 1 and bool((v.sort(1).values.diff(dim=1) == 0).any()):
        raise ValueError(f"{what} repeats a position within a layer (each layer drops K distinct rows)")
    return v


def _inject_chunk(
    model: MPlusForCausalLM, mem: MemoryState, context_ids: Tensor, update_memory: bool, victims: Tensor | None
) -> tuple[Tensor, list[Tensor]]:
    n, k = model.config.stm_size, model.config.num_tokens
    tails = lambda i: mem.stm.hidden[i].index_select(0, mem.stm.order[i, n - k :].long())  # noqa: E731
    delta, hiddens = encode(model, context_ids, tails)
    if update_memory:
        commit_update(model, mem, delta, victims)
    return delta, hiddens


def encode(
    model: MPlusForCausalLM,
    context_ids: Tensor,
    tails: Callable[[int], Tensor],
    run_layer: Callable[..., Tensor] | None = None,
) -> tuple[Tensor, list[Tensor]]:
    """The update forward (SPEC.md §4.2) under the encoder adapter: per layer the context ``context_ids [1, T]``
    attends to [BOS ; ``tails(layer_idx)``] (the last K short-term rows ``[K, d]``, logical order); the last K outputs
    of each layer are its delta rows. Returns the delta ``[L, K, d]`` and the layers' input hidden states (L + 1
    entries ``[1, T, d]``, the last one normed). ``run_layer(fn, *args)``, when given, runs each layer's
    ``fn(*args)`` (training: gradient checkpointing). Differentiable when gradients are enabled (training);
    :func:`inject` runs it under ``no_grad``."""
    k, t = model.config.num_tokens, context_ids.shape[1]
    deltas, hiddens = [], []
    p = min(k + 1, t + 1)  # official: min(1 + K, (1 + K + T) - K)
    pos = model.rope.chunk(p, k + t + 1 - p)
    memory_pos = torch.arange(p, dtype=torch.int32, device=model.compute_device)

    def encode_layer(layer_idx: int, h: Tensor, tail: Tensor) -> Tensor:
        layer = model.layers[layer_idx]
        with model.adapters.use(ENCODER):  # set inside: a checkpointed layer recomputes in the backward pass
            x = torch.cat([model.bos_embedding[layer_idx], tail, h[0]])
            x[-k:] += model.new_memory_positional_emb[0, 0]
            mk, mv = layer.memory_kv(x[:p])
            return layer(x[None, p:], pos, shared_segment(mk, mv, memory_pos, model.rope_cos, model.rope_sin), None)

    with model.adapters.use(ENCODER):
        h = model.model.embed_tokens(context_ids.to(model.compute_device))
        for layer_idx in range(len(model.layers)):
            hiddens.append(h)
            args = (layer_idx, h, tails(layer_idx))
            out = encode_layer(*args) if run_layer is None else run_layer(encode_layer, *args)
            deltas.append(out[0, -k:])
            h = out[:, -t:]
        hiddens.append(model.model.norm(h))
    return torch.stack(deltas), hiddens


@torch.no_grad()
def memory_kv(model: MPlusForCausalLM, rows: Tensor) -> tuple[Tensor, Tensor]:
    """Generation-adapter K/V (before RoPE) of every layer's memory rows: ``rows [L, M, d]`` (a layer's rows on the
    model's device) → ``k, v [L, M, Hkv, D]``, what the short-term memory and the long-term store keep per row."""
    with model.adapters.use(DECODER):
        kv = [layer.memory_kv(rows[i].to(model.compute_device)) for i, layer in enumerate(model.layers)]
    return torch.stack([k for k, _ in kv]), torch.stack([v for _, v in kv])


@torch.no_grad()
def commit_update(model: MPlusForCausalLM, mem: MemoryState, delta: Tensor, victims: Tensor | None) -> None:
    """Commit ``delta [L, K, d]`` into ``mem`` through its two phases (docs/architecture.md §3): drop ``victims
    [L, K]`` (logical positions; None: drawn from the state's generator), write the new rows and their
    generation-adapter K/V, send the dropped rows to the long-term memory (M+) with their retriever keys. One
    ``mem.mutate()``: the version advances once.

    All or nothing: ``mem.plan_update`` does every check (the victims, room in the long-term cache, the budget of a
    merge), allocation and draw with nothing changed, so when any of it fails the memory and its generator are as
    they were; ``mem.commit`` only writes."""
    new_k, new_v = memory_kv(model, delta)  # the short-term K/V cache holds generation-adapter keys and values

    def keys_of(rows: Tensor) -> Tensor:  # the retriever keys of the rows about to be dropped [L, K, d] -> [L, K, ds]
        return torch.stack([layer.retriever_keys(rows[i]) for i, layer in enumerate(model.layers)])

    with mem.mutate():
        plan = mem.plan_update(
            delta, new_k, new_v, victims=victims, keys_of=keys_of if mem.ltm is not None else None,
            backend=model.backend,
        )  # fmt: skip
        mem.commit(plan)
