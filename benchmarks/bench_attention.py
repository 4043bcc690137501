"""Memory attention on the CPU at M+ shapes: mplus's C++ kernel vs the official path and the best PyTorch peers.

One layer of mplus-8b, batch 1: Hq 32, Hkv 8, D 128, a memory prefix of M = 12,801 rows (BOS + 2,560 LTM + 10,240 STM,
keys stored before RoPE, slot order scrambled by updates), a chunk of Tq = Tk in {1 (decode), 256, 2048 (prefill)},
bf16 (the model dtype) and fp32. Providers, on the same inputs:

* ``official``: what the official SDPA path does per layer (SPEC.md P8/P9/P15): rotate the memory keys, concatenate
  memory and chunk, ``repeat_kv`` to 32 heads, build a boolean prefix + causal mask, ``scaled_dot_product_attention``;
* ``sdpa_gqa``: the best SDPA use: memory rotated and K/V laid out [B, H, T, D] outside the timing,
  ``enable_gqa=True`` and a ``causal_lower_right`` bias (no mask tensor, no repeat_kv);
* ``flex``: FlexAttention compiled with a prefix-LM ``mask_mod`` (same prepared K/V); compilation happens before the
  timing, and ``compile_s`` records the first call minus the median call (inductor's on-disk cache makes later
  sessions compile faster). Skipped at fp32 Tq 2048, where one call takes over ten seconds here;
* ``mplus``: ``torch.ops.mplus.memory_attention`` (memory rotated inside the kernel, native GQA, no mask).

``tflops`` (prefill) counts 4·D·Hq per visible (query, key) pair, the same useful work for every provider whether it
skips masked blocks or not; ``gbps`` (decode) = bytes of q, K, V and out read/written once / median time (mplus also
reads the rope-table rows of the memory keys, 6.5 MB more, which the peers' pre-rotated keys do not need).
``max_abs_diff_vs_mplus`` records how far each peer's output is from mplus's (a sanity check, not an assertion).
The machine is small (2 cores) and shared: read medians, and compare providers within one run.
"""

from __future__ import annotations

import gc
import math
import time

import pytest
import torch
import torch.nn.functional as F
from torch.nn.attention.bias import causal_lower_right

import mplus_kernels  # noqa: F401  (registers torch.ops.mplus.*)
from mplus_kernels.attention.reference import apply_rope
from mplus_kernels.testing import mplus_providers

B, M, HQ, HKV, D = 1, 12_801, 32, 8, 128
SCALE = 1.0 / math.sqrt(D)
PROVIDERS = ["official", "sdpa_gqa", "flex", *mplus_providers()]  # mplus@<level>: MPLUS_BENCH_ISAS (conftest)
ROUNDS = {1: 30, 256: 3, 2048: 2}  # every provider of a (Tq, dtype) the same rounds (the peers take > 1 s at Tq 2048)

_cache: dict[tuple[int, torch.dtype], dict] = {}


def _inputs(tq: int, dtype: torch.dtype) -> dict:
    """Seeded inputs of one (Tq, dtype), shared by every provider; one pair kept alive at a time."""
    key = (tq, dtype)
    if key not in _cache:
        _cache.clear()
        gc.collect()
        g = torch.Generator().manual_seed(tq)
        rnd = lambda *s: torch.randn(*s, generator=g).to(dtype)  # noqa: E731
        inv = 1.0 / (500000.0 ** (torch.arange(0, D, 2, dtype=torch.float32) / D))
        ang = torch.arange(M + tq, dtype=torch.float32)[:, None] * inv[None]
        x = {
            "q": rnd(B, tq, HQ, D),
            "k": rnd(B, tq, HKV, D),
            "v": rnd(B, tq, HKV, D),
            "mem_k": rnd(B, M, HKV, D),
            "mem_v": rnd(B, M, HKV, D),
            "mem_pos": torch.randperm(M, generator=g).to(torch.int32),  # slot -> position after many updates
            "cos": ang.cos(),
            "sin": ang.sin(),
        }
        _cache[key] = x
    return _cache[key]


