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
from transformers.generation import GenerationMode

from mplus_kernels._utils import host_values

from .attention import KVCache
from .llama import RopeRows, check_ids
from .lora import DECODER
from .memory.state import MemoryState
from .segments import MemorySegments, PendingSegment, layer_segments, prefix_segment, rotated_segment

if TYPE_CHECKING:  # annotations only: mplus.model imports this module
    from .model import MPlusForCausalLM

__all__ = [
    "MPlusCache",
    "MPlusGenerationMixin",
    "StaleCacheError",
    "UNSUPPORTED_KEYWORDS",
    "check_cache",
    "check_labels",
    "forward_keywords",
    "left_padding",
    "prefill_segments",
    "read_locks",
    "same_states",
    "settle_segments",
]

States = MemoryState | list[MemoryState]

# transformers' model keywords mplus cannot honour, taken only unset (None / False: what callers pass by default) by
# forward and generate; refused by name, never silently ignored
UNSUPPORTED_KEYWORDS = {
    "output_attentions": "the fused memory attention never materialises attention weights",
    "position_ids": "positions follow the memory (each row's tokens sit after the memory prefix and its padding)",
    "cache_position": "the cache knows its length (decode_step takes cache_position for compiled decoding)",
    "inputs_embeds": "mplus embeds token ids itself (give input_ids)",
}
# what generate passes on to forward (transformers' model keywords; the rest of generate's are its generation config's)
GENERATE_KEYWORDS = ("input_ids", "attention_mask", "memory", "past_key_values", "use_cache", "output_hidden_states")
BEAM_MODES = (
    GenerationMode.BEAM_SEARCH,
    GenerationMode.BEAM_SAMPLE,
    GenerationMode.GROUP_BEAM_SEARCH,
    GenerationMode.CONSTRAINED_BEAM_SEARCH,
)
REFUSED_MODES = {
    GenerationMode.ASSISTED_GENERATION: "assisted decoding (assistant_model, prompt_lookup_num_tokens, "
    "assistant_early_exit, use_mtp): it rolls the cache back to the tokens it accepts, which MPlusCache does not do",
    GenerationMode.CONTRASTIVE_SEARCH: "contrastive search (penalty_alpha with top_k > 1): its candidates need the "
    "cache copied per candidate",
    GenerationMode.DOLA_GENERATION: "DoLa decoding (dola_layers): it reads early layers' hidden states through the "
    "head, which mplus's forward does not offer",
}


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
    use_memory: bool = True  # False: prefilled with model.use_memory = False (no memory segments, positions from 0)
    rotated_memory: bool = True  # the prefill kept its memory segments' keys rotated (model.rotate_decode_memory)
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
    if cache.use_memory and cache.memory_version != versions:  # a cache that bypassed the memory never goes stale
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
        of_state = {id(m): (m.stm.k[layer_idx], m.stm.v[layer_idx], m.stm.pos[layer_idx] + (1 + k0)) for m in mem}
        stm = [of_state[id(m)] for m in mem]  # a state serving several rows: the same tensors (one rotated copy)
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


def settle_segments(
    segments: MemorySegments, batch: int, rotate: bool = True, backend: str | None = None
) -> tuple[MemorySegments, Tensor | list[Tensor] | None]:
    """After the prefill's layer ran: its segments with the pending one resolved (what the cache keeps for decoding),
    and the long-term rows it retrieved (``[K0]`` for one row, ``[B, K0]``, or a list of B when the counts differ;
    None without a long-term memory).

    ``rotate``: the short-term segment is kept with its keys rotated once (:meth:`MemoryKV.rotated`), so that no
    decode step rotates them again: one rotated copy per layer and per distinct memory state (rows that share a
    state share it). The prefix [BOS ; long-term rows] keeps its keys before RoPE: it is each row's own, a fifth of
    the short-term rows at mplus-8b's sizes, and rotating it would cost a rotation per row at every prefill.
    ``backend``: the rotation's (``rotate_keys``), the model's kernels."""
    retrieved = None
    for part in segments:
        if isinstance(part, PendingSegment):
            part.resolve()  # already resolved by the attention: this returns its cached segment
            got = part.result
            if _one_count(got):
                retrieved = got[0].index if batch == 1 else torch.stack([g.index for g in got])
            else:
                retrieved = [g.index for g in got]
    segments = segments.resolved()
    if rotate:
        segments = MemorySegments((rotated_segment(segments[0], backend), *segments[1:]))
    return segments, retrieved


# transformers' forward keywords beyond mplus's own: the loss keywords a Trainer passes, and those taken only unset
# (UNSUPPORTED_KEYWORDS); anything else is refused by name
LOSS_KEYWORDS = ("num_items_in_batch", "shift_labels")


