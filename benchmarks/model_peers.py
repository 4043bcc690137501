"""The model-level peers of the benchmarks (issue 22, item 5): what M+ is measured against besides its own reference.

* :func:`plain_llama` — a plain ``transformers.LlamaForCausalLM`` of the M+ model's widths and layers, sharing its
  base weights (embedding, norms, the ``base_layer`` of every LoRA projection, ``lm_head``: no copy, so the same
  network without the memory), SDPA attention (``attn_implementation="sdpa"``) and transformers' own KV cache
  (``DynamicCache``). M+'s time over this one's is the overhead the project exists to shrink. With ``lora=True``
  the LoRA projections themselves are shared (the active adapter applies): a LoRA fine-tuning step of the same
  trainable set, for the training benchmark.
* :func:`official_attention` — the M+ model with its attention computed as the official ``modeling_mplus.py``'s SDPA
  path does (SPEC.md P9, P15): per layer and per forward, rotate the memory keys (in the model dtype), concatenate
  ``[memory ; chunk]`` (``torch.cat``), ``repeat_kv`` to all query heads, build a boolean prefix + bottom-right causal
  mask and call ``torch.nn.functional.scaled_dot_product_attention``; in decoding the concatenation is rebuilt at
  every step (as the official ``DynamicCache`` ``torch.cat`` does, P10). Everything else (projections, MLP,
  retrieval, the memory update of an inject) stays on the model's mplus kernels, and the memory K/V are the model's
  cached pre-RoPE rows: the official code also recomputes them from the memory's hidden states at every prefill (P8:
  the input norm and K/V projections of 12,801 rows per layer), which this peer does not — it is a lower bound of the
  official model's cost, isolating the attention. The official code runs batch 1 only (SPEC.md Q11); for the serving
  benchmark's batches the same computation runs batched (a shared memory expanded to every row, each row's own
  memory stacked), with each row's left padding masked.
"""

from __future__ import annotations

import contextlib
import types
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import Tensor
from transformers import LlamaConfig, LlamaForCausalLM
from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

from mplus.attention import FusedMemoryAttention, KVCache
from mplus.lora import LoRALinear
from mplus.model import MPlusForCausalLM
from mplus.segments import Memory, PendingSegment, as_segments
from mplus_kernels.attention.reference import apply_rope

__all__ = ["llama_weight_bytes", "official_attention", "plain_llama"]


def plain_llama(model: MPlusForCausalLM, *, lora: bool = False) -> LlamaForCausalLM:
    """A ``LlamaForCausalLM`` (SDPA attention) with ``model``'s config and its base weights, shared (no copy).

    Built on the meta device (nothing allocated, nothing initialised), then every parameter is set to the M+
    model's: ``model.layers.{i}.self_attn.q_proj.weight`` ← ``...q_proj.base_layer.weight`` and so on. With
    ``lora=True`` each LoRA-wrapped projection is the M+ model's ``LoRALinear`` itself (its active adapter applies)."""
    cfg = model.config
    llama_cfg = LlamaConfig(
        vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_hidden_layers, num_attention_heads=cfg.num_attention_heads,
        num_key_value_heads=cfg.num_key_value_heads, head_dim=cfg.head_dim, rms_norm_eps=cfg.rms_norm_eps,
        rope_parameters=dict(cfg.rope_parameters), max_position_embeddings=cfg.max_position_embeddings,
        attention_bias=cfg.attention_bias, mlp_bias=cfg.mlp_bias, tie_word_embeddings=False,
        bos_token_id=None, eos_token_id=None, pad_token_id=None,
    )  # fmt: skip
    llama_cfg._attn_implementation = "sdpa"
    with torch.device("meta"):
        llama = LlamaForCausalLM(llama_cfg)
    theirs = dict(model.named_modules())
    for name, module in list(llama.named_modules()):
        source = theirs.get(name)
        if lora and isinstance(source, LoRALinear):
            parent, _, child = name.rpartition(".")
            setattr(llama.get_submodule(parent), child, source)
            continue
        for pname, _ in list(module.named_parameters(recurse=False)):
            if isinstance(source, LoRALinear):
                source = source.base_layer
            if source is None or not hasattr(source, pname):
                raise ValueError(f"plain_llama: no weight for {name}.{pname} in the M+ model")
            setattr(module, pname, getattr(source, pname))
    with torch.device(model.lm_head.weight.device):
        llama.model.rotary_emb = LlamaRotaryEmbedding(llama_cfg)  # its inv_freq buffers, computed for real
    left = [n for n, t in [*llama.named_parameters(), *llama.named_buffers()] if t.is_meta]
    if left:
        raise ValueError(f"plain_llama: left on the meta device: {left}")
    return llama.eval()