def _prepared_kv(x: dict) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """q, K, V as [B, H, T, D] with the memory rotated (fp32 rotation, like mplus) and concatenated: the peers'
    best case, built once outside the timing."""
    if "qt" not in x:
        mem_k = apply_rope(x["mem_k"].float(), x["mem_pos"], x["cos"], x["sin"]).to(x["k"].dtype)
        x["qt"] = x["q"].transpose(1, 2).contiguous()
        x["kt"] = torch.cat([mem_k, x["k"]], 1).transpose(1, 2).contiguous()
        x["vt"] = torch.cat([x["mem_v"], x["v"]], 1).transpose(1, 2).contiguous()
    return x["qt"], x["kt"], x["vt"]


def _official(x: dict):
    q, k, v = x["q"], x["k"], x["v"]
    tq, tk, group = q.shape[1], k.shape[1], HQ // HKV

    def repeat_kv(t: torch.Tensor) -> torch.Tensor:  # HF's: [B, Hkv, N, D] -> [B, Hq, N, D], materialised
        b, h, n, d = t.shape
        return t[:, :, None].expand(b, h, group, n, d).reshape(b, h * group, n, d)

    def fn():
        mem_k = apply_rope(x["mem_k"], x["mem_pos"], x["cos"], x["sin"])  # rotated in the model dtype, every call
        keys = repeat_kv(torch.cat([mem_k, k], 1).transpose(1, 2))
        values = repeat_kv(torch.cat([x["mem_v"], v], 1).transpose(1, 2))
        mask = torch.ones(tq, M + tk, dtype=torch.bool)
        mask[:, M:] = torch.ones(tq, tk, dtype=torch.bool).tril(tk - tq)
        out = F.scaled_dot_product_attention(q.transpose(1, 2), keys, values, attn_mask=mask, scale=SCALE)
        return out.transpose(1, 2)

    return fn


def _sdpa_gqa(x: dict):
    q, k, v = _prepared_kv(x)
    bias = causal_lower_right(q.shape[2], k.shape[2])
    return lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=bias, enable_gqa=True, scale=SCALE).transpose(1, 2)


def _flex(x: dict):
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    q, k, v = _prepared_kv(x)
    tq, tk = q.shape[2], k.shape[2] - M

    def prefix_lm(b, h, q_idx, kv_idx):  # noqa: ARG001
        return (kv_idx < M) | (kv_idx - M <= q_idx + (tk - tq))

    block_mask = create_block_mask(prefix_lm, None, None, tq, M + tk, device="cpu")
    compiled = torch.compile(flex_attention)
    fn = lambda: compiled(q, k, v, block_mask=block_mask, enable_gqa=True, scale=SCALE).transpose(1, 2)  # noqa: E731
    t0 = time.perf_counter()
    fn()
    return fn, time.perf_counter() - t0


def _mplus(x: dict):
    args = (x["q"], x["k"], x["v"], x["mem_k"], x["mem_v"], x["mem_pos"], x["cos"], x["sin"], SCALE, True)
    return lambda: torch.ops.mplus.memory_attention(*args)[0]


def _record_diff_vs_mplus(benchmark, provider: str, x: dict, out: torch.Tensor) -> None:
    """A peer's largest difference from mplus's output on the same inputs (a sanity check, not an assertion)."""
    if provider != "mplus":
        if "mplus_out" not in x:
            x["mplus_out"] = _mplus(x)()
        benchmark.extra_info["max_abs_diff_vs_mplus"] = float((out.float() - x["mplus_out"].float()).abs().max())


def _visible_pairs(tq: int, tk: int) -> int:
    """(query, key) pairs that are computed: all memory keys, and bottom-right causal chunk keys."""
    return tq * M + sum(min(tk, max(0, t + tk - tq + 1)) for t in range(tq))


