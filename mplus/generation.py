"""Generation (SPEC.md §5): the cache, its checks, the prefill's memory segments, decoding, transformers' glue.

* :class:`MPlusCache` — per-generate state: each layer's chunk K/V cache and the memory segments the prefill built
  (never rebuilt per step); :class:`StaleCacheError` when the memory changed since.
* :func:`prefill_segments` — a layer's [short-term ; BOS + long-term] segments at the prefill; the long-term rows are
  retrieved and gathered on the transfer engine's worker thread while the layer attends the short-term memory and
  the chunk (a :class:`~mplus.segments.PendingSegment`); :func:`settle_segments` keeps what it resolved to.
* :class:`MPlusGenerationMixin` — what :class:`~mplus.model.MPlusForCausalLM` adds to transformers'
  ``GenerationMixin``: ``generate`` under the memory's read locks, the static-cache ``decode_step`` for
  ``torch.compile`` / CUDA graphs, and the hooks ``generate`` calls.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn
from transformers import GenerationMixin

from .attention import KVCache
from .llama import check_ids
from .lora import DECODER
from .memory.state import MemoryState
from .segments import MemorySegments, PendingSegment, layer_segments, prefix_segment

if TYPE_CHECKING:  # annotations only: mplus.model imports this module
    from .model import MPlusForCausalLM

__all__ = [
    "MPlusCache",
    "MPlusGenerationMixin",
    "StaleCacheError",
    "check_cache",
    "left_padding",
    "prefill_segments",
    "read_locks",
    "same_states",
    "settle_segments",
]

States = MemoryState | list[MemoryState]


class StaleCacheError(RuntimeError):
    """A generation cache was used after the memory it was built on changed (an ``inject`` or a load since its
    prefill): its memory segments no longer match the memory. Start a new generation (a new cache)."""


@dataclasses.dataclass
class MPlusCache:
    """Per-generate state: each layer's chunk KV cache and its fixed memory segments (built at prefill)."""

    layers: list[KVCache]
    memories: list[MemorySegments]  # per layer, resolved (no pending segment) once the prefill ran
    retrieved: list[Tensor | None]  # per layer: indices of the long-term rows used (age order), for inspection
    memory: States | None = None  # the state(s) the prefill read (segments are views of it)
    memory_version: int | list[int] | None = None  # their versions at the prefill (None: not prefilled yet)
    kv_start: Tensor | None = None  # [B] int32: each row's left padding (its first valid cache row); None: none
    pads: list[int] | None = None  # the same on the host
    is_compileable = False  # read by transformers' generate (no automatic torch.compile of the decode step)

    @property
    def length(self) -> int:
        return self.layers[0].length

    @property
    def batch_size(self) -> int:
        return self.layers[0].k.shape[0]

    def get_seq_length(self, layer_idx: int = 0) -> int:  # the name transformers' generation utilities call
        return self.layers[layer_idx].length


def same_states(a: States | tuple | None, b: States | None) -> bool:
    """Whether ``a`` names the very state(s) ``b`` holds (identity, row by row for lists)."""
    if isinstance(a, (list, tuple)) and isinstance(b, list):
        return len(a) == len(b) and all(x is y for x, y in zip(a, b))
    return a is b


@contextlib.contextmanager
def read_locks(memory: States) -> Iterator[None]:
    """Read locks of one state or of a list (each distinct state once, in a fixed order: no lock-order cycles)."""
    states = list({id(m): m for m in memory}.values()) if isinstance(memory, list) else [memory]
    with contextlib.ExitStack() as stack:
        for state in sorted(states, key=id):
            stack.enter_context(state.lock.read())
        yield


