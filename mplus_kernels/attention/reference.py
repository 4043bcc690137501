"""Pure-PyTorch reference of M+ memory attention (SPEC.md §3.1, DESIGN.md §2.1), written to be read.

The chunk's queries attend to (a) a memory segment that every query sees and (b) the chunk's own keys, causally and
bottom-right aligned: query t (of Tq) sees chunk key j (of Tk) iff ``j <= t + Tk - Tq`` (FlashAttention >= 2.1).
With a static KV cache each batch row b has its own valid key range ``[kv_start[b], kv_len[b])`` of the Tk cache
rows, and causality is aligned to the row's end: query t sees chunk key j iff ``kv_start[b] <= j < kv_len[b]`` and
(causal) ``j <= t + kv_len[b] - Tq``.
Memory keys are stored *before* RoPE and rotated here by a per-row position table; chunk keys arrive rotated.
Everything is computed in fp32 (or in ``compute_dtype``, to measure a low-precision reference's own error).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor


def rotate_half(x: Tensor) -> Tensor:
    """``[a, b] -> [-b, a]`` on the two halves of the last dim (Llama's RoPE convention)."""
    a, b = x.chunk(2, dim=-1)
    return torch.cat([-b, a], dim=-1)


def apply_rope(x: Tensor, positions: Tensor, rope_cos: Tensor, rope_sin: Tensor) -> Tensor:
    """Rotate ``x [..., M, H, D]`` by the rows ``positions [M]`` of the tables ``rope_cos/rope_sin [P, D/2]``."""
    cos = rope_cos[positions.long()].to(x.dtype)  # [M, D/2]
    sin = rope_sin[positions.long()].to(x.dtype)
    cos = torch.cat([cos, cos], dim=-1)[:, None, :]  # [M, 1, D]
    sin = torch.cat([sin, sin], dim=-1)[:, None, :]
    return x * cos + rotate_half(x) * sin


def rotate_keys_reference(k: Tensor, positions: Tensor, rope_cos: Tensor, rope_sin: Tensor) -> Tensor:
    """``k [B, N, H, D]`` (keys before RoPE) rotated by the rows ``positions [N]`` of the fp32 tables ``[P, D/2]``, in
    fp32 with each product rounded before the sum, rounded once to ``k``'s dtype: what ``rotate_keys`` computes, bit
    for bit. Contiguous, ``k``'s dtype."""
    h = k.shape[-1] // 2
    x = k.float()
    a, b = x[..., :h], x[..., h:]  # RoPE mixes dims d and d + D/2 (rotate_half's convention)
    p = positions.long()
    c, s = rope_cos[p][:, None], rope_sin[p][:, None]  # [N, 1, D/2]
    return torch.cat([a * c - b * s, b * c + a * s], dim=-1).to(k.dtype)


def memory_attention_reference(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    mem_k: Tensor | None = None,
    mem_v: Tensor | None = None,
    mem_pos: Tensor | None = None,
    rope_cos: Tensor | None = None,
    rope_sin: Tensor | None = None,
    softmax_scale: float | None = None,
    causal: bool = True,
    kv_len: Tensor | None = None,
    kv_start: Tensor | None = None,
    compute_dtype: torch.dtype = torch.float32,
) -> tuple[Tensor, Tensor]:
    """Attention of a chunk over [memory ; chunk].

    Args:
        q: ``[B, Tq, Hq, D]`` queries (already rotated).
        k, v: ``[B, Tk, Hkv, D]`` the chunk's keys (already rotated) and values; ``Hq % Hkv == 0`` (GQA).
        mem_k, mem_v: ``[B, M, Hkv, D]`` memory keys *before* RoPE and values, or None (no memory).
        mem_pos: ``[M]`` integer positions of the memory rows; None means ``mem_k`` is used as given (no rotation).
        rope_cos, rope_sin: ``[P, D/2]`` fp32 tables, row p = cos/sin(p · inv_freq); needed when ``mem_pos`` is given.
        softmax_scale: default ``1/sqrt(D)``.
        causal: bottom-right causal mask on the chunk part (memory is always fully visible).
        kv_len: ``[B]`` integer, valid chunk keys per batch row (keys ``j >= kv_len[b]`` are never used); None: Tk.
        kv_start: ``[B]`` integer, first valid chunk key per batch row (left padding); None: 0.

    Returns:
        ``out [B, Tq, Hq, D]`` in q's dtype and ``lse [B, Hq, Tq]`` fp32 (fp64 when ``compute_dtype`` is fp64;
        natural log of the softmax denominator, scaled scores). A query that sees no key gets ``out = 0`` and
        ``lse = -inf``.
    """
    b, tq, hq, d = q.shape
    tk, hkv = k.shape[1], k.shape[2]
    scale = 1.0 / math.sqrt(d) if softmax_scale is None else softmax_scale
    keys, values = [], []
    if mem_k is not None and mem_k.shape[1] > 0:
        mk = mem_k.to(compute_dtype)
        if mem_pos is not None:
            mk = apply_rope(mk, mem_pos, rope_cos.float(), rope_sin.float())
        keys.append(mk)
        values.append(mem_v.to(compute_dtype))
    m = keys[0].shape[1] if keys else 0
    # chunk key j of row b is usable iff start[b] <= j < end[b]; rows outside that range may hold garbage (a static
    # cache): they are zeroed, so not even 0 * NaN reaches the result
    j = torch.arange(tk, device=q.device)
    end = torch.full((b,), tk, device=q.device) if kv_len is None else kv_len.to(q.device, torch.int64)
    start = torch.zeros(b, dtype=torch.int64, device=q.device) if kv_start is None else kv_start.to(q.device).long()
    in_range = (j[None, :] >= start[:, None]) & (j[None, :] < end[:, None])  # [B, Tk]
    keys.append(k.to(compute_dtype).masked_fill(~in_range[:, :, None, None], 0.0))
    values.append(v.to(compute_dtype).masked_fill(~in_range[:, :, None, None], 0.0))
    kk = torch.cat(keys, dim=1).repeat_interleave(hq // hkv, dim=2)  # [B, M+Tk, Hq, D]
    vv = torch.cat(values, dim=1).repeat_interleave(hq // hkv, dim=2)
    scores = torch.einsum("bthd,bshd->bhts", q.to(compute_dtype), kk) * scale  # [B, Hq, Tq, M+Tk]
    visible = torch.ones(b, tq, m + tk, dtype=torch.bool, device=q.device)
    chunk_visible = in_range[:, None, :].expand(b, tq, tk)
    if causal:
        t = torch.arange(tq, device=q.device)[None, :, None]
        chunk_visible = chunk_visible & (j[None, None, :] <= t + end[:, None, None] - tq)
    visible[:, :, m:] = chunk_visible
    visible = visible[:, None]  # [B, 1, Tq, M+Tk]
    scores = scores.masked_fill(~visible, float("-inf"))
    acc = torch.float64 if compute_dtype == torch.float64 else torch.float32  # fp64 stays fp64 (gradcheck)
    lse = torch.logsumexp(scores.to(acc), dim=-1)  # [B, Hq, Tq]
    probs = torch.exp(scores.to(acc) - lse[..., None]).nan_to_num(0.0).to(compute_dtype)  # -inf rows -> 0
    out = torch.einsum("bhts,bshd->bthd", probs, vv)
    return out.to(q.dtype), lse


def merge_attention_states_reference(
    out_a: Tensor, lse_a: Tensor, out_b: Tensor, lse_b: Tensor
) -> tuple[Tensor, Tensor]:
    """Exact merge of two partial attentions over disjoint key sets.

    ``out_* [B, T, H, D]``, ``lse_* [B, H, T]`` fp32 → ``(out [B, T, H, D] in out_a's dtype, lse [B, H, T])``.
    """
    lse = torch.logaddexp(lse_a, lse_b)
    safe = torch.where(torch.isinf(lse), torch.zeros_like(lse), lse)  # both -inf: weights 0, out 0
    w_a = torch.exp(lse_a - safe).transpose(1, 2)[..., None]  # [B, T, H, 1]
    w_b = torch.exp(lse_b - safe).transpose(1, 2)[..., None]
    out = out_a.float() * w_a + out_b.float() * w_b
    return out.to(out_a.dtype), lse
