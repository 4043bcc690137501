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


def test_wrapper_decode_takes_the_split_kv_path(monkeypatch, nan_outputs):
    """A decode step over a long memory is split across programs automatically (few programs per SM otherwise)."""
    calls = []
    real = ti._combine_splits_kernel

    class Spy:
        def __getitem__(self, grid):
            calls.append(grid)
            return real[grid]

    monkeypatch.setattr(ti, "_combine_splits_kernel", Spy())
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
        assert lse.shape == (2, 8, 5) and lse.dtype == torch.float32
        o, lse2 = torch.ops.mplus.merge_attention_states(out, lse, out, lse)
        assert o.shape == out.shape and o.dtype == out.dtype and lse2.shape == lse.shape
