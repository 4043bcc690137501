"""Memory attention and the exact merge of partial attentions, through the public wrappers.

The Triton kernels run under the CPU interpreter (conftest sets TRITON_INTERPRET=1) on tiny shapes, against the fp32
reference, with FlashAttention's tolerance rule for fp16/bf16 (kernel error ≤ 2× the low-precision reference's own
error). bf16 goes through the interpreter-only ``UPCAST`` path. Launch configurations are forced small ("tiny") in
most cases so that a few dozen tokens already cross several row blocks, key blocks and splits.
"""

from __future__ import annotations

import math

import pytest
import torch

import mplus_kernels as mk
from mplus_kernels import BackendUnavailableError
from mplus_kernels.attention import memory_attention_reference, merge_attention_states_reference
from mplus_kernels.attention import op as attn_op
from mplus_kernels.testing import assert_close, assert_within_reference_error

ti = pytest.importorskip("mplus_kernels.attention.triton_impl")

TINY = ti.AttnConfig(block_m=16, block_n=16, num_warps=4, num_stages=1)
LOWP_FLOOR = {torch.float16: 1e-3, torch.bfloat16: 4e-3}  # atol floor of the 2x rule (an fp16/bf16 ulp near 1)


def _tables(num_positions: int, head_dim: int, theta: float = 500000.0) -> tuple[torch.Tensor, torch.Tensor]:
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)
    angles = torch.arange(num_positions, dtype=torch.float32)[:, None] * inv_freq
    return angles.cos(), angles.sin()


def _inputs(b, tq, tk, hq, hkv, d, m, dtype, seed, *, num_positions=None):
    """Random q/k/v/memory and tables; memory positions are a random permutation (not sorted, not contiguous)."""
    gen = torch.Generator().manual_seed(seed)
    p = num_positions or 3 * (m + tk) + 5
    x = {
        "q": torch.randn(b, tq, hq, d, generator=gen).to(dtype),
        "k": torch.randn(b, tk, hkv, d, generator=gen).to(dtype),
        "v": torch.randn(b, tk, hkv, d, generator=gen).to(dtype),
    }
    if m >= 0:
        x["mem_k"] = torch.randn(b, m, hkv, d, generator=gen).to(dtype)
        x["mem_v"] = torch.randn(b, m, hkv, d, generator=gen).to(dtype)
        x["mem_pos"] = torch.randperm(p, generator=gen)[:m]
        x["rope_cos"], x["rope_sin"] = _tables(p, d)
    return x


def _assert_lse_close(lse, ref, *, atol, name):
    """LSEs agree: the same -inf entries (queries that see no key), the finite ones within atol (relative too)."""
    finite = torch.isfinite(ref)
    assert torch.equal(torch.isfinite(lse), finite), f"{name}: -inf pattern {~torch.isfinite(lse)} != {~finite}"
    assert_close(lse[finite], ref[finite], atol=atol, rtol=atol, name=name)


def _check(out, lse, x, dtype, *, causal=True, name=""):
    """out/lse against the fp32 reference (fp32: tight; fp16/bf16: FlashAttention's 2x rule)."""
    ref_o, ref_l = memory_attention_reference(**x, causal=causal)
    assert out.dtype == dtype and out.shape == x["q"].shape
    assert lse.dtype == torch.float32 and lse.shape == (ref_o.shape[0], ref_o.shape[2], ref_o.shape[1])
    if dtype == torch.float32:
        assert_close(out, ref_o, atol=2e-5, rtol=2e-5, name=f"{name} out")
        _assert_lse_close(lse, ref_l, atol=2e-5, name=f"{name} lse")
        return
    low_o, low_l = memory_attention_reference(**x, causal=causal, compute_dtype=dtype)
    floor = LOWP_FLOOR[dtype]
    assert_within_reference_error(out, ref_o, low_o, atol_floor=floor, name=f"{name} out")
    finite = torch.isfinite(ref_l)
    assert torch.equal(torch.isfinite(lse), finite), f"{name}: lse -inf pattern differs from the reference"
    assert_within_reference_error(lse[finite], ref_l[finite], low_l[finite], atol_floor=floor, name=f"{name} lse")


@pytest.fixture
def nan_outputs(monkeypatch):
    """Every output buffer the Triton launchers allocate starts as NaN, so an element never written shows up."""

    def _nan_empty(*args, **kwargs):
        return torch.empty(*args, **kwargs).fill_(float("nan"))

    monkeypatch.setattr(ti, "_empty", _nan_empty)


# (B, Tq, Tk, Hq, Hkv, D, M, dtype, config); Tk > Tq is a chunk after cached tokens, Tk < Tq leaves the first
# Tq - Tk queries with no visible chunk key
CASES = [
    (1, 1, 1, 8, 2, 64, 100, torch.float16, None),  # decode, GQA 4, default (decode) config
    (2, 1, 5, 8, 1, 64, 23, torch.float32, TINY),  # decode with a cached chunk, GQA 8
    (1, 7, 7, 4, 4, 64, 0, torch.float32, TINY),  # no memory, MHA
    (2, 7, 19, 8, 2, 64, 1, torch.float16, TINY),  # one memory row, cache
    (1, 7, 7, 8, 1, 128, 37, torch.bfloat16, TINY),  # D 128, bf16 through UPCAST
    (1, 64, 64, 4, 1, 64, 100, torch.float16, TINY),  # many row and key blocks, GQA 4
    (1, 64, 64, 4, 1, 128, 13, torch.float32, None),  # D 128, default (prefill) config
    (1, 129, 129, 2, 2, 64, 5, torch.bfloat16, TINY),  # T = 129: ragged last blocks
    (2, 9, 4, 2, 1, 64, 0, torch.float32, TINY),  # Tq > Tk, no memory: queries that see nothing
    (1, 33, 33, 16, 2, 64, 49, torch.bfloat16, None),  # default (prefill) config, bf16
]


@pytest.mark.parametrize(("b", "tq", "tk", "hq", "hkv", "d", "m", "dtype", "config"), CASES)
def test_triton_matches_reference(b, tq, tk, hq, hkv, d, m, dtype, config, nan_outputs):
    x = _inputs(b, tq, tk, hq, hkv, d, m, dtype, seed=tq * 1000 + m)
    scale = 1.0 / math.sqrt(d)
    out, lse = ti.memory_attention_fwd(
        x["q"], x["k"], x["v"], x["mem_k"], x["mem_v"], x["mem_pos"], x["rope_cos"], x["rope_sin"], scale, True,
        config=config, num_splits=1,
    )  # fmt: skip
    _check(out, lse, x, dtype, name="triton")
    if tq > tk and m == 0:  # the first tq - tk queries see no key at all
        assert torch.all(out[:, : tq - tk] == 0) and torch.all(lse[:, :, : tq - tk] == float("-inf"))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("causal", [True, False])
