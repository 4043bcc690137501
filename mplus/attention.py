"""``FusedMemoryAttention``: Llama attention whose queries see a latent memory, on the mplus kernel; and
``FusedLlamaAttention``, its drop-in form for transformers' ``LlamaAttention``.

M+ attention per layer (SPEC.md §3.1): the chunk's queries attend to a memory prefix that every query sees (BOS, the
retrieved long-term rows, the short-term rows) and to the chunk itself, bottom-right causal. The memory keys are kept
*before* RoPE (one cache row per memory slot, :class:`MemoryKV`) and rotated inside the kernel by a per-row position,
so updating a slot never invalidates the cached keys of the others, and no ``[memory ; chunk]`` concatenation, mask
tensor or ``repeat_kv`` is ever built. The memory comes as segments (:mod:`mplus.segments`: ``MemoryKV``,
``MemorySegments``, ``PendingSegment``), attended apart and merged exactly through their LSE.

The modules keep Llama's parameter names (``q_proj``, ``k_proj``, ``v_proj``, ``o_proj``), so official M+ and Hugging
Face state dicts load unchanged. :meth:`FusedMemoryAttention.from_llama` wraps an existing ``LlamaAttention`` without
copying its weights into a :class:`FusedLlamaAttention`, which takes ``LlamaAttention``'s place in a stock
``LlamaDecoderLayer`` (its calling convention, its cache, its masks).

Importing this module registers the ``"mplus"`` attention implementation with transformers (:mod:`mplus.hf_attention`),
so a stock ``LlamaForCausalLM`` runs its attention through the mplus kernel with ``attn_implementation="mplus"``.
"""

from __future__ import annotations

import dataclasses
import math

import torch
from torch import Tensor, nn

from mplus_kernels._utils import check_tensor
from mplus_kernels.attention import memory_attention, merge_attention_states, rotate_half

from .hf_attention import (
    attend_with_mask,
    mplus_attention_forward,
    mplus_attention_mask,
    refuse_unsupported,
    register_with_transformers,
)
from .segments import Memory, MemoryKV, MemorySegments, PendingSegment, as_segments

__all__ = [
    "FusedLlamaAttention",
    "FusedMemoryAttention",
    "KVCache",
    "MemoryKV",
    "MemorySegments",
    "PendingSegment",
    "mplus_attention_forward",
    "mplus_attention_mask",
    "register_with_transformers",
    "rope_tables",
]


def rope_tables(inv_freq: Tensor, num_positions: int, attention_scaling: float = 1.0) -> tuple[Tensor, Tensor]:
    """RoPE tables ``(cos, sin)``, each ``[num_positions, D/2]`` fp32: row p = ``cos/sin(p · inv_freq) · scaling``.

    ``inv_freq [D/2]`` as the model's rotary embedding holds it (bf16-rounded when reproducing the official M+ run,
    SPEC.md §3.2: the angles are still formed in fp32). Row p equals the first half of what
    ``LlamaRotaryEmbedding`` returns for position p (before its cast to the model dtype).
    """
    angles = torch.arange(num_positions, dtype=torch.float32, device=inv_freq.device)[:, None] * inv_freq.float()
    return angles.cos() * attention_scaling, angles.sin() * attention_scaling


