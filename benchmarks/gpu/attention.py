"""Memory attention on the GPU at M+ shapes: the mplus Triton kernel vs SDPA, FlexAttention and flash-attn.

One layer of mplus-8b, batch 1: Hq 32, Hkv 8, D 128, memory M = 12,801 rows (BOS + 2,560 LTM + 10,240 STM; keys
stored before RoPE, positions a permutation, as after many updates), chunk Tq = Tk in {2048, 256} (prefill) and
Tq = Tk = 1 (decode), bf16. Providers, on the same inputs:

* ``mplus``: ``mplus_kernels.memory_attention`` (the wrapper; on CUDA the dispatcher runs the Triton kernel): memory
  keys rotated inside the kernel, native GQA, no mask tensor, out + LSE; ``mplus_rotated`` (decode): the memory keys
  given rotated, as the model's decode steps give its short-term rows;
* ``official``: what the official code does per layer: rotate the memory keys, concatenate memory and chunk,
  ``repeat_kv`` to 32 heads, a boolean [Tq, M+Tk] mask, SDPA (everything inside the timing);
* ``sdpa_gqa``: SDPA at its best: memory rotated and [memory ; chunk] concatenated as [B, H, T, D] *outside* the
  timing, ``enable_gqa=True`` and the bottom-right causal bias ``causal_lower_right`` (no mask tensor);
* ``sdpa_gqa_mask``: the same with an explicit boolean bottom-right mask (built outside the timing);
* ``flash_attn`` (when the package imports): ``flash_attn_func`` on the concatenated K/V, ``causal=True`` (its
  bottom-right rule is exactly the memory-prefix + causal-chunk visibility), native GQA;
* ``flex``: ``torch.compile(flex_attention)`` with a prefix-LM block mask, GQA; ``setup_s`` includes compilation.
  Run last, and only while the family's budget lasts (compilation takes tens of seconds).

``tflops`` counts 4·D·Hq per visible (query, key) pair for every provider; decode ``gbps`` counts q, the memory
and chunk K/V and out once. ``max_abs_diff_vs_mplus`` is a sanity check, not an assertion.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

import mplus_kernels as mk
from mplus_kernels.attention.reference import apply_rope

from ._harness import Recorder, max_abs_diff

B, M, HQ, HKV, D = 1, 12_801, 32, 8, 128
SCALE = 1.0 / math.sqrt(D)
DTYPE = torch.bfloat16
TQS = (2048, 256, 1)


def _inputs(tq: int) -> dict:
    g = torch.Generator(device="cuda").manual_seed(tq)
    rnd = lambda *s: torch.randn(*s, generator=g, device="cuda").to(DTYPE)  # noqa: E731
    inv = 1.0 / (500000.0 ** (torch.arange(0, D, 2, dtype=torch.float32, device="cuda") / D))
    ang = torch.arange(M + tq, dtype=torch.float32, device="cuda")[:, None] * inv[None]
    return {
        "q": rnd(B, tq, HQ, D),
        "k": rnd(B, tq, HKV, D),
        "v": rnd(B, tq, HKV, D),
        "mem_k": rnd(B, M, HKV, D),
        "mem_v": rnd(B, M, HKV, D),
        "mem_pos": torch.randperm(M, generator=g, device="cuda").to(torch.int32),
        "cos": ang.cos(),
        "sin": ang.sin(),
    }


def _prepared(x: dict) -> dict:
    """[B, H, T, D] q and [memory (rotated, fp32 rotation like mplus) ; chunk] K/V: the peers' best case."""
    if "kt" not in x:
        mem_k = apply_rope(x["mem_k"].float(), x["mem_pos"], x["cos"], x["sin"]).to(DTYPE)
        x["k_cat"] = torch.cat([mem_k, x["k"]], 1)  # [B, M+Tk, Hkv, D] (flash-attn layout)
        x["v_cat"] = torch.cat([x["mem_v"], x["v"]], 1)
        x["qt"] = x["q"].transpose(1, 2).contiguous()
        x["kt"] = x["k_cat"].transpose(1, 2).contiguous()
        x["vt"] = x["v_cat"].transpose(1, 2).contiguous()
    return x


def _mask(tq: int, tk: int) -> torch.Tensor:
    """[Tq, M+Tk] bool: every memory key, and chunk key j for query t iff j <= t + Tk - Tq."""
    mask = torch.ones(tq, M + tk, dtype=torch.bool, device="cuda")
    mask[:, M:] = torch.ones(tq, tk, dtype=torch.bool, device="cuda").tril(tk - tq)
    return mask


def _visible_pairs(tq: int, tk: int) -> int:
    return tq * M + sum(min(tk, max(0, t + tk - tq + 1)) for t in range(tq))


