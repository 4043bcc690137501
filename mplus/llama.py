"""The Llama network of M+ / MemoryLLM, gpt-fast style: norms, MLP, decoder layers, the stack, and RoPE rows.

Only the network: no memory state, no generation glue. A :class:`DecoderLayer`'s attention sees memory segments (keys
before RoPE, each with its positions; :mod:`mplus.segments`). Module and parameter names follow the official
checkpoint (``model.layers.{i}.self_attn.q_proj...``), so state dicts load unchanged.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import torch
from torch import Tensor, nn

from mplus_kernels._utils import host_values

from .attention import FusedMemoryAttention, KVCache
from .config import MPlusConfig
from .segments import Memory

__all__ = ["MLP", "DecoderLayer", "MPlusModel", "RMSNorm", "RopeRows", "check_ids", "rms_norm"]

Wrap = Callable[[nn.Linear], nn.Module]  # wraps a projection (the model's LoRA)
ProjectorFactory = Callable[[int, int, int, torch.dtype | None], nn.Module]  # (d, ds, layers, dtype) → projector


def rms_norm(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    """Llama's RMSNorm: fp32 variance, normalised value cast back to the input dtype, then scaled."""
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * xf.to(x.dtype)


class RMSNorm(nn.Module):
    def __init__(self, d: int, eps: float, dtype: torch.dtype | None = None) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(d, dtype=dtype))
        self.eps = eps

    def forward(self, x: Tensor) -> Tensor:
        return rms_norm(x, self.weight, self.eps)


class MLP(nn.Module):
    def __init__(self, config: MPlusConfig, lora: Wrap, dtype: torch.dtype | None) -> None:
        super().__init__()
        d, i = config.hidden_size, config.intermediate_size
        self.gate_proj = lora(nn.Linear(d, i, bias=config.mlp_bias, dtype=dtype))
        self.up_proj = lora(nn.Linear(d, i, bias=config.mlp_bias, dtype=dtype))
        self.down_proj = lora(nn.Linear(i, d, bias=config.mlp_bias, dtype=dtype))

    def forward(self, x: Tensor) -> Tensor:
        return self.down_proj(nn.functional.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nn.Module):
    """Llama decoder layer whose attention sees memory segments (keys before RoPE, each with its positions).

    ``lora`` wraps q/k/v and the MLP projections; ``projector(d, ds, layers, dtype)`` builds the M+ retriever
    projectors (``self_attn.query_proj``, ``key_proj``, ``encoder_query_proj``) when the config has a long-term
    memory — the model passes :class:`mplus.retriever.Projector` (passed in, so this module does not import the
    retriever, which imports :func:`rms_norm` from here). Modules are built in the official order: the random
    initialisation of a fresh model draws the same numbers as before the split.
    """

    def __init__(
        self,
        config: MPlusConfig,
        lora: Wrap,
        dtype: torch.dtype | None,
        backend: str | None,
        projector: ProjectorFactory | None = None,
    ) -> None:
        super().__init__()
        d = config.hidden_size
        self.input_layernorm = RMSNorm(d, config.rms_norm_eps, dtype)
        self.post_attention_layernorm = RMSNorm(d, config.rms_norm_eps, dtype)
        attn = FusedMemoryAttention.from_config(config, dtype=dtype, backend=backend)
        attn.q_proj, attn.k_proj, attn.v_proj = lora(attn.q_proj), lora(attn.k_proj), lora(attn.v_proj)
        if config.has_ltm:
            if projector is None:
                raise ValueError("DecoderLayer: a config with a long-term memory needs projector= (the retriever's)")
            ds, n = config.selector_hidden_dim, config.num_selector_layers
            attn.query_proj = projector(d, ds, n, dtype)
            attn.key_proj = projector(d, ds, n, dtype)
            if config.add_encoder_retriever:
                attn.encoder_query_proj = projector(d, ds, n, dtype)
        self.self_attn = attn
        self.mlp = MLP(config, lora, dtype)

    def memory_kv(self, rows: Tensor) -> tuple[Tensor, Tensor]:
        """Pre-RoPE K/V ``[M, Hkv, D]`` of memory rows ``[M, d]`` under the active adapter."""
        k, v = self.self_attn.project_memory(self.input_layernorm(rows)[None])
        return k[0], v[0]

    def retriever_keys(self, rows: Tensor) -> Tensor:
        """Retriever keys ``[M, ds]`` of memory rows ``[M, d]``: ``key_proj(input_layernorm(rows))`` (M+ only)."""
        return self.self_attn.key_proj(self.input_layernorm(rows))

    def forward(
        self,
        h: Tensor,
        pos: tuple[Tensor, Tensor],
        memories: Memory,
        cache: KVCache | None,
        cache_position: Tensor | None = None,
        kv_start: Tensor | None = None,
    ) -> Tensor:
        """``h [B, T, d]`` → ``[B, T, d]``; ``pos`` = the chunk's (cos, sin) ``[B or 1, T, D]``; ``memories``: the
        memory :meth:`FusedMemoryAttention.forward` takes (a :class:`~mplus.segments.MemorySegments`, whose pending
        segment is resolved after the others were attended); ``cache_position``: static-cache mode (see
        :meth:`~mplus.generation.MPlusGenerationMixin.decode_step`); ``kv_start [B]``: each row's first valid cache row
        (left padding)."""
        h = h + self.self_attn(
            self.input_layernorm(h), pos, memories, cache, cache_position=cache_position, kv_start=kv_start
        )
        return h + self.mlp(self.post_attention_layernorm(h))