def llama_weight_bytes(llama: LlamaForCausalLM) -> int:
    """Bytes of the weights one decode step reads: every parameter but the embedding table (one row of it)."""
    embed = llama.model.embed_tokens.weight
    return sum(p.numel() * p.element_size() for p in llama.parameters() if p is not embed)


def _repeat_kv(t: Tensor, group: int) -> Tensor:
    """transformers' ``repeat_kv``: ``[B, Hkv, S, D]`` → ``[B, Hkv·group, S, D]``, materialised."""
    b, h, s, d = t.shape
    return t[:, :, None].expand(b, h, group, s, d).reshape(b, h * group, s, d)


def _official_forward(
    self: FusedMemoryAttention,
    hidden_states: Tensor,
    position_embeddings: tuple[Tensor, Tensor],
    memory: Memory = None,
    kv_cache: KVCache | None = None,
    return_lse: bool = False,
    cache_position: Tensor | None = None,
    kv_start: Tensor | None = None,
) -> Tensor:
    """:meth:`FusedMemoryAttention.forward`'s contract, computed as the official SDPA path does (module docstring)."""
    if return_lse or cache_position is not None:
        raise NotImplementedError("official_attention: no LSE and no static cache (decode_step) in the official path")
    q, k, v = self._rotated_qkv(hidden_states, position_embeddings)
    b, tq = q.shape[:2]
    if kv_cache is not None:
        k, v = kv_cache.append(k, v)
    tk = k.shape[1]
    mem_k, mem_v = [], []
    for segment in as_segments(memory):
        if isinstance(segment, PendingSegment):
            segment = segment.resolve()
        rows = segment if isinstance(segment, list) else [segment]  # a list: each batch row its own memory
        # keys rotated at every call (the official prefill), or as the decode cache holds them (rotated: positions None)
        seg_k = torch.cat([s.k if s.positions is None else apply_rope(s.k, s.positions, s.rope_cos, s.rope_sin)
                           for s in rows]).to(q.dtype)  # fmt: skip
        seg_v = torch.cat([s.v for s in rows]).to(q.dtype)
        mem_k.append(seg_k.expand(b, -1, -1, -1))
        mem_v.append(seg_v.expand(b, -1, -1, -1))
    m = sum(t.shape[1] for t in mem_k)
    group = self.num_heads // self.num_kv_heads
    keys = _repeat_kv(torch.cat([*mem_k, k], 1).transpose(1, 2), group)  # [B, Hq, M + Tk, D]
    values = _repeat_kv(torch.cat([*mem_v, v], 1).transpose(1, 2), group)
    mask = torch.ones(tq, m + tk, dtype=torch.bool, device=q.device)  # the memory: seen by every query
    mask[:, m:] = torch.ones(tq, tk, dtype=torch.bool, device=q.device).tril(tk - tq)  # the chunk: bottom-right causal
    if kv_start is not None:  # left padding: each row's keys before its first valid one are hidden
        valid = torch.arange(tk, device=q.device)[None] >= kv_start[:, None].long()  # [B, Tk]
        mask = mask.repeat(b, 1, 1)
        mask[:, :, m:] &= valid[:, None]
        mask = mask[:, None]
    out = F.scaled_dot_product_attention(q.transpose(1, 2), keys, values, attn_mask=mask, scale=self.scaling)
    return self.o_proj(out.transpose(1, 2).reshape(b, tq, self.num_heads * self.head_dim))


@contextlib.contextmanager
def official_attention(model: MPlusForCausalLM) -> Iterator[MPlusForCausalLM]:
    """Within the block, every layer of ``model`` attends as the official SDPA path does (module docstring)."""
    attentions = [layer.self_attn for layer in model.layers]
    for attn in attentions:
        attn.forward = types.MethodType(_official_forward, attn)
    try:
        yield model
    finally:
        for attn in attentions:
            del attn.forward  # the instance attribute: the class's forward again