def _mplus(x: dict):
    args = (x["q"], x["k"], x["v"], x["mem_k"], x["mem_v"], x["mem_pos"], x["cos"], x["sin"])
    return lambda: mk.memory_attention(*args, softmax_scale=SCALE, causal=True)[0]


def _mplus_rotated(x: dict):
    """The memory keys given rotated (what the model's decode steps read: a generation rotates them at its prefill)."""
    if "mem_k_rot" not in x:
        x["mem_k_rot"] = apply_rope(x["mem_k"].float(), x["mem_pos"], x["cos"], x["sin"]).to(DTYPE)
    args = (x["q"], x["k"], x["v"], x["mem_k_rot"], x["mem_v"])
    return lambda: mk.memory_attention(*args, softmax_scale=SCALE, causal=True)[0]


def _official(x: dict):
    q, k, v = x["q"], x["k"], x["v"]
    tq, tk, group = q.shape[1], k.shape[1], HQ // HKV
    mask = _mask(tq, tk)

    def repeat_kv(t: torch.Tensor) -> torch.Tensor:  # HF's: [B, Hkv, N, D] -> [B, Hq, N, D], materialised
        b, h, n, d = t.shape
        return t[:, :, None].expand(b, h, group, n, d).reshape(b, h * group, n, d)

    def fn():
        mem_k = apply_rope(x["mem_k"], x["mem_pos"], x["cos"], x["sin"])  # in the model dtype, every call
        keys = repeat_kv(torch.cat([mem_k, k], 1).transpose(1, 2))
        values = repeat_kv(torch.cat([x["mem_v"], v], 1).transpose(1, 2))
        out = F.scaled_dot_product_attention(q.transpose(1, 2), keys, values, attn_mask=mask, scale=SCALE)
        return out.transpose(1, 2)

    return fn


def _sdpa_gqa(x: dict):
    from torch.nn.attention.bias import causal_lower_right

    p = _prepared(x)
    q, k, v = p["qt"], p["kt"], p["vt"]
    bias = causal_lower_right(q.shape[2], k.shape[2])
    return lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=bias, enable_gqa=True, scale=SCALE).transpose(1, 2)


def _sdpa_gqa_mask(x: dict):
    p = _prepared(x)
    q, k, v = p["qt"], p["kt"], p["vt"]
    mask = _mask(q.shape[2], k.shape[2] - M)
    return lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True, scale=SCALE).transpose(1, 2)


def _flash_attn(x: dict):
    from flash_attn import flash_attn_func

    p = _prepared(x)
    q, k, v = x["q"], p["k_cat"], p["v_cat"]
    return lambda: flash_attn_func(q, k, v, softmax_scale=SCALE, causal=True)


def _flex(x: dict):
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    p = _prepared(x)
    q, k, v = p["qt"], p["kt"], p["vt"]
    tq, tk = q.shape[2], k.shape[2] - M

    def prefix_lm(b, h, q_idx, kv_idx):  # noqa: ARG001
        return (kv_idx < M) | (kv_idx - M <= q_idx + (tk - tq))

    block_mask = create_block_mask(prefix_lm, None, None, tq, M + tk, device="cuda")
    compiled = torch.compile(flex_attention, dynamic=False)
    return lambda: compiled(q, k, v, block_mask=block_mask, enable_gqa=True, scale=SCALE).transpose(1, 2)


def _flash_attn_available() -> str | None:
    try:
        import flash_attn  # noqa: F401
    except Exception as exc:  # any import failure (missing, built for another torch) means: not a peer here
        return f"{type(exc).__name__}: {exc}"
    return None


def run(rec: Recorder) -> None:
    missing_fa = _flash_attn_available()
    if missing_fa:
        rec.note("attention", info=f"flash-attn not importable, not benchmarked ({missing_fa[:200]})")
    inputs: dict[int, dict] = {}
    mplus_out: dict[int, torch.Tensor] = {}

    def case(tq: int, provider: str, make, min_budget_s: float = 2.0) -> None:
        x = inputs[tq]
        phase = "decode" if tq == 1 else "prefill"
        ref = mplus_out.get(tq)
        extra = {}
        if phase == "decode":
            extra["moved_bytes"] = (2 * B * (M + tq) * HKV * D + 2 * B * tq * HQ * D) * x["q"].element_size()
        out = rec.measure(
            f"attention/{phase}/T{tq}",
            provider,
            lambda: make(x),
            shape=f"B{B} Tq{tq} Tk{tq} M{M} Hq{HQ} Hkv{HKV} D{D}",
            dtype=DTYPE,
            flops=4 * D * HQ * B * _visible_pairs(tq, tq),
            check=(lambda o, ref=ref: {"max_abs_diff_vs_mplus": max_abs_diff(o, ref)}) if ref is not None else None,
            min_budget_s=min_budget_s,
            **extra,
        )
        if provider == "mplus" and out is not None:
            mplus_out[tq] = out

    # mplus and the cheap peers on every shape first; flex (compilation) last, while the budget lasts
    for tq in TQS:
        try:
            inputs[tq] = _inputs(tq)
        except Exception as exc:
            rec.note(f"attention/T{tq}", error=f"inputs: {type(exc).__name__}: {exc}")
            continue
        case(tq, "mplus", _mplus)
        if tq == 1:
            case(tq, "mplus_rotated", _mplus_rotated)
        case(tq, "official", _official)
        case(tq, "sdpa_gqa", _sdpa_gqa)
        if tq > 1:  # decode: no mask at all (one query sees every key); sdpa_gqa is that case
            case(tq, "sdpa_gqa_mask", _sdpa_gqa_mask)
        if not missing_fa:
            case(tq, "flash_attn", _flash_attn)
    _shared_memory_decode(rec)
    _rotate_keys(rec)
    for tq in TQS:
        if tq in inputs:
            case(tq, "flex", _flex, min_budget_s=25.0)