class MPlusModel(nn.Module):
    """Embedding, decoder layers, final norm (the official ``model.`` prefix of the state dict)."""

    def __init__(
        self,
        config: MPlusConfig,
        lora: Wrap,
        dtype: torch.dtype | None,
        backend: str | None,
        projector: ProjectorFactory | None = None,
    ) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, dtype=dtype)
        self.layers = nn.ModuleList(
            DecoderLayer(config, lora, dtype, backend, projector) for _ in range(config.num_hidden_layers)
        )
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps, dtype)


@dataclasses.dataclass
class RopeRows:
    """(cos, sin) rows in the Hugging Face layout (``[..., T, D]``: the half tables repeated) for chunk tokens.

    ``cos, sin [P, D/2]`` fp32 (:func:`mplus.attention.rope_tables`); ``prefix``: the position of cache row 0 (the
    memory prefix: BOS, the long-term rows, the short-term rows); ``max_length``: what the error names when a
    position runs past the table.
    """

    cos: Tensor
    sin: Tensor
    prefix: int
    max_length: int

    def check_range(self, end: int) -> None:
        """Refuse positions up to ``end`` (exclusive) past the table."""
        if end > self.cos.shape[0]:
            raise ValueError(
                f"positions up to {end} exceed the RoPE table ({self.cos.shape[0]}): raise "
                f"max_length (now {self.max_length})"
            )

    def chunk(self, start: int, t: int) -> tuple[Tensor, Tensor]:
        """Positions ``start .. start+t-1`` (absolute: no prefix added) → ``[1, T, D]`` each."""
        self.check_range(start + t)
        cos, sin = self.cos[start : start + t], self.sin[start : start + t]
        return torch.cat([cos, cos], -1)[None], torch.cat([sin, sin], -1)[None]

    def rows(self, start: int, t: int, kv_start: Tensor | None) -> tuple[Tensor, Tensor]:
        """Cache rows ``start .. start+t-1``: ``[1, T, D]``, or ``[B, T, D]`` with left padding ``kv_start [B]``
        (see :meth:`at`)."""
        if kv_start is None:
            return self.chunk(self.prefix + start, t)
        self.check_range(self.prefix + start + t)  # padding only lowers positions
        return self.at(self.prefix + torch.arange(start, start + t, device=kv_start.device), kv_start)

    def at(self, positions: Tensor, kv_start: Tensor | None) -> tuple[Tensor, Tensor]:
        """``[1 or B, T, D]`` of the cache rows at ``positions [T]`` (memory prefix included; a tensor: no host
        value, so one compiled graph serves every decode step). With left padding ``kv_start [B]``, row b's tokens
        sit at positions counted from its first valid row (padding rows: the first position after the prefix)."""
        if kv_start is None:
            positions = positions[None]
        else:
            positions = (positions[None] - kv_start[:, None].long()).clamp_min(self.prefix)
        cos, sin = self.cos[positions], self.sin[positions]
        return torch.cat([cos, cos], -1), torch.cat([sin, sin], -1)


ID_DTYPES = (torch.int64, torch.int32)  # what the embedding takes (bool and uint8 would index it wrongly or fail)


def check_ids(ids: Tensor, vocab_size: int, what: str, batch: bool = False, name: str = "") -> None:
    """Refuse anything but integer token ids ``[1, T]`` (``[B, T]`` with ``batch``): a torch.Tensor of int64 or
    int32, T ≥ 1, in ``[0, vocab_size)`` (the range is read only where that needs no host sync;
    ``MPLUS_DEBUG_CHECKS=1`` reads device ids too). ``name``: the argument the errors name (e.g. ``input_ids``)."""
    shape = "[B, T]" if batch else "[1, T]"
    if not isinstance(ids, Tensor) or ids.dim() != 2 or ids.dtype not in ID_DTYPES:
        kind = type(ids)
        got = f"{ids.dtype} {list(ids.shape)}" if isinstance(ids, Tensor) else f"a {kind.__module__}.{kind.__name__}"
        raise ValueError(
            f"{what}: expected integer token ids {name + ' ' if name else ''}{shape} (a torch.Tensor of int64 or "
            f"int32), got {got}"
        )
    if ids.shape[0] == 0:
        raise ValueError(f"{what}: empty batch (B = 0)")
    if ids.shape[0] != 1 and not batch:
        raise ValueError(f"{what}: batch size {ids.shape[0]} is not supported (M+ memory is per sequence: use 1)")
    if ids.shape[1] == 0:
        raise ValueError(f"{what}: empty input (T = 0)")
    if host_values(ids):
        lo, hi = (int(x) for x in torch.aminmax(ids))
        if lo < 0 or hi >= vocab_size:
            raise ValueError(f"{what}: token ids must be in [0, {vocab_size}), got range [{lo}, {hi}]")