# Parametrisation order (top varies fastest): every provider on one (Tq, dtype) before the next inputs.
@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
@pytest.mark.parametrize("tq", [1, 256, 2048])
def test_memory_attention(bench, benchmark, provider, dtype, tq):
    if provider == "flex" and dtype == torch.float32 and tq == 2048:
        pytest.skip("flex at fp32 Tq 2048 takes > 10 s per call on this 2-core machine (keeps the suite < 5 min)")
    x = _inputs(tq, dtype)
    first_call = None
    if provider == "flex":
        fn, first_call = _flex(x)
    else:
        fn = {"official": _official, "sdpa_gqa": _sdpa_gqa, "mplus": _mplus}[provider.split("@")[0]](x)

    phase = "decode" if tq == 1 else "prefill"
    extra = {}
    elt = x["q"].element_size()
    out_bytes = B * tq * HQ * D * elt + B * HQ * tq * 4  # out + lse (mplus returns both; peers the out only)
    if phase == "decode":
        n_kv = M + tq
        extra["moved_bytes"] = (2 * B * n_kv * HKV * D + 2 * B * tq * HQ * D) * elt
    out = bench(
        fn,
        group=f"attention/{phase}/T{tq}/{str(dtype).replace('torch.', '')}",
        provider=provider,
        shape=f"B{B} Tq{tq} Tk{tq} M{M} Hq{HQ} Hkv{HKV} D{D}",
        dtype=dtype,
        rounds=ROUNDS[tq],
        warmup_rounds=0 if tq == 2048 else 1,  # the memory measurement already ran (and warmed) the call
        output_bytes=out_bytes,
        **extra,
    )
    median = benchmark.stats.stats.median
    if first_call is not None:
        benchmark.extra_info["compile_s"] = max(0.0, first_call - median)
    flops = 4 * D * HQ * B * _visible_pairs(tq, tq)
    if phase == "prefill":
        benchmark.extra_info["tflops"] = flops / median / 1e12
    benchmark.extra_info["gflop"] = flops / 1e9
    _record_diff_vs_mplus(benchmark, provider, x, out)


# --- decode over memory keys given rotated: what the model's decode steps read ---------------------------------------
# A generation rotates its short-term keys once, at the prefill (``MemoryKV.rotated``), so every decode step calls the
# kernel with them rotated, as the peers above get every key (the prefix, a fifth of the rows, keeps RoPE in the
# kernel). Same inputs and group as ``test_memory_attention[1-*]``; ``mplus_rotated`` gives all 12,801 keys rotated
# (the ``mplus`` row rotates them in the kernel at every call).
@pytest.mark.parametrize("provider", mplus_providers("mplus_rotated"))
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
def test_decode_rotated_memory(bench, benchmark, provider, dtype):
    x = _inputs(1, dtype)
    if "mem_k_rot" not in x:
        x["mem_k_rot"] = apply_rope(x["mem_k"].float(), x["mem_pos"], x["cos"], x["sin"]).to(dtype)
    args = (x["q"], x["k"], x["v"], x["mem_k_rot"], x["mem_v"], None, None, None, SCALE, True)
    elt = x["q"].element_size()
    out = bench(
        lambda: torch.ops.mplus.memory_attention(*args)[0],
        group=f"attention/decode/T1/{str(dtype).replace('torch.', '')}",
        provider=provider,
        variant="memory keys given rotated, as decode steps give the short-term rows",
        shape=f"B{B} Tq1 Tk1 M{M} Hq{HQ} Hkv{HKV} D{D}",
        dtype=dtype,
        rounds=ROUNDS[1],
        output_bytes=B * HQ * D * elt + B * HQ * 4,
        moved_bytes=(2 * B * (M + 1) * HKV * D + 2 * B * HQ * D) * elt,
    )
    _record_diff_vs_mplus(benchmark, provider, x, out)


# --- one memory shared by a batch (serving): B rows decode over the same memory ---------------------------------------
# The model serves one memory state to a batch as an expand (batch stride 0). mplus reads each memory key once for the
# batch's rows (``mplus``); ``mplus_per_row`` is the same kernel on a dense copy per row (what it does for rows with
# different memories, and did for a shared one before); ``sdpa_gqa`` gets [memory ; chunk] rotated, concatenated and
# laid out per row outside the timing (SDPA has no notion of a shared prefix). ``gbps`` counts the memory once.
B_SHARED = 4
SHARED_PROVIDERS = ["sdpa_gqa", "mplus_per_row", *mplus_providers()]


def _shared_inputs(dtype: torch.dtype) -> dict:
    key = ("shared", dtype)
    if key not in _cache:
        one = dict(_inputs(1, dtype))  # the decode inputs (batch 1): their memory is the shared one
        _cache.clear()
        gc.collect()
        g = torch.Generator().manual_seed(7)
        rnd = lambda *s: torch.randn(*s, generator=g).to(dtype)  # noqa: E731
        x = {k: one[k] for k in ("mem_pos", "cos", "sin")}
        x.update(q=rnd(B_SHARED, 1, HQ, D), k=rnd(B_SHARED, 1, HKV, D), v=rnd(B_SHARED, 1, HKV, D))
        x["mem_k"] = one["mem_k"].expand(B_SHARED, -1, -1, -1)
        x["mem_v"] = one["mem_v"].expand(B_SHARED, -1, -1, -1)
        _cache[key] = x
    return _cache[key]