@dataclasses.dataclass
class KVCache:
    """A preallocated per-layer cache of the chunk tokens' keys (after RoPE) and values.

    Attributes:
        k, v: ``[B, S_max, Hkv, D]`` storage (may be views into a larger buffer).
        length: rows already valid; :meth:`FusedMemoryAttention.forward` writes the next ``T`` rows and advances it.
    """

    k: Tensor
    v: Tensor
    length: int = 0

    @classmethod
    def empty(
        cls,
        batch: int,
        max_len: int,
        num_kv_heads: int,
        head_dim: int,
        *,
        dtype: torch.dtype,
        device: torch.device | str | None = None,
    ) -> KVCache:
        shape = (batch, max_len, num_kv_heads, head_dim)
        if not all(isinstance(x, int) and x >= 0 for x in shape):
            raise ValueError(f"KVCache.empty: batch, max_len, num_kv_heads, head_dim must be ints >= 0, got {shape}")
        return cls(torch.empty(shape, dtype=dtype, device=device), torch.empty(shape, dtype=dtype, device=device))

    def append(self, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """Write ``k, v [B, T, Hkv, D]`` at ``length``; return views of all valid rows ``[B, length + T, Hkv, D]``."""
        if k.shape != v.shape or k.dim() != 4:
            raise ValueError(
                f"KVCache.append: k and v must both be [B, T, Hkv, D], got {list(k.shape)}, {list(v.shape)}"
            )
        b, t, hkv, d = k.shape
        cap_b, cap, cap_h, cap_d = self.k.shape
        if (b, hkv, d) != (cap_b, cap_h, cap_d):
            raise ValueError(
                f"KVCache.append: rows [B={b}, T, Hkv={hkv}, D={d}] do not fit the cache {list(self.k.shape)}"
            )
        end = self.length + t
        if end > cap:
            raise ValueError(f"KVCache.append: {self.length} + {t} rows exceed the cache capacity S_max={cap}")
        self.k[:, self.length : end] = k
        self.v[:, self.length : end] = v
        self.length = end
        return self.k[:, :end], self.v[:, :end]


class FusedMemoryAttention(nn.Module):
    """Llama attention (GQA, RoPE, no dropout) over ``[memory ; chunk]`` through ``mplus_kernels.memory_attention``.

    Two calling conventions, one per class, so that no call is ever read two ways:

    * this class: the M+ convention of mplus' own model (``mplus.llama.DecoderLayer`` calls
      ``self_attn(h, (cos, sin), memory, kv_cache, cache_position=..., kv_start=...)``) — :meth:`forward` below,
      returning the output tensor (and the LSE when asked);
    * :class:`FusedLlamaAttention` (what :meth:`from_llama` returns): transformers' ``LlamaAttention`` convention
      (keyword arguments ``hidden_states``, ``position_embeddings``, ``attention_mask``, ``past_key_values``, ...,
      returning ``(attn_output, None)``), a drop-in for ``layer.self_attn`` of a stock ``LlamaForCausalLM``. It keeps
      this class's M+ forward as :meth:`FusedLlamaAttention.attend`.

    Telling the conventions apart by the keywords a call happens to carry would make the return type depend on them
    (a tensor or a tuple) and read a positional ``attention_mask`` as a memory; a class per convention cannot.

    Args:
        hidden_size: model width d (Llama-3.1-8B: 4096).
        num_heads: query heads Hq (32). num_kv_heads: key/value heads Hkv (8), ``Hq % Hkv == 0``.
        head_dim: D (default ``hidden_size // num_heads``; 128).
        bias: biases on q/k/v/o projections (Llama's ``attention_bias``).
        layer_idx: the decoder layer index (kept for callers; the module itself does not use it).
        softmax_scale: default ``1/sqrt(D)``.
        backend: ``auto`` / ``cpp`` / ``triton`` / ``reference`` for the attention kernel (None: ``MPLUS_BACKEND``).
    """

    def __init__(
        self,
        hidden_size: int,
        num_heads: int,
        num_kv_heads: int,
        head_dim: int | None = None,
        *,
        bias: bool = False,
        layer_idx: int | None = None,
        softmax_scale: float | None = None,
        backend: str | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        head_dim = head_dim or hidden_size // num_heads
        if num_kv_heads <= 0 or num_heads % num_kv_heads:
            raise ValueError(f"num_heads={num_heads} must be a positive multiple of num_kv_heads={num_kv_heads}")
        self.hidden_size = hidden_size
        self.num_heads = num_heads
        self.num_kv_heads = num_kv_heads
        self.head_dim = head_dim
        self.layer_idx = layer_idx
        self.scaling = 1.0 / math.sqrt(head_dim) if softmax_scale is None else softmax_scale
        self.backend = backend
        kw = {"device": device, "dtype": dtype}
        self.q_proj = nn.Linear(hidden_size, num_heads * head_dim, bias=bias, **kw)
        self.k_proj = nn.Linear(hidden_size, num_kv_heads * head_dim, bias=bias, **kw)
        self.v_proj = nn.Linear(hidden_size, num_kv_heads * head_dim, bias=bias, **kw)
        self.o_proj = nn.Linear(num_heads * head_dim, hidden_size, bias=bias, **kw)

    @classmethod
    def from_config(cls, config, layer_idx: int | None = None, **kwargs) -> FusedMemoryAttention:
        """Build from a ``LlamaConfig`` (``hidden_size``, heads, ``head_dim``, ``attention_bias``)."""
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        return cls(
            config.hidden_size,
            config.num_attention_heads,
            config.num_key_value_heads,
            head_dim,
            bias=getattr(config, "attention_bias", False),
            layer_idx=layer_idx,
            **kwargs,
        )

    @classmethod
    def from_llama(cls, attn: nn.Module, *, backend: str | None = None) -> FusedLlamaAttention:
        """Wrap a ``LlamaAttention`` into its drop-in :class:`FusedLlamaAttention` (transformers' calling
        convention; the M+ one as :meth:`FusedLlamaAttention.attend`): the new module *shares* its projection modules
        (no weight copy), its ``layer_idx`` (the cache layer it updates), ``scaling``, ``is_causal`` and
        ``attention_dropout``."""
        q_out, hidden = attn.q_proj.weight.shape
        head_dim = attn.head_dim
        new = FusedLlamaAttention.__new__(FusedLlamaAttention)
        nn.Module.__init__(new)
        new.hidden_size = hidden
        new.num_heads = q_out // head_dim
        new.num_kv_heads = attn.k_proj.weight.shape[0] // head_dim
        new.head_dim = head_dim
        new.layer_idx = getattr(attn, "layer_idx", None)
        new.scaling = float(getattr(attn, "scaling", head_dim**-0.5))
        new.backend = backend
        new.q_proj, new.k_proj, new.v_proj, new.o_proj = attn.q_proj, attn.k_proj, attn.v_proj, attn.o_proj
        new.is_causal = bool(getattr(attn, "is_causal", True))
        new.attention_dropout = float(getattr(attn, "attention_dropout", 0.0))
        return new

    def project_memory(self, memory_hidden: Tensor) -> tuple[Tensor, Tensor]:
        """Memory keys (before RoPE) and values of normalised memory rows.

        ``memory_hidden [B, M, d]`` (already through the layer's input RMSNorm) → ``k, v [B, M, Hkv, D]``, what
        :class:`MemoryKV` caches per memory slot.
        """
        b, m, _ = memory_hidden.shape
        shape = (b, m, self.num_kv_heads, self.head_dim)
        return self.k_proj(memory_hidden).view(shape), self.v_proj(memory_hidden).view(shape)

    def forward(
        self,
        hidden_states: Tensor,
        position_embeddings: tuple[Tensor, Tensor],
        memory: Memory = None,
        kv_cache: KVCache | None = None,
        return_lse: bool = False,
        cache_position: Tensor | None = None,
        kv_start: Tensor | None = None,
    ) -> Tensor | tuple[Tensor, Tensor]:
        """Attention output of a chunk.

        Args:
            hidden_states: ``[B, T, d]`` the chunk (already through the input RMSNorm).
            position_embeddings: ``(cos, sin)``, each ``[B, T, D]`` (or ``[1, T, D]``), the chunk's RoPE in the Hugging
                Face convention (``LlamaRotaryEmbedding`` output).
            memory: the layer's memory (keys before RoPE), seen by every query; None for plain causal attention.
                One :class:`MemoryKV`, or disjoint segments in order — a :class:`MemorySegments` or a plain list
                (e.g. short-term slots; BOS + retrieved long-term rows): the first is attended together with the
                chunk, each other one alone, and the partial results are merged exactly through their LSE, so the
                segments are never concatenated. A segment is a ``MemoryKV``, a list of B ``MemoryKV`` of batch 1
                (each row its own memory), or a :class:`PendingSegment` (one still being fetched), resolved only
                after the segments before it were attended; ``memory`` itself is never modified (the pending
                segment caches what it resolved to). Anything else is a ``TypeError``.
            kv_cache: a preallocated cache of past chunk tokens; this chunk's rotated keys/values are appended and the
                queries attend to all valid cache rows (bottom-right causal), then to nothing else of the past.
            return_lse: also return the natural-log LSE ``[B, Hq, T]`` fp32 (to merge with other partial attentions).
            cache_position: ``[T]`` int64 *tensor*, the cache rows of this chunk (static-cache mode, for a compiled or
                CUDA-graph decode step): the rows are written there and the queries attend to the cache's first
                ``cache_position[-1] + 1`` rows, passed to the kernel as a device tensor (``kv_len``), so no Python
                int changes from one step to the next. ``kv_cache.length`` is not read or advanced.
            kv_start: ``[B]`` int32 tensor, each row's first valid chunk key (left padding, like flash-attn's
                ``cache_leftpad``): the keys before it are invisible to every query. The memory is seen by all.

        Returns:
            ``[B, T, d]`` (after ``o_proj``), and ``lse [B, Hq, T]`` when ``return_lse``.
        """
        self._check_inputs(hidden_states, position_embeddings)
        if cache_position is not None:
            check_tensor("FusedMemoryAttention", "cache_position", cache_position)
        segments = as_segments(memory)
        q, k, v = self._rotated_qkv(hidden_states, position_embeddings)
        b, t = q.shape[:2]
        kv_len = None
        if cache_position is not None:
            if kv_cache is None:
                raise ValueError("FusedMemoryAttention: cache_position needs a kv_cache (static-cache mode)")
            kv_cache.k.index_copy_(1, cache_position, k)
            kv_cache.v.index_copy_(1, cache_position, v)
            k, v = kv_cache.k, kv_cache.v
            kv_len = (cache_position[-1:] + 1).to(torch.int32).expand(b).contiguous()
        elif kv_cache is not None:
            k, v = kv_cache.append(k, v)
        if not segments:
            out, lse = memory_attention(
                q, k, v, softmax_scale=self.scaling, causal=True, backend=self.backend, kv_len=kv_len, kv_start=kv_start
            )
        for i, segment in enumerate(segments):
            if isinstance(segment, PendingSegment):  # reached only now: its fetch overlapped the segments before it
                segment = segment.resolve()
            chunk_k, chunk_v, lens, start = (k, v, kv_len, kv_start) if i == 0 else (k[:, :0], v[:, :0], None, None)
            if isinstance(segment, MemoryKV):
                o, s = self._attend(q, chunk_k, chunk_v, segment, lens, start)
            else:  # one MemoryKV per batch row (rows with memories of their own): one call per row, no stacking copy
                if len(segment) != b:
                    raise ValueError(f"FusedMemoryAttention: a per-row memory segment has {len(segment)} rows, B={b}")
                rows = [
                    self._attend(q[r : r + 1], chunk_k[r : r + 1], chunk_v[r : r + 1], seg,
                                 None if lens is None else lens[r : r + 1], None if start is None else start[r : r + 1])
                    for r, seg in enumerate(segment)
                ]  # fmt: skip
                o, s = torch.cat([x for x, _ in rows]), torch.cat([y for _, y in rows])
            out, lse = (o, s) if i == 0 else merge_attention_states(out, lse, o, s, backend=self.backend)
        y = self.o_proj(out.reshape(b, t, self.num_heads * self.head_dim))
        return (y, lse) if return_lse else y

    def _check_inputs(self, hidden_states: Tensor, position_embeddings: tuple[Tensor, Tensor]) -> None:
        check_tensor(type(self).__name__, "hidden_states", hidden_states)
        if hidden_states.dim() != 3 or hidden_states.shape[-1] != self.q_proj.in_features:
            raise ValueError(
                f"{type(self).__name__}: hidden_states must be [B, T, d={self.q_proj.in_features}], got "
                f"{list(hidden_states.shape)}"
            )
        if not isinstance(position_embeddings, (tuple, list)) or len(position_embeddings) != 2:
            raise TypeError(
                f"{type(self).__name__}: position_embeddings must be the pair (cos, sin) of [B, T, D] tensors"
            )

    def _rotated_qkv(self, hidden_states: Tensor, position_embeddings: tuple[Tensor, Tensor]) -> tuple[Tensor, ...]:
        """``hidden_states [B, T, d]`` → ``q [B, T, Hq, D]``, ``k, v [B, T, Hkv, D]``, q and k rotated by
        ``position_embeddings`` (cos, sin ``[B or 1, T, D]``, the Hugging Face convention); checked inputs."""
        b, t, _ = hidden_states.shape
        q = self.q_proj(hidden_states).view(b, t, self.num_heads, self.head_dim)
        k = self.k_proj(hidden_states).view(b, t, self.num_kv_heads, self.head_dim)
        v = self.v_proj(hidden_states).view(b, t, self.num_kv_heads, self.head_dim)
        cos, sin = position_embeddings
        cos = cos.to(q.dtype).unsqueeze(2)  # [B, T, 1, D]
        sin = sin.to(q.dtype).unsqueeze(2)
        return q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin, v

    def _attend(self, q, k, v, segment: MemoryKV, kv_len, kv_start) -> tuple[Tensor, Tensor]:
        return memory_attention(
            q, k, v, segment.k, segment.v, segment.positions, segment.rope_cos, segment.rope_sin,
            softmax_scale=self.scaling, causal=True, backend=self.backend, kv_len=kv_len, kv_start=kv_start,
        )  # fmt: skip

    def extra_repr(self) -> str:
        return (
            f"hidden_size={self.hidden_size}, num_heads={self.num_heads}, num_kv_heads={self.num_kv_heads}, "
            f"head_dim={self.head_dim}, backend={self.backend or 'MPLUS_BACKEND/auto'}"
        )


class FusedLlamaAttention(FusedMemoryAttention):
    """The drop-in for transformers' ``LlamaAttention`` on the mplus kernel (made by
    :meth:`FusedMemoryAttention.from_llama`, or ``FusedLlamaAttention.from_config(config, layer_idx)``).

    Put in ``layer.self_attn`` of a stock ``LlamaForCausalLM`` (any ``attn_implementation``), it takes the layer's
    call — keyword arguments ``hidden_states``, ``position_embeddings``, ``attention_mask``, ``past_key_values`` (or
    the older ``past_key_value``), ``cache_position``, ``position_ids``, ``use_cache``, ``**kwargs`` — updates the
    transformers ``Cache`` through its ``update`` (dynamic or static) and returns ``(attn_output, None)``, with
    ``LlamaAttention`` + SDPA's results. The mask is read as :func:`mplus.hf_attention.read_attention_mask` reads it:
    the compact masks of ``attn_implementation="mplus"`` (fastest), or the 4-D masks sdpa and eager build (checked
    once per forward: one host sync), each run as a key range per row (left padding) or as packed sequences, and
    refused when it is anything else. With a static cache the valid keys end at the cache's length (its
    ``get_seq_length``, a device tensor): nothing is read on the host. Refused like ``attn_implementation="mplus"``:
    ``output_attentions``, dropout in training, sliding windows and the rest (``ValueError`` naming the argument).

    ``cache_position``, ``position_ids`` and ``use_cache`` are accepted and not read: the positions are in
    ``position_embeddings``, and the cache and the mask say which keys each query sees.

    The M+ convention (memory segments, :class:`KVCache`, LSE) stays available as :meth:`attend`, the inherited
    :meth:`FusedMemoryAttention.forward`.
    """

    is_causal: bool = True
    attention_dropout: float = 0.0

    attend = FusedMemoryAttention.forward  # the M+ convention under its own name (forward is transformers' here)

    def forward(
        self,
        hidden_states: Tensor,
        position_embeddings: tuple[Tensor, Tensor] | None = None,
        attention_mask: Tensor | None = None,
        past_key_values=None,
        cache_position: Tensor | None = None,  # accepted for callers of older transformers
        position_ids: Tensor | None = None,  # the positions are in position_embeddings
        use_cache: bool | None = None,  # the cache object decides
        past_key_value=None,
        **kwargs,
    ) -> tuple[Tensor, None]:
        """``hidden_states [B, T, d]`` (after the input RMSNorm), ``position_embeddings`` (cos, sin) → ``(out [B, T,
        d], None)``; ``past_key_values``: a transformers ``Cache`` (updated at ``layer_idx``), or None."""
        refuse_unsupported(self.attention_dropout if self.training else 0.0, kwargs)
        if position_embeddings is None:
            raise ValueError(f"{type(self).__name__}: position_embeddings (cos, sin) are required (as LlamaAttention)")
        self._check_inputs(hidden_states, position_embeddings)
        q, k, v = self._rotated_qkv(hidden_states, position_embeddings)
        cache = past_key_values if past_key_values is not None else past_key_value
        cache_len = None
        if cache is not None:  # the cache keeps transformers' [B, Hkv, T, D] layout; the kernel takes the views
            k, v = cache.update(k.transpose(1, 2), v.transpose(1, 2), self.layer_idx)
            k, v = k.transpose(1, 2), v.transpose(1, 2)
            cache_len = cache.get_seq_length(self.layer_idx)  # a static cache: a device tensor, not read here
        is_causal = kwargs.get("is_causal")
        out = attend_with_mask(
            q, k, v, attention_mask, softmax_scale=self.scaling, backend=self.backend, cache_len=cache_len,
            causal=bool(self.is_causal if is_causal is None else is_causal),
            cu_seq_lens=(kwargs.get("cu_seq_lens_q"), kwargs.get("cu_seq_lens_k")),
        )  # fmt: skip
        b, t = q.shape[:2]
        return self.o_proj(out.reshape(b, t, self.num_heads * self.head_dim)), None