B_SHARED = 16  # serving: a batch decoding over one memory state


def _shared_memory_decode(rec: Recorder) -> None:
    """B_SHARED rows decode over one memory, given as the model gives it (an expand, batch stride 0): ``mplus`` reads
    it once for the batch; ``mplus_per_row`` is the same call on a dense copy per row; ``sdpa_gqa`` gets [memory ;
    chunk] per row, rotated and concatenated outside the timing. ``gbps`` counts the memory once."""
    try:
        one = _inputs(1)
        g = torch.Generator(device="cuda").manual_seed(16)
        rnd = lambda *s: torch.randn(*s, generator=g, device="cuda").to(DTYPE)  # noqa: E731
        x = {k: one[k] for k in ("mem_pos", "cos", "sin")}
        x.update(q=rnd(B_SHARED, 1, HQ, D), k=rnd(B_SHARED, 1, HKV, D), v=rnd(B_SHARED, 1, HKV, D))
        x["mem_k"], x["mem_v"] = (one[n].expand(B_SHARED, -1, -1, -1) for n in ("mem_k", "mem_v"))
        dense = dict(x, mem_k=x["mem_k"].contiguous(), mem_v=x["mem_v"].contiguous())
    except Exception as exc:
        rec.note("attention/decode shared memory", error=f"inputs: {type(exc).__name__}: {exc}")
        return
    ref = None
    for provider, make in (("mplus", lambda: _mplus(x)), ("mplus_per_row", lambda: _mplus(dense)),
                           ("sdpa_gqa", lambda: _sdpa_gqa(dense))):  # fmt: skip
        out = rec.measure(
            f"attention/decode shared memory B{B_SHARED}",
            provider,
            make,
            shape=f"B{B_SHARED} (one memory) Tq1 Tk1 M{M} Hq{HQ} Hkv{HKV} D{D}",
            dtype=DTYPE,
            flops=4 * D * HQ * B_SHARED * (M + 1),
            moved_bytes=(2 * M * HKV * D + 2 * B_SHARED * HKV * D + 2 * B_SHARED * HQ * D) * 2,
            check=(lambda o, ref=ref: {"max_abs_diff_vs_mplus": max_abs_diff(o, ref)}) if ref is not None else None,
        )
        if provider == "mplus":
            ref = out


STM_ROWS = 10_240  # one layer's short-term keys at mplus-8b's sizes


def _rotate_keys(rec: Recorder) -> None:
    """The rotation a generation does once per layer and state at its prefill (``MemoryKV.rotated``): ``mplus`` the
    Triton kernel behind ``mk.rotate_keys``, ``reference`` its torch reference; bit for bit the same (``max_abs_diff``
    0 expected). ``gbps`` counts the keys read, the rotated keys written and the table rows read."""
    try:
        one = _inputs(1)
        args = (one["mem_k"][:, M - STM_ROWS :], one["mem_pos"][M - STM_ROWS :], one["cos"], one["sin"])
    except Exception as exc:
        rec.note("attention/rotate keys", error=f"inputs: {type(exc).__name__}: {exc}")
        return
    key_bytes = B * STM_ROWS * HKV * D * 2
    ref = None
    for provider, fn in (("mplus", mk.rotate_keys), ("reference", mk.rotate_keys_reference)):
        out = rec.measure(
            "attention/rotate keys",
            provider,
            lambda fn=fn: (lambda: fn(*args)),
            shape=f"B{B} N{STM_ROWS} H{HKV} D{D} (one layer's short-term keys)",
            dtype=DTYPE,
            moved_bytes=2 * key_bytes + STM_ROWS * D * 4,
            check=(lambda o, ref=ref: {"max_abs_diff_vs_mplus": max_abs_diff(o, ref)}) if ref is not None else None,
        )
        if provider == "mplus":
            ref = out