def forward_keywords(kwargs: dict) -> tuple[bool | None, dict]:
    """``forward``'s ``**kwargs`` checked: ``(return_dict, loss keywords)``; a keyword mplus would have to ignore
    is a ``ValueError`` naming it, an unknown one a ``TypeError``."""
    kwargs = dict(kwargs)
    return_dict = kwargs.pop("return_dict", None)
    if return_dict is not None and not isinstance(return_dict, bool):
        raise TypeError(f"forward: return_dict must be a bool or None, got {type(return_dict).__name__}")
    loss_kwargs = {name: kwargs.pop(name) for name in LOSS_KEYWORDS if name in kwargs}
    for name, why in UNSUPPORTED_KEYWORDS.items():
        value = kwargs.pop(name, None)
        if value is not None and value is not False:
            raise ValueError(f"forward: {name} is not supported: {why}")
    if kwargs:
        raise TypeError(
            f"forward: unexpected keyword argument(s) {sorted(kwargs)} (mplus refuses what it would ignore; see "
            "MPlusForCausalLM.forward)"
        )
    return return_dict, loss_kwargs


def check_labels(labels: Tensor, input_ids: Tensor, vocab_size: int, logits_to_keep: int) -> None:
    """``labels`` like ``input_ids`` (``[B, T]`` integers), each in ``[0, vocab_size)`` or -100 (ignored)."""
    if not isinstance(labels, Tensor) or labels.dtype not in (torch.int64, torch.int32):
        got = f"{labels.dtype}" if isinstance(labels, Tensor) else type(labels).__name__
        raise ValueError(f"forward: labels must be an int64 or int32 tensor [B, T] like input_ids, got {got}")
    if labels.shape != input_ids.shape:
        raise ValueError(
            f"forward: labels is {list(labels.shape)}, input_ids {list(input_ids.shape)}: give one per token"
        )
    if logits_to_keep:
        raise ValueError(f"forward: labels need every position's logits, not logits_to_keep={logits_to_keep}")
    if host_values(labels):
        bad = (labels != -100) & ((labels < 0) | (labels >= vocab_size))
        if bool(bad.any()):
            raise ValueError(f"forward: labels must be in [0, {vocab_size}) or -100 (ignored), got {labels[bad][0]}")


