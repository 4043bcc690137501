"""Backward of memory attention and of the LSE merge (issue 12), FlashAttention-2 style, in PyTorch.

The forward returns ``out`` and ``lse``; the backward recomputes the probabilities block by block of keys from the
saved ``lse`` (``P = exp(scale · q·k − lse)``), so no ``[Tq, M + Tk]`` matrix is ever held whole: per block of
``block`` keys, ``dV += Pᵀ·dO``, ``dS = P ∘ (dO·Vᵀ − Δ + dlse)`` with ``Δ = rowsum(dO ∘ O)``, ``dQ += scale·dS·K``,
``dK = scale·dSᵀ·Q``. The ``+ dlse`` term is the gradient through the LSE output (``∂lse/∂s = P``), which a
segmented forward needs: its partial attentions are merged through their LSEs (``merge_attention_states``).

Memory keys are rotated inside the forward (``k_rot = k·cos + rotate_half(k)·sin`` at each row's position); their
gradient is rotated back by the inverse rotation: ``dk = dk_rot·cos − rotate_half(dk_rot·sin)``. GQA: a key/value
head's gradient sums over the query heads that share it. Everything is computed in fp32 (fp64 inputs: fp64) and cast
back to each input's dtype.

The C++ kernel (``csrc/cpu/attention_backward.cpp``) and the Triton kernels (``triton_backward.py``) run the same
recurrence; this PyTorch version is the fallback where neither applies (e.g. CUDA at a head dim the Triton kernels
do not take) and the readable statement of what they compute, which their tests compare with.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .reference import rotate_half

BLOCK = 1024  # keys per recomputed block


def _rope_tables(positions: Tensor, rope_cos: Tensor, rope_sin: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    cos, sin = rope_cos[positions.long()].to(dtype), rope_sin[positions.long()].to(dtype)
    return torch.cat([cos, cos], -1)[:, None, :], torch.cat([sin, sin], -1)[:, None, :]  # [M, 1, D]


def memory_attention_backward(
    grad_out: Tensor | None,
    grad_lse: Tensor | None,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    mem_k: Tensor | None,
    mem_v: Tensor | None,
    mem_pos: Tensor | None,
    rope_cos: Tensor | None,
    rope_sin: Tensor | None,
    out: Tensor,
    lse: Tensor,
    scale: float,
    causal: bool,
    kv_len: Tensor | None,
    kv_start: Tensor | None,
    block: int = BLOCK,
) -> tuple[Tensor, Tensor, Tensor, Tensor | None, Tensor | None]:
    """Gradients ``(dq, dk, dv, dmem_k, dmem_v)`` of ``memory_attention`` (each in its input's dtype; None for an
    absent memory), from the upstream ``grad_out [B, Tq, Hq, D]`` and ``grad_lse [B, Hq, Tq]`` (either may be None:
    zero) and the forward's saved ``out`` and ``lse``. Visibility is the forward's exact rule."""
    b, tq, hq, d = q.shape
    tk, hkv = k.shape[1], k.shape[2]
    g = hq // hkv
    acc = torch.float64 if q.dtype == torch.float64 else torch.float32
    dev = q.device
    qf = q.to(acc)
    do = torch.zeros_like(qf) if grad_out is None else grad_out.to(acc)
    dl = torch.zeros(b, hq, tq, dtype=acc, device=dev) if grad_lse is None else grad_lse.to(acc)
    lse_f = lse.to(acc)
    # rows that saw no key (lse = -inf) have P = 0 everywhere: a finite stand-in keeps exp() at 0 without NaN
    lse_safe = torch.where(torch.isinf(lse_f), torch.full_like(lse_f, float("inf")), lse_f)
    delta = (do * out.to(acc)).sum(-1).transpose(1, 2)  # [B, Hq, Tq]
    qh = qf.transpose(1, 2)  # [B, Hq, Tq, D]
    doh = do.transpose(1, 2)
    dq = torch.zeros_like(qh)

    def attend(keys: Tensor, values: Tensor, visible: Tensor | None) -> tuple[Tensor, Tensor]:
        """One block: keys/values ``[B, S, Hkv, D]`` (rotated keys), visible ``[B, Tq, S]`` or None (all)."""
        kh = keys.transpose(1, 2).repeat_interleave(g, dim=1)  # [B, Hq, S, D]
        vh = values.transpose(1, 2).repeat_interleave(g, dim=1)
        s = torch.einsum("bhtd,bhsd->bhts", qh, kh) * scale
        p = torch.exp(s - lse_safe[..., None])
        if visible is not None:
            p = p.masked_fill(~visible[:, None], 0.0)
        dv = torch.einsum("bhts,bhtd->bhsd", p, doh)
        dp = torch.einsum("bhtd,bhsd->bhts", doh, vh)
        ds = p * (dp - delta[..., None] + dl[..., None])
        dq.add_(torch.einsum("bhts,bhsd->bhtd", ds, kh), alpha=scale)
        dk = torch.einsum("bhts,bhtd->bhsd", ds, qh) * scale
        # GQA: sum over the query heads sharing each key/value head; back to [B, S, Hkv, D]
        fold = lambda x: x.view(b, hkv, g, *x.shape[2:]).sum(2).transpose(1, 2)  # noqa: E731
        return fold(dk), fold(dv)

    dmem_k = dmem_v = None
    if mem_k is not None and mem_k.shape[1] > 0:
        m = mem_k.shape[1]
        mk, mv = mem_k.to(acc), mem_v.to(acc)
        if mem_pos is not None:
            cos, sin = _rope_tables(mem_pos, rope_cos, rope_sin, acc)
            mk_rot = mk * cos + rotate_half(mk) * sin
        else:
            mk_rot = mk
        gk, gv = [], []
        for lo in range(0, m, block):
            dk_b, dv_b = attend(mk_rot[:, lo : lo + block], mv[:, lo : lo + block], None)
            gk.append(dk_b)
            gv.append(dv_b)
        dk_rot, dmem_v = torch.cat(gk, 1), torch.cat(gv, 1)
        # the inverse rotation: d/dk of (k·cos + rotate_half(k)·sin)
        dmem_k = dk_rot * cos - rotate_half(dk_rot * sin) if mem_pos is not None else dk_rot
        dmem_k, dmem_v = dmem_k.to(mem_k.dtype), dmem_v.to(mem_v.dtype)
    elif mem_k is not None:
        dmem_k, dmem_v = torch.zeros_like(mem_k), torch.zeros_like(mem_v)

    end = torch.full((b,), tk, device=dev) if kv_len is None else kv_len.to(dev, torch.int64)
    start = torch.zeros(b, dtype=torch.int64, device=dev) if kv_start is None else kv_start.to(dev).long()
    t = torch.arange(tq, device=dev)[None, :, None]
    kf, vf = k.to(acc), v.to(acc)
    gk, gv = [], []
    for lo in range(0, tk, block):
        j = torch.arange(lo, min(lo + block, tk), device=dev)
        in_range = (j[None, :] >= start[:, None]) & (j[None, :] < end[:, None])  # [B, S]
        visible = in_range[:, None, :].expand(b, tq, j.numel())
        if causal:
            visible = visible & (j[None, None, :] <= t + end[:, None, None] - tq)
        # rows outside [start, end) may hold garbage (a static cache): zeroed, as the forward never reads them
        keys = kf[:, lo : lo + block].masked_fill(~in_range[:, :, None, None], 0.0)
        values = vf[:, lo : lo + block].masked_fill(~in_range[:, :, None, None], 0.0)
        dk_b, dv_b = attend(keys, values, visible)
        gk.append(dk_b.masked_fill(~in_range[:, :, None, None], 0.0))
        gv.append(dv_b.masked_fill(~in_range[:, :, None, None], 0.0))
    dk = torch.cat(gk, 1).to(k.dtype) if gk else torch.zeros_like(k)
    dv = torch.cat(gv, 1).to(v.dtype) if gv else torch.zeros_like(v)
    return dq.transpose(1, 2).to(q.dtype), dk, dv, dmem_k, dmem_v


def merge_attention_states_backward(
    grad_out: Tensor | None, grad_lse: Tensor | None, out_a: Tensor, lse_a: Tensor, out_b: Tensor, lse_b: Tensor,
    out: Tensor, lse: Tensor,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:  # fmt: skip
    """Gradients ``(dout_a, dlse_a, dout_b, dlse_b)`` of ``merge_attention_states``.

    With ``w_x = exp(lse_x − lse)``: ``out = w_a·out_a + w_b·out_b`` and ``lse = logaddexp(lse_a, lse_b)``, so
    ``dout_x = w_x·dout`` and ``dlse_x = w_x·(Σ_d dout·(out_x − out) + dlse)``; a part with ``lse_x = −inf`` has
    weight 0 (and both −inf: all gradients 0, as the forward's output is 0)."""
    acc = torch.float64 if out_a.dtype == torch.float64 else torch.float32
    do = torch.zeros_like(out_a, dtype=acc) if grad_out is None else grad_out.to(acc)
    dl = torch.zeros_like(lse_a, dtype=acc) if grad_lse is None else grad_lse.to(acc)
    lse_f = lse.to(acc)
    safe = torch.where(torch.isinf(lse_f), torch.zeros_like(lse_f), lse_f)
    o = out.to(acc)
    grads = []
    for out_x, lse_x in ((out_a, lse_a), (out_b, lse_b)):
        w = torch.exp(lse_x.to(acc) - safe)  # [B, H, T]; 0 where lse_x = -inf
        w = torch.where(torch.isinf(lse_f) & (lse_f < 0), torch.zeros_like(w), w)
        wt = w.transpose(1, 2)[..., None]  # [B, T, H, 1]
        d_out = (wt * do).to(out_x.dtype)
        d_lse = w * ((do * (out_x.to(acc) - o)).sum(-1).transpose(1, 2) + dl)
        grads += [d_out, d_lse.to(lse_x.dtype)]
    return grads[0], grads[1], grads[2], grads[3]


__all__ = ["BLOCK", "memory_attention_backward", "merge_attention_states_backward"]