def left_padding(attention_mask: Tensor | None, b: int, t: int) -> list[int] | None:
    """Each row's number of left-padding tokens from a prefill's ``attention_mask [B, T]`` (1 = token, 0 =
    padding, Hugging Face's convention); None when nothing is padded. The mask is read on the host, once per
    prefill (a sync when it is on a device): a mask that is not left padding is refused, not guessed."""
    if attention_mask is None:
        return None
    if not isinstance(attention_mask, Tensor) or tuple(attention_mask.shape) != (b, t):
        got = list(attention_mask.shape) if isinstance(attention_mask, Tensor) else type(attention_mask).__name__
        raise ValueError(f"forward: attention_mask must be [B={b}, T={t}] like input_ids at the prefill, got {got}")
    if attention_mask.device.type == "meta":
        raise ValueError("forward: an attention_mask on the meta device has no values to read the padding from")
    mask = attention_mask.detach().to("cpu")
    if not bool(((mask == 0) | (mask == 1)).all()):
        raise ValueError("forward: attention_mask must hold 0 (padding) and 1 (token) only")
    mask = mask.bool()
    pads = (~mask).sum(1)
    wrong = (mask != (torch.arange(t)[None] >= pads[:, None])).any(1) | (pads == t)  # not left padding; no token
    if bool(wrong.any()):
        bad = int(wrong.nonzero()[0])
        raise ValueError(
            f"forward: attention_mask row {bad} is {mask[bad].int().tolist()}: mplus needs left padding (zeros, "
            "then ones, at least one token per row), as Hugging Face pads for generation (tokenizer.padding_side "
            '= "left")'
        )
    return pads.tolist() if bool(pads.any()) else None


def check_cache(cache: MPlusCache, what: str) -> None:
    """Refuse a cache that was never prefilled, or whose memory changed since its prefill (:class:`StaleCacheError`).
    Reads versions only: no device value, no host sync."""
    if not isinstance(cache, MPlusCache):
        raise TypeError(f"{what}: past_key_values must be an MPlusCache (model.new_cache()), got {type(cache)}")
    if cache.memory_version is None:
        raise ValueError(f"{what}: past_key_values was never prefilled: run model(prompt_ids, past_key_values=cache)")
    versions = [m.version for m in cache.memory] if isinstance(cache.memory, list) else cache.memory.version
    if cache.memory_version != versions:
        raise StaleCacheError(
            f"{what}: this generation cache was built on memory version {cache.memory_version}, but the memory "
            f"has changed since (now version {versions}: inject or load_memory); its memory segments "
            "are stale. Start a new generation (a new cache) to read the current memory."
        )


def prefill_segments(
    model: MPlusForCausalLM, layer_idx: int, layer: nn.Module, h: Tensor, cache: MPlusCache
) -> MemorySegments:
    """[short-term slots (cached K/V, slot order)] and [BOS ; retrieved long-term rows], with their positions, of
    layer ``layer_idx`` for the prefill of ``h [B, T, d]`` (the layer's input) over ``cache.memory``.

    The short-term memory is shared by the batch (an expand of the slots' K/V); each sequence retrieves its own
    long-term rows with its own queries (its padding excluded from the score's mean) and attends its own gathered
    segment. The long-term part is retrieved and gathered on the transfer engine's worker thread while this thread
    attends to the short-term memory and the chunk: a :class:`PendingSegment` the layer resolves last.
    """
    cfg, b, mem = model.config, h.shape[0], cache.memory
    k0, cos, sin = cfg.num_ltm_tokens, model.rope_cos, model.rope_sin
    states = mem if isinstance(mem, list) else [mem] * b
    if isinstance(mem, list):  # each row its own short-term memory: per-row segments (views, no stacking)
        stm = [(m.stm.k[layer_idx], m.stm.v[layer_idx], m.stm.pos[layer_idx] + (1 + k0)) for m in mem]
    else:
        stm = (mem.stm.k[layer_idx], mem.stm.v[layer_idx], mem.stm.pos[layer_idx] + (1 + k0))
    bos_k, bos_v = layer.memory_kv(model.bos_embedding[layer_idx])
    if not cfg.has_ltm:
        return layer_segments(stm, (bos_k, bos_v), cos, sin, b)
    queries = layer.self_attn.query_proj(layer.input_layernorm(h))
    pads = cache.pads or [0] * b

    def job() -> list:
        return [
            states[i].ltm.retrieve(layer_idx, queries[i, pads[i] :], mode=model.semantics, backend=model.backend,
                                   with_hidden=False)  # the store keeps each row's K/V: generation gathers those
            for i in range(b)
        ]  # fmt: skip

    def build(got: list):
        if _one_count(got):  # e.g. one shared store: the same count for every row
            return prefix_segment(bos_k, bos_v, [(g.k, g.v) for g in got], cos, sin)
        return [prefix_segment(bos_k, bos_v, [(g.k, g.v)], cos, sin) for g in got]  # stores of different sizes

    pending = PendingSegment(model.transfer.submit(f"ltm-layer{layer_idx}", job), build)
    return layer_segments(stm, pending, cos, sin, b)