class MPlusGenerationMixin(GenerationMixin):
    """Generation for :class:`~mplus.model.MPlusForCausalLM` (the model provides ``forward``, ``resolve_memories``,
    ``rope``, ``layers``, ``adapters``, ``max_length``)."""

    def new_cache(self, max_tokens: int | None = None, batch_size: int = 1) -> MPlusCache:
        """An empty generation cache of ``batch_size`` sequences of up to ``max_tokens`` prompt (padding included) +
        generated tokens each (default ``max_length``)."""
        cap = self.max_length if max_tokens is None else max_tokens
        if not isinstance(cap, int) or cap <= 0:
            raise ValueError(f"new_cache: max_tokens={max_tokens!r} must be an int > 0 (or None: max_length)")
        if cap > self.max_length:
            raise ValueError(f"new_cache: {cap} tokens exceed max_length={self.max_length} (set it at load time)")
        cfg = self.config
        dtype, device = self.lm_head.weight.dtype, self.lm_head.weight.device
        if not isinstance(batch_size, int) or batch_size <= 0:
            raise ValueError(f"new_cache: batch_size={batch_size!r} must be an int > 0")
        layers = [
            KVCache.empty(batch_size, cap, cfg.num_key_value_heads, cfg.head_dim, dtype=dtype, device=device)
            for _ in range(cfg.num_hidden_layers)
        ]
        return MPlusCache(layers, [MemorySegments() for _ in layers], [None] * len(layers))

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

    def cache_rope(self, cache: MPlusCache) -> RopeRows:
        """The RoPE rows of ``cache``'s tokens: after the memory prefix, or from position 0 when the cache was
        prefilled with the memory bypassed (``model.use_memory = False``: positions as in the base model)."""
        prefix = self.config.memory_prefix_len if cache.use_memory else 0
        return RopeRows(self.rope_cos, self.rope_sin, prefix, self.max_length)

    @torch.no_grad()
    def _decode_step(self, input_ids: Tensor, cache_position: Tensor, past_key_values: MPlusCache) -> Tensor:
        kv_start = past_key_values.kv_start
        rope = self.cache_rope(past_key_values)
        pos = rope.at(rope.prefix + cache_position, kv_start)
        h = self.model.embed_tokens(input_ids)
        for layer_idx, layer in enumerate(self.layers):
            memories = past_key_values.memories[layer_idx]
            h = layer(h, pos, memories, past_key_values.layers[layer_idx], cache_position, kv_start=kv_start)
        return self.lm_head(self.model.norm(h[:, -1])).float()

    @torch.no_grad()
    def generate(
        self, inputs: Tensor | None = None, generation_config=None, *args, memory: States | None = None, **kwargs
    ):
        """Transformers' ``generate`` over ``memory`` (a :class:`MemoryState` shared by the batch, default the
        model's own; or a list of B states, one per row), holding their locks for reading for the whole call: an
        ``inject`` from another thread waits until this generation is done (and never changes a memory under it).

        Greedy decoding and sampling (``num_return_sequences`` samples over the same memory, a list of states
        repeated row by row), streamers, stopping criteria and logits processors work as for any causal LM. Refused by
        name rather than ignored: beam search (``num_beams > 1``: every beam would need its own memory state),
        assisted, contrastive and DoLa decoding, ``cache_implementation`` and caches other than :class:`MPlusCache`,
        ``prefill_chunk_size``, ``output_attentions``, ``position_ids`` and unknown model keywords."""
        if self.compute_device.type == "meta":
            raise ValueError(
                "generate: the model is on the meta device, which holds no values (generate reads the tokens it picks);"
                " use forward / decode_step on meta, generate on a real device"
            )
        ids = inputs if inputs is not None else kwargs.get("input_ids")
        # the prompts [B, T] (the memory is the context: no empty one)
        check_ids(
            ids, self.config.vocab_size, "generate", batch=True, name="inputs" if inputs is not None else "input_ids"
        )
        cache = kwargs.get("past_key_values")
        if cache is not None and not isinstance(cache, MPlusCache):
            raise TypeError(
                f"generate: past_key_values must be an MPlusCache (or None: generate makes one), got "
                f"{type(cache).__name__}: mplus attends its memory through its own cache"
            )
        # checked here too: transformers diverts cache_implementation="paged" before any hook mplus has
        _refuse_cache_implementation(kwargs.get("cache_implementation"))
        _refuse_cache_implementation(getattr(generation_config, "cache_implementation", None))
        mem = self.resolve_memories(memory, ids.shape[0], "generate")
        with read_locks(mem):
            return super().generate(inputs, generation_config, *args, memory=mem, **kwargs)

    def _get_deprecated_gen_repo(self, generation_mode, trust_remote_code, custom_generate=None):
        """transformers' first hook that sees the decoding mode (before it sends contrastive search or DoLa to a
        Hub repository): the modes mplus does not support are refused here, by name."""
        _refuse_mode(generation_mode)
        return super()._get_deprecated_gen_repo(generation_mode, trust_remote_code, custom_generate)

    def _validate_generation_mode(self, generation_mode, generation_config, generation_mode_kwargs) -> None:
        """transformers' hook with the final generation config: the options mplus supports."""
        _refuse_mode(generation_mode)
        _refuse_cache_implementation(generation_config.cache_implementation)
        if generation_config.prefill_chunk_size is not None:
            raise ValueError(
                f"generate: prefill_chunk_size={generation_config.prefill_chunk_size} is not supported: the prefill "
                "retrieves long-term rows with the whole prompt's queries (a chunk would retrieve with its own)"
            )
        if generation_config.output_attentions:
            raise ValueError(
                f"generate: output_attentions is not supported: {UNSUPPORTED_KEYWORDS['output_attentions']}"
            )
        super()._validate_generation_mode(generation_mode, generation_config, generation_mode_kwargs)

    def _validate_model_kwargs(self, model_kwargs: dict) -> None:
        """transformers' hook: the model keywords generate would pass on; what mplus would ignore is refused."""
        for name, value in model_kwargs.items():
            if value is None or value is False or name in GENERATE_KEYWORDS:
                continue
            if name in UNSUPPORTED_KEYWORDS:
                raise ValueError(f"generate: {name} is not supported: {UNSUPPORTED_KEYWORDS[name]}")
            raise ValueError(
                f"generate: keyword argument {name!r} is neither a generation option nor one mplus's forward takes "
                f"({', '.join(GENERATE_KEYWORDS)})"
            )

    def _expand_inputs_for_generation(self, expand_size: int = 1, is_encoder_decoder: bool = False,
                                      input_ids: Tensor | None = None, **model_kwargs):  # fmt: skip
        """``num_return_sequences`` copies of each row: a list of states (one per row) is repeated likewise (the
        states are shared, never copied)."""
        memory = model_kwargs.get("memory")
        if expand_size > 1 and isinstance(memory, list):
            model_kwargs["memory"] = [m for m in memory for _ in range(expand_size)]  # as repeat_interleave
        return super()._expand_inputs_for_generation(expand_size, is_encoder_decoder, input_ids, **model_kwargs)

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
        passed = {name: kwargs.get(name) for name in ("attention_mask", "memory")}
        return inputs | passed | {"output_hidden_states": bool(kwargs.get("output_hidden_states"))}


def _refuse_mode(mode: GenerationMode) -> None:
    """Greedy decoding and sampling only: a beam (and every other mode) would need the memory and cache per
    candidate."""
    if mode in BEAM_MODES:
        raise ValueError(
            f"generate: beam search (num_beams > 1: {mode.value}) is not supported: every beam would need its own "
            "copy of the memory state and a cache reordered at each step; use num_beams=1 (greedy, or "
            "do_sample=True with num_return_sequences=n for n samples over the memory)"
        )
    if mode in REFUSED_MODES:
        raise ValueError(f"generate: {REFUSED_MODES[mode]}; it is not supported")


def _refuse_cache_implementation(name: str | None) -> None:
    if name is not None:
        raise ValueError(
            f"generate: cache_implementation={name!r} is not supported: mplus generates with its own cache "
            "(MPlusCache: the memory prefix is attended in place, never copied per step); leave it unset"
        )