@pytest.mark.parametrize("provider", SHARED_PROVIDERS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
def test_shared_memory_decode(bench, benchmark, provider, dtype):
    x = _shared_inputs(dtype)
    if provider == "sdpa_gqa":
        fn = _sdpa_gqa(x)
    elif provider == "mplus_per_row":
        dense = {**x, "mem_k": x["mem_k"].contiguous(), "mem_v": x["mem_v"].contiguous()}
        fn = _mplus(dense)
    else:
        fn = _mplus(x)
    elt = x["q"].element_size()
    out = bench(
        fn,
        group=f"attention/decode shared memory B{B_SHARED}/{str(dtype).replace('torch.', '')}",
        provider=provider,
        **({"variant": "a dense copy of the memory per row"} if provider == "mplus_per_row" else {}),
        shape=f"B{B_SHARED} (one memory) Tq1 Tk1 M{M} Hq{HQ} Hkv{HKV} D{D}",
        dtype=dtype,
        rounds=20,
        output_bytes=B_SHARED * HQ * D * elt + B_SHARED * HQ * 4,
        moved_bytes=(2 * M * HKV * D + 2 * B_SHARED * HKV * D + 2 * B_SHARED * HQ * D) * elt,
    )
    _record_diff_vs_mplus(benchmark, provider, x, out)


# --- the rotation a generation does once per layer and memory state, at its prefill (``MemoryKV.rotated``) -----------
# The 10,240 short-term keys of one layer (bf16, slot order scrambled) rotated into a new tensor, allocation included
# (what the prefill does): ``mplus`` the op (``mplus_kernels.rotate_keys``, C++), ``torch_chunked`` the torch code it
# replaced (chunks of 1,024 rows, fp32 temporaries, ``addcmul_``), ``reference`` the op's reference (whole-tensor
# torch). ``gbps``: the keys read, the rotated keys written and the table rows read, once.
STM_ROWS = 10_240


def _torch_chunked(k: torch.Tensor, positions: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    out = torch.empty(k.shape, dtype=k.dtype)
    h = k.shape[-1] // 2
    for i in range(0, k.shape[1], 1024):
        j = min(i + 1024, k.shape[1])
        x = k[:, i:j].float()
        a, b = x[..., :h], x[..., h:]
        p = positions[i:j].long()
        c, s = cos[p][:, None], sin[p][:, None]
        lo, hi = a * c, b * c
        lo.addcmul_(b, s, value=-1.0)
        hi.addcmul_(a, s)
        out[:, i:j, :, :h], out[:, i:j, :, h:] = lo, hi
    return out


@pytest.mark.parametrize("provider", ["reference", "torch_chunked", *mplus_providers()])
def test_rotate_keys(bench, benchmark, provider):
    x = _inputs(1, torch.bfloat16)
    args = (x["mem_k"][:, M - STM_ROWS :], x["mem_pos"][M - STM_ROWS :], x["cos"], x["sin"])
    if provider == "reference":
        fn = lambda: mplus_kernels.rotate_keys_reference(*args)  # noqa: E731
    elif provider == "torch_chunked":
        fn = lambda: _torch_chunked(*args)  # noqa: E731
    else:
        fn = lambda: mplus_kernels.rotate_keys(*args)  # noqa: E731
    key_bytes = B * STM_ROWS * HKV * D * 2
    out = bench(
        fn,
        group="attention/rotate keys/bfloat16",
        provider=provider,
        shape=f"B{B} N{STM_ROWS} H{HKV} D{D} (one layer's short-term keys)",
        dtype=torch.bfloat16,
        rounds=10,
        output_bytes=key_bytes,
        moved_bytes=2 * key_bytes + STM_ROWS * D * 4,
    )
    benchmark.extra_info["max_abs_diff_vs_reference"] = float(
        (out.float() - mplus_kernels.rotate_keys_reference(*args).float()).abs().max()
    )