def test_wrapper_triton_backend(dtype, causal, nan_outputs):
    """The public wrapper on backend='triton' with automatic config and split choice."""
    x = _inputs(2, 5, 12, 4, 2, 64, 30, dtype, seed=7)
    out, lse = mk.memory_attention(**x, causal=causal, backend="triton")
    _check(out, lse, x, dtype, causal=causal, name=f"triton causal={causal}")


@pytest.mark.parametrize(
    ("tq", "tk", "m", "splits", "dtype"),
    [
        (1, 1, 100, 4, torch.float16),
        (1, 40, 50, 7, torch.bfloat16),
        (3, 3, 70, 5, torch.float32),
        (6, 30, 0, 3, torch.float32),
    ],
)
def test_split_kv_decode(tq, tk, m, splits, dtype, nan_outputs):
    """Split-KV: partial (out, lse) per key range + the combine kernel == one pass == the reference. With a causal
    chunk, the last splits hold keys no early query sees (their partial lse is -inf for those rows)."""
    x = _inputs(1, tq, tk, 8, 2, 64, m, dtype, seed=splits)
    args = (x["q"], x["k"], x["v"], x["mem_k"], x["mem_v"], x["mem_pos"], x["rope_cos"], x["rope_sin"], 0.125, True)
    out, lse = ti.memory_attention_fwd(*args, config=TINY, num_splits=splits)
    _check(out, lse, x, dtype, name=f"{splits} splits")
    one_o, one_l = ti.memory_attention_fwd(*args, config=TINY, num_splits=1)
    tol = 2e-5 if dtype == torch.float32 else LOWP_FLOOR[dtype]
    assert_close(out.float(), one_o.float(), atol=tol, rtol=tol, name="split vs single pass")
    _assert_lse_close(lse, one_l, atol=1e-5, name="split vs single pass lse")


def _spy_launches(monkeypatch, kernel: str) -> list:
    """The grids of every launch of ``ti.<kernel>`` from now on (the kernel still runs)."""
    grids = []
    real = getattr(ti, kernel)

    class Spy:
        def __getitem__(self, grid):
            grids.append(grid)
            return real[grid]

    monkeypatch.setattr(ti, kernel, Spy())
    return grids


def test_wrapper_decode_takes_the_split_kv_path(monkeypatch, nan_outputs):
    """A decode step over a long memory is split across programs automatically (few programs per SM otherwise)."""
    calls = _spy_launches(monkeypatch, "_combine_splits_kernel")
    x = _inputs(1, 1, 3, 8, 2, 64, 700, torch.float16, seed=13)
    out, lse = mk.memory_attention(**x, backend="triton")
    assert calls, "the decode step did not use split-KV"
    _check(out, lse, x, torch.float16, name="auto split-KV decode")


@pytest.mark.parametrize("splits", [1, 3])
def test_large_scores_stay_finite(splits, nan_outputs):
    """Scores of several hundred (exp overflows fp32 without the running-max shift), in one pass and across splits,
    and a merge of LSEs near ±1000."""
    x = _inputs(1, 3, 3, 4, 2, 64, 45, torch.float32, seed=12)
    args = (x["q"], x["k"], x["v"], x["mem_k"], x["mem_v"], x["mem_pos"], x["rope_cos"], x["rope_sin"], 40.0, True)
    out, lse = ti.memory_attention_fwd(*args, config=TINY, num_splits=splits)
    ref_o, ref_l = memory_attention_reference(**x, softmax_scale=40.0)
    assert ref_l.max() > 200
    assert_close(out, ref_o, atol=1e-4, rtol=1e-4, name="out")
    _assert_lse_close(lse, ref_l, atol=1e-5, name="lse")
    lse_a, lse_b = torch.full((1, 4, 3), 1000.0), torch.full((1, 4, 3), 999.0)
    lse_b[0, 0] = -1000.0
    merged_o, merged_l = mk.merge_attention_states(out, lse_a, ref_o, lse_b, backend="triton")
    # fp64 reference: in fp32, logaddexp near 1000 is itself off by an ulp of 1000 (6e-5)
    expected = merge_attention_states_reference(out.double(), lse_a.double(), ref_o.double(), lse_b.double())
    assert_close(merged_o, expected[0], atol=1e-5, rtol=1e-5, name="merged out")
    _assert_lse_close(merged_l, expected[1], atol=1e-6, name="merged lse")


def test_split_plan():
    cfg = ti.select_config(128, torch.bfloat16, rows=4)
    # Llama-3.1-8B decode: B 1, 8 KV heads, 12,801 memory rows + 20 tokens -> 8 programs without splitting
    splits, split_len = ti.plan_splits(8, 12_821, cfg.block_n, num_sms=132)
    assert splits > 8 and split_len % cfg.block_n == 0
    assert (splits - 1) * split_len < 12_821 <= splits * split_len
    assert split_len >= ti.MIN_SPLIT_KEYS
    # prefill with enough programs, or too few keys: one pass
    assert ti.plan_splits(1024, 14_000, 32, num_sms=132)[0] == 1
    assert ti.plan_splits(8, 300, 64, num_sms=132)[0] == 1
    assert ti.plan_splits(8, 0, 64, num_sms=132)[0] == 1


def test_config_selection_is_compiled():
    """Every configuration select_config can return is in compile_specs (so the AOT check covers it)."""
    names = {s.name for s in ti.compile_specs()}
    for d in ti.HEAD_DIMS:
        for dtype, ty in ((torch.bfloat16, "bf16"), (torch.float16, "fp16"), (torch.float32, "fp32")):
            for rows, mode in ((1, "decode"), (16, "decode"), (17, "small"), (64, "small"), (65, "prefill")):
                cfg = ti.select_config(d, dtype, rows)
                assert cfg == ti._CONFIGS[(mode, d, dtype == torch.float32)]
                assert f"mem_attn[{mode},D{d},{ty}]" in names
                if dtype != torch.float32:
                    assert f"mem_attn[{mode},D{d},{ty},split]" in names
    assert ti.select_config(128, torch.bfloat16, 4).block_m == 16  # decode packs the GQA group into one tile
    with pytest.raises(ValueError, match="head_dim in"):
        ti.select_config(96, torch.float16, 4)