def _one_count(got: list) -> bool:
    """Whether every row retrieved as many long-term rows (then one stacked segment, else one per row)."""
    return len({g.index.numel() for g in got}) == 1


def settle_segments(segments: MemorySegments, batch: int) -> tuple[MemorySegments, Tensor | list[Tensor] | None]:
    """After the prefill's layer ran: its segments with the pending one resolved (what the cache keeps for decoding),
    and the long-term rows it retrieved (``[K0]`` for one row, ``[B, K0]``, or a list of B when the counts differ;
    None without a long-term memory)."""
    retrieved = None
    for part in segments:
        if isinstance(part, PendingSegment):
            part.resolve()  # already resolved by the attention: this returns its cached segment
            got = part.result
            if _one_count(got):
                retrieved = got[0].index if batch == 1 else torch.stack([g.index for g in got])
            else:
                retrieved = [g.index for g in got]
    return segments.resolved(), retrieved


class MPlusGenerationMixin(GenerationMixin):
    """Generation for :class:`~mplus.model.MPlusForCausalLM` (the model provides ``forward``, ``resolve_memories``,
    ``rope``, ``layers``, ``adapters``, ``max_length``)."""

    @torch.no_grad()
    def decode_step(self, input_ids: Tensor, cache_position: Tensor, past_key_values: MPlusCache) -> Tensor:
        """One decode step with a static cache, for ``torch.compile(fullgraph=True)`` and CUDA graphs.

        ``input_ids [B, T]`` (usually T = 1) on the model's device; ``cache_position [T]`` int64 on the model's
        device: the cache rows of these tokens (after a prefill of P tokens the first step is ``[P]``);
        ``past_key_values``: the cache a prefill (``model(prompt)``) returned, holding the memory segments it
        retrieved. Returns fp32 logits ``[1, vocab]`` of the last token. Nothing here depends on a Python int that
        changes per step (positions are tensors, the cache is written with ``index_copy_``, the kernel gets the
        valid length as a tensor), so one compiled graph serves every step. The caller advances
        ``cache_position``; ``past_key_values.length`` is not advanced (use :meth:`forward` or this, not both).

        Recipe (README "Compiled decoding"): :meth:`compile_decode_step` compiles it behind the cache's version
        check; ``torch.compile(model.decode_step, fullgraph=True)`` works too but skips that check inside the graph.
        """
        self._check_adapter()
        if not torch.compiler.is_compiling():  # compiled: unchecked (a guard on the version recompiles per inject)
            self._check_step(input_ids, cache_position, past_key_values)
        return self._decode_step(input_ids, cache_position, past_key_values)

    def _check_adapter(self) -> None:
        if self.adapters.active != DECODER:
            raise RuntimeError(f"decode_step: the {DECODER!r} adapter must be active, not {self.adapters.active!r}")

    def _check_step(self, input_ids: Tensor, cache_position: Tensor, past_key_values: MPlusCache) -> None:
        check_cache(past_key_values, "decode_step")
        for name, t in [("input_ids", input_ids), ("cache_position", cache_position)]:
            if not isinstance(t, Tensor) or t.dtype.is_floating_point:
                raise TypeError(f"decode_step: {name} must be an integer tensor, got {getattr(t, 'dtype', type(t))}")

    def compile_decode_step(self, **compile_kwargs) -> Callable[[Tensor, Tensor, MPlusCache], Tensor]:
        """``torch.compile(decode_step, fullgraph=True, **compile_kwargs)`` with the eager checks kept outside the
        graph: every call first checks (in Python, no host sync) that the cache still matches the memory version
        (``StaleCacheError`` after an inject or a load), then runs the one compiled graph. On a GPU pass
        ``mode="reduce-overhead"`` for CUDA graphs::

            out = model(prompt_ids)                                # eager prefill: retrieval, memory segments
            cache, pos = out.past_key_values, torch.tensor([prompt_ids.shape[1]], device=device)
            step = model.compile_decode_step(mode="reduce-overhead")
            token = out.logits[:, -1].argmax(-1, keepdim=True)
            for _ in range(n):
                token = step(token, pos, cache).argmax(-1, keepdim=True)
                pos += 1
        """
        compiled = torch.compile(self._decode_step, fullgraph=True, **compile_kwargs)

        def step(input_ids: Tensor, cache_position: Tensor, past_key_values: MPlusCache) -> Tensor:
            self._check_adapter()
            self._check_step(input_ids, cache_position, past_key_values)
            return compiled(input_ids, cache_position, past_key_values)

        return step

    @torch.no_grad()
    def _decode_step(self, input_ids: Tensor, cache_position: Tensor, past_key_values: MPlusCache) -> Tensor:
        kv_start = past_key_values.kv_start
        pos = self.rope.at(self.config.memory_prefix_len + cache_position, kv_start)
        h = self.model.embed_tokens(input_ids)
        for layer_idx, layer in enumerate(self.layers):
            memories = past_key_values.memories[layer_idx]
            h = layer(h, pos, memories, past_key_values.layers[layer_idx], cache_position, kv_start=kv_start)
        return self.lm_head(self.model.norm(h[:, -1])).float()

    @torch.no_grad()
    def generate(self, inputs: Tensor | None = None, *args, memory: States | None = None, **kwargs):
        """Transformers' ``generate`` over ``memory`` (a :class:`MemoryState` shared by the batch, default the
        model's own; or a list of B states, one per row), holding their locks for reading for the whole call: an
        ``inject`` from another thread waits until this generation is done (and never changes a memory under it)."""
        if self.compute_device.type == "meta":
            raise ValueError(
                "generate: the model is on the meta device, which holds no values (generate reads the tokens it picks);"
                " use forward / decode_step on meta, generate on a real device"
            )
        ids = inputs if inputs is not None else kwargs.get("input_ids")
        # the prompts [B, T] (the memory is the context: no empty one)
        check_ids(ids, self.config.vocab_size, "generate", batch=True)
        mem = self.resolve_memories(memory, ids.shape[0], "generate")
        with read_locks(mem):
            return super().generate(inputs, *args, memory=mem, **kwargs)

    def _prepare_cache_for_generation(self, generation_config, model_kwargs, *args, **kwargs) -> None:
        """A request that cannot fit is refused before the prefill (not at the step that would overflow). The cache
        is the :class:`MPlusCache` the prefill allocates for the batch (the memory prefix is never copied per step).
        """
        if generation_config.max_length is not None and generation_config.max_length > self.max_length:
            raise ValueError(
                f"generate: up to {generation_config.max_length} tokens (prompt + max_new_tokens) exceed the "
                f"model's max_length={self.max_length}: lower max_new_tokens, or load with a larger max_length"
            )
        model_kwargs.setdefault("past_key_values", None)

    def prepare_inputs_for_generation(self, input_ids: Tensor, past_key_values: MPlusCache | None = None, **kwargs):
        if past_key_values is not None and past_key_values.length:
            input_ids = input_ids[:, past_key_values.length :]
        inputs = {"input_ids": input_ids, "past_key_values": past_key_values, "logits_to_keep": 1}
        return inputs | {"attention_mask": kwargs.get("attention_mask"), "memory": kwargs.get("memory")}