def test_upcast_only_under_interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert ti._upcast(torch.bfloat16) and not ti._upcast(torch.float16) and not ti._upcast(torch.float32)
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert not ti._upcast(torch.bfloat16)


@pytest.mark.parametrize("backend", ["reference", "triton"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_merged_parts_equal_single_call(backend, dtype):
    """Attend to (short-term memory + chunk) and to (long-term memory alone), merge through the LSE: the same as one
    call over all of it. This is how the long-term rows' host-to-device copy overlaps compute."""
    x = _inputs(2, 6, 6, 8, 2, 64, 40, dtype, seed=3)
    cut = 15  # rows [0, 15) play the long-term part, [15, 40) the short-term part
    full_o, full_l = mk.memory_attention(**x, backend=backend)
    tables = {"rope_cos": x["rope_cos"], "rope_sin": x["rope_sin"]}
    stm_o, stm_l = mk.memory_attention(
        x["q"], x["k"], x["v"], x["mem_k"][:, cut:], x["mem_v"][:, cut:], x["mem_pos"][cut:], **tables, backend=backend
    )
    no_chunk = x["k"][:, :0]
    ltm_o, ltm_l = mk.memory_attention(
        x["q"], no_chunk, no_chunk, x["mem_k"][:, :cut], x["mem_v"][:, :cut], x["mem_pos"][:cut], **tables,
        backend=backend,
    )  # fmt: skip
    out, lse = mk.merge_attention_states(stm_o, stm_l, ltm_o, ltm_l, backend=backend)
    tol = 2e-5 if dtype == torch.float32 else 2e-3
    assert_close(out.float(), full_o.float(), atol=tol, rtol=tol, name="merged out")
    _assert_lse_close(lse, full_l, atol=2e-5, name="merged lse")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_merge_kernel_matches_reference(dtype, nan_outputs):
    gen = torch.Generator().manual_seed(11)
    b, t, h, d = 2, 5, 3, 40  # D not a multiple of the kernel's D chunk
    out_a = torch.randn(b, h, t, d, generator=gen).to(dtype).transpose(1, 2)  # non-contiguous [B, T, H, D]
    out_b = torch.randn(b, t, h, d, generator=gen).to(dtype)
    lse_a = torch.randn(b, t, h, generator=gen).transpose(1, 2) * 3  # non-contiguous [B, H, T]
    lse_b = torch.randn(b, h, t, generator=gen) * 3
    lse_a[0, 0, 0] = lse_b[0, 0, 0] = float("-inf")  # neither part saw a key
    lse_a[1, 2, 4] = float("-inf")  # only b did
    lse_b[0, 1, 2] = float("-inf")  # only a did
    out, lse = mk.merge_attention_states(out_a, lse_a, out_b, lse_b, backend="triton")
    ref_o, ref_l = merge_attention_states_reference(out_a, lse_a, out_b, lse_b)
    assert out.dtype == dtype
    assert_close(out.float(), ref_o.float(), atol=1e-5 if dtype == torch.float32 else 1e-2, rtol=1e-2, name="out")
    _assert_lse_close(lse, ref_l, atol=1e-6, name="lse")
    assert torch.all(out[0, 0, 0] == 0) and lse[0, 0, 0] == float("-inf")
    assert_close(out[1, 4, 2].float(), out_b[1, 4, 2].float(), atol=1e-6, rtol=0, name="only b")


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_non_contiguous_and_unaligned_inputs(backend, nan_outputs):
    """HF-layout queries ([B, H, T, D] transposed), a cache view, a batch-shared memory (stride 0), int64 strided
    positions, and a tensor whose start is not 16-byte aligned: all give the contiguous result."""
    b, t, hq, hkv, d, m, cap = 2, 5, 4, 2, 64, 21, 9
    x = _inputs(b, t, t, hq, hkv, d, m, torch.float16, seed=5)
    q = x["q"].transpose(1, 2).contiguous().transpose(1, 2)
    cache_k = torch.randn(b, cap, hkv, d).half()
    cache_k[:, :t] = x["k"]
    k = cache_k[:, :t]
    flat = torch.randn(1 + x["v"].numel()).half()
    v = flat[1:].view_as(x["v"])  # 2-byte offset: not 16-byte aligned
    v.copy_(x["v"])
    shared_k, shared_v = x["mem_k"][:1].expand(b, -1, -1, -1), x["mem_v"][:1].expand(b, -1, -1, -1)
    pos = torch.stack([x["mem_pos"], x["mem_pos"]], dim=1)[:, 0]  # stride 2, int64
    assert not q.is_contiguous() and not k.is_contiguous() and v.data_ptr() % 16 and pos.stride(0) == 2
    out, lse = mk.memory_attention(q, k, v, shared_k, shared_v, pos, x["rope_cos"], x["rope_sin"], backend=backend)
    dense = dict(x, q=q.contiguous(), k=k.contiguous(), v=v.clone(), mem_pos=pos.contiguous().int())
    dense["mem_k"], dense["mem_v"] = shared_k.contiguous(), shared_v.contiguous()
    _check(out, lse, dense, torch.float16, name=f"{backend} non-contiguous")


def test_rotation_in_kernel_equals_prerotated_memory():
    """Rotating pre-RoPE memory keys by mem_pos in the kernel == passing keys rotated beforehand (mem_pos None, the
    identity-table path)."""
    x = _inputs(1, 4, 4, 4, 2, 64, 19, torch.float32, seed=9)
    rotated = mk.attention.apply_rope(x["mem_k"], x["mem_pos"], x["rope_cos"], x["rope_sin"])
    a = mk.memory_attention(**x, backend="triton")
    b = mk.memory_attention(x["q"], x["k"], x["v"], rotated, x["mem_v"], backend="triton")
    assert_close(a[0], b[0], atol=2e-5, rtol=2e-5, name="out")
    _assert_lse_close(a[1], b[1], atol=2e-5, name="lse")
    wrong = dict(x, mem_pos=(x["mem_pos"] + 1) % x["rope_cos"].shape[0])  # the test can fail: positions matter
    assert (mk.memory_attention(**wrong, backend="triton")[0] - a[0]).abs().max() > 1e-3


@pytest.mark.parametrize("d", [64, 128])
def test_empty_shapes(d):
    x = _inputs(1, 0, 0, 4, 2, d, 3, torch.float32, seed=1)
    for backend in ("reference", "triton"):
        out, lse = mk.memory_attention(**x, backend=backend)
        assert out.shape == (1, 0, 4, d) and lse.shape == (1, 4, 0)
    x = _inputs(1, 2, 0, 4, 2, d, 0, torch.float32, seed=1)  # nothing to attend to at all
    out, lse = mk.memory_attention(**x, backend="triton")
    assert torch.all(out == 0) and torch.all(lse == float("-inf"))


# ---------------------------------------------------------------------------------------------------------------
# static KV cache: per-row valid chunk keys [kv_start[b], kv_len[b]), causality aligned to each row's end
# ---------------------------------------------------------------------------------------------------------------
def _static_cache(b, tq, cap, hq, hkv, d, m, dtype, ends, starts, seed):
    """A ``[B, cap, Hkv, D]`` cache whose rows outside ``[starts[b], ends[b])`` are NaN (they must never be read),
    with kv_len/kv_start int32 tensors (None where ``ends``/``starts`` is None)."""
    x = _inputs(b, tq, cap, hq, hkv, d, m, dtype, seed)
    end = torch.tensor(ends if ends is not None else [cap] * b, dtype=torch.int32)
    start = torch.tensor(starts if starts is not None else [0] * b, dtype=torch.int32)
    j = torch.arange(cap)[None, :]
    garbage = (j < start[:, None]) | (j >= end[:, None])  # [B, cap]
    for name in ("k", "v"):
        x[name] = x[name].masked_fill(garbage[:, :, None, None], float("nan"))
    x["kv_len"] = None if ends is None else end
    x["kv_start"] = None if starts is None else start
    return x


def _naive(x: dict, *, causal: bool, scale: float | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Independent float64 formula: the visibility mask built explicitly, one (row, head, query) at a time."""
    q, k, v = x["q"].double(), x["k"].double(), x["v"].double()
    b, tq, hq, d = q.shape
    tk, hkv = k.shape[1], k.shape[2]
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    mem_k = x.get("mem_k")
    m = 0 if mem_k is None else mem_k.shape[1]
    if m:
        mem_k, mem_v = mem_k.double(), x["mem_v"].double()
        if x.get("mem_pos") is not None:  # RoPE in float64, written out (not the reference's apply_rope)
            pos = x["mem_pos"].long()
            cos, sin = x["rope_cos"].double()[pos], x["rope_sin"].double()[pos]  # [M, D/2]
            a, c = mem_k[..., : d // 2], mem_k[..., d // 2 :]
            cos, sin = cos[None, :, None, :], sin[None, :, None, :]
            mem_k = torch.cat([a * cos - c * sin, c * cos + a * sin], dim=-1)
    kv_len, kv_start = x.get("kv_len"), x.get("kv_start")
    out = torch.zeros(b, tq, hq, d, dtype=torch.float64)
    lse = torch.full((b, hq, tq), float("-inf"), dtype=torch.float64)
    for i in range(b):
        end = tk if kv_len is None else int(kv_len[i])
        start = 0 if kv_start is None else int(kv_start[i])
        for t in range(tq):
            chunk = [j for j in range(tk) if start <= j < end and (not causal or j <= t + end - tq)]
            for h in range(hq):
                g = h // (hq // hkv)
                keys = [mem_k[i, r, g] for r in range(m)] + [k[i, j, g] for j in chunk]
                vals = [mem_v[i, r, g] for r in range(m)] + [v[i, j, g] for j in chunk]
                if not keys:
                    continue
                s = torch.stack(keys) @ q[i, t, h] * scale
                lse[i, h, t] = torch.logsumexp(s, 0)
                out[i, t, h] = torch.softmax(s, 0) @ torch.stack(vals)
    return out, lse


# (B, Tq, cap, Hq, Hkv, M, kv_len per row or None, kv_start per row or None)
KV_CASES = [
    (3, 1, 24, 8, 2, 0, [24, 7, 0], None),  # decode, GQA 4, no memory: full, partial and empty rows
    (3, 1, 24, 8, 2, 11, [5, 24, 13], [2, 0, 13]),  # decode with memory; kv_start = kv_len: memory only
    (2, 5, 30, 4, 4, 0, [30, 9], [3, 6]),  # Tq > 1, MHA, left padding
    (2, 5, 30, 4, 1, 9, [4, 30], [0, 17]),  # row 0 has fewer keys than queries: the first ones see only memory
    (3, 6, 20, 8, 2, 3, [0, 20, 11], [0, 20, 1]),  # rows with no chunk key at all, memory of 3
    (2, 3, 17, 2, 2, 0, [0, 2], [0, 1]),  # no memory, rows that see nothing: out 0, lse -inf
]
KV_IDS = [f"B{c[0]}-Tq{c[1]}-G{c[3] // c[4]}-M{c[5]}" for c in KV_CASES]


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize(("b", "tq", "cap", "hq", "hkv", "m", "ends", "starts"), KV_CASES, ids=KV_IDS)
def test_reference_kv_ranges_match_naive_formula(b, tq, cap, hq, hkv, m, ends, starts, causal):
    """The reference's mask (kv_start <= j < kv_len, j <= t + kv_len - Tq) == the rule spelled out in float64; the
    NaN rows outside each row's range never reach the result."""
    x = _static_cache(b, tq, cap, hq, hkv, 8, m, torch.float32, ends, starts, seed=tq + m)
    out, lse = memory_attention_reference(**x, causal=causal)
    ref_o, ref_l = _naive(x, causal=causal)
    assert not out.isnan().any() and not lse.isnan().any()
    assert_close(out.double(), ref_o, atol=1e-5, rtol=1e-5, name="out")
    _assert_lse_close(lse.double(), ref_l, atol=1e-5, name="lse")


def test_reference_without_ranges_is_unchanged():
    """kv_len = Tk and kv_start = 0 given explicitly == not given (the FlashAttention rule over the whole chunk)."""
    x = _inputs(2, 4, 9, 4, 2, 64, 6, torch.float32, seed=21)
    base = memory_attention_reference(**x)
    full = memory_attention_reference(
        **x, kv_len=torch.full((2,), 9, dtype=torch.int32), kv_start=torch.zeros(2, dtype=torch.int32)
    )
    assert_close(full[0], base[0], atol=0, rtol=0, name="out")  # the same arithmetic, the same masks
    _assert_lse_close(full[1], base[1], atol=0, name="lse")
    assert_close(base[0].double(), _naive(x, causal=True)[0], atol=1e-5, rtol=1e-5, name="vs naive")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("splits", [1, 3])
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize(("b", "tq", "cap", "hq", "hkv", "m", "ends", "starts"), KV_CASES, ids=KV_IDS)
def test_triton_kv_ranges(b, tq, cap, hq, hkv, m, ends, starts, causal, splits, dtype, nan_outputs):
    """The kernel loads kv_len/kv_start per row, reads only the valid rows (the others are NaN), and splits each
    row's own keys across the programs (one pass and split-KV)."""
    x = _static_cache(b, tq, cap, hq, hkv, 64, m, dtype, ends, starts, seed=tq * 10 + m)
    args = [x[n] for n in ("q", "k", "v", "mem_k", "mem_v", "mem_pos", "rope_cos", "rope_sin")]
    out, lse = ti.memory_attention_fwd(
        *args, 0.125, causal, x["kv_len"], x["kv_start"], config=TINY, num_splits=splits
    )  # fmt: skip
    assert not out.isnan().any() and not lse.isnan().any()
    ref = dict(x, softmax_scale=0.125)
    _check(out, lse, ref, dtype, causal=causal, name=f"triton splits={splits}")


# A memory shared by the batch rows (an expand, batch stride 0: how the model serves a memory state to a batch): one
# launch over the memory for all B·Tq queries, one over each row's chunk keys, merged by the split combine.
@pytest.mark.parametrize(
    ("b", "tq", "cap", "ends", "starts", "splits", "config", "dtype"),
    [
        (3, 1, 5, None, None, None, None, torch.float16),  # decode, automatic config and splits
        (4, 1, 9, [9, 0, 3, 5], [0, 0, 1, 5], 3, TINY, torch.bfloat16),  # static cache, a row with no chunk key
        (2, 2, 0, None, None, 2, TINY, torch.float32),  # memory only
        (3, 3, 7, [7, 2, 4], None, 1, TINY, torch.float32),  # Tq > valid keys: queries that see memory only
    ],
)
@pytest.mark.parametrize("causal", [True, False])
def test_shared_memory_reads_it_once(b, tq, cap, ends, starts, splits, config, dtype, causal, monkeypatch,
                                     nan_outputs):  # fmt: skip
    x = _static_cache(b, tq, cap, 8, 2, 64, 70, dtype, ends, starts, seed=b * 10 + tq)
    x["mem_k"], x["mem_v"] = x["mem_k"][:1].expand_as(x["mem_k"]), x["mem_v"][:1].expand_as(x["mem_v"])
    assert ti.shares_memory(x["q"], x["mem_k"], x["mem_v"])
    grids = _spy_launches(monkeypatch, "_memory_attention_fwd_kernel")
    args = [x[n] for n in ("q", "k", "v", "mem_k", "mem_v", "mem_pos", "rope_cos", "rope_sin")]
    out, lse = ti.memory_attention_fwd(
        *args, 0.125, causal, x["kv_len"], x["kv_start"], config=config, num_splits=splits
    )  # fmt: skip
    assert grids[0][1] == 2, f"the memory launch covers batch 1 x 2 KV heads, got grid {grids[0]}"
    assert len(grids) == (2 if cap else 1)
    assert not out.isnan().any() and not lse.isnan().any()
    _check(out, lse, dict(x, softmax_scale=0.125), dtype, causal=causal, name="shared memory")
    dense = dict(x, mem_k=x["mem_k"].contiguous(), mem_v=x["mem_v"].contiguous())
    assert not ti.shares_memory(dense["q"], dense["mem_k"], dense["mem_v"])


@pytest.mark.parametrize("backend", ["reference", "triton", "cpp"])
@pytest.mark.parametrize("tq", [1, 6])
def test_wrapper_static_cache_equals_sliced_cache(backend, tq, nan_outputs):
    """The whole static cache + kv_len (+ kv_start) == each row's valid slice passed as the chunk, on every backend
    (close, not exact: the two calls may cut the keys into blocks and splits differently)."""
    if backend == "cpp" and not _cpu_kernel("mplus::memory_attention"):
        pytest.skip("no CPU kernel for memory_attention in this build")
    ends, starts = [19, 6, 12], [0, 2, 12]
    x = _static_cache(3, tq, 24, 8, 2, 64, 10, torch.float32, ends, starts, seed=tq)
    out, lse = mk.memory_attention(**x, backend=backend)
    for i, (e, s) in enumerate(zip(ends, starts)):
        row = slice(i, i + 1)
        o, lo = mk.memory_attention(
            x["q"][row], x["k"][row, s:e], x["v"][row, s:e], x["mem_k"][row], x["mem_v"][row], x["mem_pos"],
            x["rope_cos"], x["rope_sin"], backend=backend,
        )  # fmt: skip
        assert_close(out[row], o, atol=2e-5, rtol=2e-5, name=f"row {i} out")
        _assert_lse_close(lse[row], lo, atol=2e-5, name=f"row {i} lse")


@pytest.mark.parametrize("backend", ["triton", "cpp"])
def test_unchecked_out_of_range_values_never_read_out_of_bounds(backend, monkeypatch):
    """Values the wrapper cannot read (device tensors, tracing: ``host_values`` False) reach the kernels unchecked:
    the C++ op range-checks them itself (ValueError, not a crash), the Triton kernel clamps them to the extents."""
    if backend == "cpp" and not _cpu_kernel("mplus::memory_attention"):
        pytest.skip("no CPU kernel for memory_attention in this build")
    monkeypatch.setattr(attn_op, "host_values", lambda t: False)
    x = _inputs(2, 1, 8, 4, 2, 64, 5, torch.float32, seed=3)
    x["kv_len"] = torch.tensor([8, 100], dtype=torch.int32)
    bad_pos = dict(x, kv_len=None, mem_pos=x["mem_pos"].clone().fill_(10_000))
    if backend == "cpp":
        with pytest.raises(ValueError, match=r"0 <= kv_start <= kv_len <= Tk=8"):
            mk.memory_attention(**x, backend="cpp")
        with pytest.raises(ValueError, match=r"mem_pos values must lie in \[0, \d+\)"):
            mk.memory_attention(**bad_pos, backend="cpp")
        return
    out, lse = mk.memory_attention(**x, backend="triton")  # clamped to kv_len = Tk
    _check(out, lse, dict(x, kv_len=torch.tensor([8, 8], dtype=torch.int32)), torch.float32, name="clamped")
    out, lse = mk.memory_attention(**bad_pos, backend="triton")  # clamped to the last table row: finite, no fault
    assert torch.isfinite(out).all() and torch.isfinite(lse).all()


# ---------------------------------------------------------------------------------------------------------------
# bad input: clear errors before any launch
# ---------------------------------------------------------------------------------------------------------------
def _bad(case: str) -> dict:
    x = _inputs(2, 3, 3, 8, 2, 64, 5, torch.float16, seed=2)
    if case == "q_3d":
        x["q"] = x["q"][0]
    elif case == "gqa":
        x["q"] = torch.randn(2, 3, 6, 64).half()
        x["k"] = x["v"] = torch.randn(2, 3, 4, 64).half()
        x.pop("mem_k"), x.pop("mem_v"), x.pop("mem_pos"), x.pop("rope_cos"), x.pop("rope_sin")
    elif case == "k_head_dim":
        x["k"] = torch.randn(2, 3, 2, 32).half()
    elif case == "v_shape":
        x["v"] = x["v"][:, :2]
    elif case == "odd_d":
        x = {"q": torch.randn(1, 2, 2, 7), "k": torch.randn(1, 2, 2, 7), "v": torch.randn(1, 2, 2, 7)}
    elif case == "int_q":
        x["q"] = x["q"].to(torch.int32)
    elif case == "k_dtype":
        x["k"] = x["k"].float()
    elif case == "mem_k_only":
        x.pop("mem_v")
    elif case == "mem_batch":
        x["mem_k"] = x["mem_v"] = x["mem_k"][:1]
    elif case == "mem_heads":
        x["mem_k"] = x["mem_v"] = torch.randn(2, 5, 4, 64).half()
    elif case == "mem_dtype":
        x["mem_v"] = x["mem_v"].bfloat16()
    elif case == "pos_len":
        x["mem_pos"] = x["mem_pos"][:4]
    elif case == "pos_float":
        x["mem_pos"] = x["mem_pos"].float()
    elif case == "pos_range":
        x["mem_pos"] = x["mem_pos"].clone()
        x["mem_pos"][2] = x["rope_cos"].shape[0]
    elif case == "pos_negative":
        x["mem_pos"] = x["mem_pos"].clone()
        x["mem_pos"][0] = -1
    elif case == "no_tables":
        x.pop("rope_sin")
    elif case == "tables_without_pos":
        x.pop("mem_pos")
    elif case == "table_width":
        x["rope_cos"] = x["rope_sin"] = torch.zeros(50, 64)
    elif case == "table_dtype":
        x["rope_cos"] = x["rope_cos"].half()
    elif case == "table_rows":
        x["rope_sin"] = x["rope_sin"][:-1]
    elif case == "device":
        x["v"] = x["v"].to("meta")
    elif case == "not_tensor":
        x["k"] = x["k"].tolist()
    elif case == "scale":
        x["softmax_scale"] = float("nan")
    elif case == "causal":
        x["causal"] = 1
    elif case == "kv_len_dtype":
        x["kv_len"] = torch.tensor([3, 2])
    elif case == "kv_len_shape":
        x["kv_len"] = torch.tensor([3, 2, 1], dtype=torch.int32)
    elif case == "kv_len_list":
        x["kv_len"] = [3, 2]
    elif case == "kv_start_device":
        x["kv_start"] = torch.zeros(2, dtype=torch.int32, device="meta")
    elif case == "kv_start_float":
        x["kv_start"] = torch.zeros(2)
    elif case == "kv_len_range":
        x["kv_len"] = torch.tensor([3, 4], dtype=torch.int32)
    elif case == "kv_len_negative":
        x["kv_len"] = torch.tensor([-1, 3], dtype=torch.int32)
    elif case == "kv_start_above_len":
        x["kv_len"] = torch.tensor([3, 1], dtype=torch.int32)
        x["kv_start"] = torch.tensor([0, 2], dtype=torch.int32)
    elif case == "kv_start_above_tk":
        x["kv_start"] = torch.tensor([4, 0], dtype=torch.int32)
    return x


BAD = [
    ("q_3d", ValueError, r"q must be \[B, Tq, Hq, D\], got \[3, 8, 64\]"),
    ("gqa", ValueError, r"Hq=6 .* multiple of Hkv=4"),
    ("k_head_dim", ValueError, r"k must be \[B=2, Tk, Hkv, D=64\], got \[2, 3, 2, 32\]"),
    ("v_shape", ValueError, r"v must have k's shape \[2, 3, 2, 64\], got \[2, 2, 2, 64\]"),
    ("odd_d", ValueError, r"D = q.shape\[3\] must be even"),
    ("int_q", TypeError, r"q must be float16, bfloat16 or float32, got torch.int32"),
    ("k_dtype", TypeError, r"k has dtype torch.float32, expected torch.float16"),
    ("mem_k_only", ValueError, r"mem_k and mem_v must be given together"),
    ("mem_batch", ValueError, r"mem_k must be \[B=2, M, Hkv=2, D=64\], got \[1, 5, 2, 64\]"),
    ("mem_heads", ValueError, r"mem_k must be \[B=2, M, Hkv=2, D=64\], got \[2, 5, 4, 64\]"),
    ("mem_dtype", TypeError, r"mem_v has dtype torch.bfloat16, expected torch.float16"),
    ("pos_len", ValueError, r"mem_pos must be \[M=5\]"),
    ("pos_float", TypeError, r"mem_pos must be an integer tensor"),
    ("pos_range", ValueError, r"mem_pos must index the 29 rows .* got range \[\d+, 29\]"),
    ("pos_negative", ValueError, r"0 <= pos < 29\), got range \[-1, \d+\]"),
    ("no_tables", ValueError, r"mem_pos needs both rope_cos and rope_sin"),
    ("tables_without_pos", ValueError, r"rope_cos/rope_sin were given without mem_pos"),
    ("table_width", ValueError, r"rope_cos must be \[P, D/2=32\], got \[50, 64\]"),
    ("table_dtype", TypeError, r"rope_cos has dtype torch.float16, expected torch.float32"),
    ("table_rows", ValueError, r"rope_sin \[28, 32\] must have rope_cos's shape \[29, 32\]"),
    ("device", ValueError, r"v is on meta, expected cpu"),
    ("not_tensor", TypeError, r"k must be a torch.Tensor, got list"),
    ("scale", ValueError, r"softmax_scale must be finite"),
    ("causal", TypeError, r"causal must be a bool"),
    ("kv_len_dtype", TypeError, r"kv_len must be an int32 tensor \[B=2\], got torch.int64"),
    ("kv_len_shape", ValueError, r"kv_len must be \[B=2\] \(one value per batch row\), got \[3\]"),
    ("kv_len_list", TypeError, r"kv_len must be a torch.Tensor, got list"),
    ("kv_start_device", ValueError, r"kv_start is on meta, expected cpu"),
    ("kv_start_float", TypeError, r"kv_start must be an int32 tensor"),
    ("kv_len_range", ValueError, r"batch row 1 needs 0 <= kv_start <= kv_len <= Tk=3 .* kv_start=0, kv_len=4"),
    ("kv_len_negative", ValueError, r"batch row 0 needs 0 <= kv_start <= kv_len .* kv_len=-1"),
    ("kv_start_above_len", ValueError, r"batch row 1 needs .* got kv_start=2, kv_len=1"),
    ("kv_start_above_tk", ValueError, r"batch row 0 needs .* got kv_start=4, kv_len=3"),
]


@pytest.mark.parametrize(("case", "error", "match"), BAD, ids=[c[0] for c in BAD])
@pytest.mark.parametrize("backend", ["triton", "reference", "cpp"])
def test_bad_input_raises_before_launch(case, error, match, backend, monkeypatch):
    def _launched(*args, **kwargs):
        raise AssertionError("a kernel was launched on invalid input")

    monkeypatch.setattr(ti, "memory_attention_fwd", _launched)
    monkeypatch.setattr(attn_op, "memory_attention_reference", _launched)
    monkeypatch.setattr(torch.ops.mplus, "memory_attention", _launched, raising=False)
    with pytest.raises(error, match=match):
        mk.memory_attention(**_bad(case), backend=backend)


def test_bad_merge_inputs_raise():
    o = torch.randn(2, 3, 4, 8)
    lse = torch.randn(2, 4, 3)
    with pytest.raises(ValueError, match=r"out_b must have out_a's shape \[2, 3, 4, 8\], got \[2, 3, 4, 7\]"):
        mk.merge_attention_states(o, lse, o[..., :7], lse, backend="triton")
    with pytest.raises(ValueError, match=r"lse_b must be \[B=2, H=4, T=3\] .* got \[2, 3, 4\]"):
        mk.merge_attention_states(o, lse, o, lse.transpose(1, 2), backend="triton")
    with pytest.raises(TypeError, match=r"lse_a has dtype torch.float16, expected torch.float32"):
        mk.merge_attention_states(o, lse.half(), o, lse, backend="triton")
    with pytest.raises(TypeError, match=r"out_b has dtype torch.float16, expected torch.float32"):
        mk.merge_attention_states(o, lse, o.half(), lse, backend="triton")


def test_triton_rejects_unsupported_head_dim():
    x = {"q": torch.randn(1, 2, 2, 48), "k": torch.randn(1, 2, 2, 48), "v": torch.randn(1, 2, 2, 48)}
    with pytest.raises(ValueError, match=r"triton backend is compiled for head_dim in \(64, 128\), got 48"):
        mk.memory_attention(**x, backend="triton")
    out, _ = mk.memory_attention(**x, backend="reference")  # the reference takes any even D
    assert out.shape == (1, 2, 2, 48)


# ---------------------------------------------------------------------------------------------------------------
# the C++ CPU kernel (a colleague's) through the wrapper, and registration
# ---------------------------------------------------------------------------------------------------------------
def _cpu_kernel(op: str) -> bool:
    from mplus_kernels import _backend

    return _backend.cpp_available() and torch._C._dispatch_has_kernel_for_dispatch_key(op, "CPU")


needs_cpu_attention = pytest.mark.skipif(
    not _cpu_kernel("mplus::memory_attention"),
    reason="torch.ops.mplus.memory_attention has no CPU kernel in this build (csrc/cpu/attention.cpp not built yet)",
)


@needs_cpu_attention
@pytest.mark.parametrize(("b", "tq", "tk", "hq", "hkv", "d", "m", "dtype", "config"), CASES)
def test_cpp_matches_reference(b, tq, tk, hq, hkv, d, m, dtype, config):
    x = _inputs(b, tq, tk, hq, hkv, d, m, dtype, seed=tq * 1000 + m)
    out, lse = mk.memory_attention(**x, backend="cpp")
    _check(out, lse, x, dtype, name="cpp")


@needs_cpu_attention
def test_cpp_non_contiguous_and_merge():
    x = _inputs(2, 4, 9, 8, 2, 64, 17, torch.float32, seed=4)
    q = x["q"].transpose(1, 2).contiguous().transpose(1, 2)
    out, lse = mk.memory_attention(**dict(x, q=q), backend="cpp")
    _check(out, lse, x, torch.float32, name="cpp non-contiguous q")
    if _cpu_kernel("mplus::merge_attention_states"):
        o2, l2 = mk.memory_attention(x["q"], x["k"][:, :0], x["v"][:, :0], x["mem_k"], x["mem_v"], x["mem_pos"],
                                     x["rope_cos"], x["rope_sin"], backend="cpp")  # fmt: skip
        merged = mk.merge_attention_states(out, lse, o2, l2, backend="cpp")
        expected = merge_attention_states_reference(out, lse, o2, l2)
        assert_close(merged[0], expected[0], atol=1e-5, rtol=1e-5, name="cpp merge out")
        _assert_lse_close(merged[1], expected[1], atol=1e-5, name="cpp merge lse")


def test_cpp_backend_without_kernel_says_what_is_missing(monkeypatch):
    from mplus_kernels import _backend

    if not _backend.cpp_available():
        pytest.skip("the C++ extension is not built")
    monkeypatch.setattr(torch._C, "_dispatch_has_kernel_for_dispatch_key", lambda op, key: False)
    x = _inputs(1, 2, 2, 2, 2, 64, 3, torch.float32, seed=0)
    with pytest.raises(
        BackendUnavailableError, match=r"no CPU kernel for mplus::memory_attention \(csrc/cpu/attention\.cpp"
    ):
        mk.memory_attention(**x, backend="cpp")


def test_fake_kernels_give_output_shapes():
    from mplus_kernels import _backend

    if not _backend.cpp_available():
        pytest.skip("the op schemas come from the C++ extension, which is not built")
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        q = torch.empty(2, 5, 8, 64, dtype=torch.bfloat16)
        k = torch.empty(2, 9, 2, 64, dtype=torch.bfloat16)
        mem = torch.empty(2, 30, 2, 64, dtype=torch.bfloat16)
        pos = torch.empty(30, dtype=torch.int32)
        tab = torch.empty(100, 32)
        out, lse = torch.ops.mplus.memory_attention(q, k, k, mem, mem, pos, tab, tab, 0.125, True)
        assert out.shape == (2, 5, 8, 64) and out.dtype == torch.bfloat16
        lens = torch.empty(2, dtype=torch.int32)
        out2, lse2 = torch.ops.mplus.memory_attention(q, k, k, mem, mem, pos, tab, tab, 0.125, True, lens, lens)
        assert out2.shape == out.shape and lse2.shape == lse.shape
        assert lse.shape == (2, 8, 5) and lse.dtype == torch.float32
        o, lse2 = torch.ops.mplus.merge_attention_states(out, lse, out, lse)
        assert o.shape == out.shape and o.dtype == out.dtype and lse2.shape == lse.shape


# ---------------------------------------------------------------------------------------------------------------
# one dispatch path: torch.ops.mplus by device key; torch.compile and the meta device
# ---------------------------------------------------------------------------------------------------------------
needs_schemas = pytest.mark.skipif(
    not _cpu_kernel("mplus::memory_attention"), reason="the op schemas and CPU kernels come from the C++ extension"
)


@needs_schemas
@pytest.mark.parametrize("backend", [None, "auto", "cpp"])
def test_auto_and_cpp_go_through_the_dispatcher(backend, monkeypatch):
    """backend auto (and cpp) on CPU tensors call torch.ops.mplus.<op> with every argument; triton on CPU calls the
    launcher directly (the interpreter), reference the reference."""
    monkeypatch.delenv("MPLUS_BACKEND", raising=False)
    calls = []
    real_attn, real_merge = torch.ops.mplus.memory_attention, torch.ops.mplus.merge_attention_states

    def spy(real, name):
        def call(*args):
            calls.append((name, args))
            return real(*args)

        return call

    monkeypatch.setattr(torch.ops.mplus, "memory_attention", spy(real_attn, "attn"))
    monkeypatch.setattr(torch.ops.mplus, "merge_attention_states", spy(real_merge, "merge"))
    x = _inputs(2, 1, 6, 4, 2, 64, 5, torch.float32, seed=8)
    kv_len = torch.tensor([6, 3], dtype=torch.int32)
    out, lse = mk.memory_attention(**x, kv_len=kv_len, backend=backend)
    mk.merge_attention_states(out, lse, out, lse, backend=backend)
    assert [c[0] for c in calls] == ["attn", "merge"]
    assert calls[0][1][10] is kv_len and calls[0][1][11] is None  # passed through, not read
    _check(out, lse, dict(x, kv_len=kv_len), torch.float32, name="through torch.ops")
    calls.clear()
    mk.memory_attention(**x, kv_len=kv_len, backend="triton")
    mk.memory_attention(**x, kv_len=kv_len, backend="reference")
    mk.merge_attention_states(out, lse, out, lse, backend="triton")
    assert calls == []


@needs_schemas
def test_meta_device_reaches_the_fake_kernels(monkeypatch):
    """q/k/v/memory on the meta device (the stand-in for a GPU) with backend auto: meta outputs of the right shapes
    and dtypes, and no value is read (meta tensors have none)."""
    monkeypatch.delenv("MPLUS_BACKEND", raising=False)
    x = {n: t.to("meta") for n, t in _inputs(2, 3, 7, 8, 2, 64, 5, torch.bfloat16, seed=1).items()}
    kv_len = torch.empty(2, dtype=torch.int32, device="meta")
    out, lse = mk.memory_attention(**x, kv_len=kv_len, kv_start=kv_len)
    assert out.device.type == "meta" and out.shape == (2, 3, 8, 64) and out.dtype == torch.bfloat16
    assert lse.device.type == "meta" and lse.shape == (2, 8, 3) and lse.dtype == torch.float32
    merged, merged_lse = mk.merge_attention_states(out, lse, out, lse, backend="auto")
    assert merged.device.type == "meta" and merged.shape == out.shape and merged_lse.shape == lse.shape
    with pytest.raises(ValueError, match=r"kv_len is on cpu, expected meta"):
        mk.memory_attention(**x, kv_len=torch.zeros(2, dtype=torch.int32))


@needs_schemas
def test_compiled_static_cache_step_does_not_recompile(monkeypatch):
    """torch.compile(fullgraph=True) of a decode step over a static cache with kv_len as a tensor: no graph break
    (fullgraph would raise), one compile, and new kv_len values (every step) reuse it."""
    from torch._dynamo.testing import CompileCounter

    monkeypatch.delenv("MPLUS_BACKEND", raising=False)
    torch._dynamo.reset()
    x = _static_cache(2, 1, 32, 8, 2, 64, 9, torch.float32, None, None, seed=4)
    x.pop("kv_len"), x.pop("kv_start")
    counter = CompileCounter()

    @torch.compile(backend=counter, fullgraph=True)
    def step(q, k, v, kv_len, kv_start):
        out, lse = mk.memory_attention(q, k, v, x["mem_k"], x["mem_v"], x["mem_pos"], x["rope_cos"], x["rope_sin"],
                                       kv_len=kv_len, kv_start=kv_start)  # fmt: skip
        return mk.merge_attention_states(out, lse, out, lse)

    start = torch.tensor([0, 2], dtype=torch.int32)
    for n in (3, 4, 17, 32):
        kv_len = torch.tensor([n, max(2, n - 5)], dtype=torch.int32)
        out, lse = step(x["q"], x["k"], x["v"], kv_len, start)  # a part merged with itself: lse + ln 2
        _check(out, lse - math.log(2), dict(x, kv_len=kv_len, kv_start=start), torch.float32, name=f"kv_len={n}")
    assert counter.frame_count == 1, f"{counter.frame_count} compiles for 4 kv_len values"
    torch._dynamo.reset()
