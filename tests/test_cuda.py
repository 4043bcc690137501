"""The ops and the model on a CUDA device: compiled Triton kernels (backend ``auto``, through ``torch.ops.mplus``)
against the pure-PyTorch reference on the same inputs on the CPU.

Skipped without a GPU (every machine of this project); ``make gpu-check`` runs this file on a GPU machine with
``TRITON_INTERPRET`` unset. Tolerances are those of ``mplus_kernels.testing``: bookkeeping and copied rows exact,
attention by FlashAttention's rule (kernel error ≤ 2× the low-precision reference's own error), fp32 tight.
Shapes go up to the real M+ sizes where the CPU reference stays quick (decode over the full 12,801-row memory,
the 153,600-key long-term store), and include odd sizes, GQA 1/4/8, strided inputs and empty cases.
"""

from __future__ import annotations

import math

import pytest
import torch
from _golden import GOLDEN, load_state

import mplus_kernels as mk
from mplus_kernels import _backend, _config
from mplus_kernels.attention import memory_attention_reference, merge_attention_states_reference
from mplus_kernels.memory_update import logical_view
from mplus_kernels.retrieval import retrieval_scores_reference
from mplus_kernels.testing import assert_close, assert_equal, assert_within_reference_error, nan_like, tolerance

pytestmark = [
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (make gpu-check runs this file)"),
    pytest.mark.skipif(
        torch.cuda.is_available() and _config.triton_interpret(),
        reason="compiled Triton kernels needed: run with TRITON_INTERPRET unset",
    ),
]

CUDA = torch.device("cuda")
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
IDS = ["fp32", "fp16", "bf16"]
LOWP_FLOOR = {torch.float16: 1e-3, torch.bfloat16: 4e-3}  # atol floor of the 2x rule (as tests/test_attention.py)
SCORE_ATOL = 2e-5  # retrieval: fp32 scores from the same inputs, only the summation order differs


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _cuda(x):
    return {k: (v.to(CUDA) if isinstance(v, torch.Tensor) else v) for k, v in x.items()}


def test_ops_have_cuda_kernels_behind_the_dispatcher():
    """On CUDA, ``auto`` is Triton and every op has a CUDA kernel under ``torch.ops.mplus`` (the extension loaded)."""
    assert mk.cpp_available(), f"mplus_kernels._C did not load: {_backend.cpp_import_error()}"
    for op in ("memory_update_", "memory_attention", "merge_attention_states", "rotate_keys", "retrieve_topk",
               "gather_rows_"):  # fmt: skip
        assert _backend.resolve(op, CUDA) == "triton"
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"mplus::{op}", "CUDA"), f"mplus::{op} has no CUDA kernel"


# ------------------------------------------------------------------------------------------------ memory update
def _stm(layers: int, n: int, k: int, feat: tuple[int, ...], dtype: torch.dtype, seed: int) -> dict:
    """A scrambled short-term memory (pos a random permutation per layer, order its inverse) and one update."""
    g = _gen(seed)
    pos = torch.stack([torch.randperm(n, generator=g) for _ in range(layers)]).to(torch.int32)
    order = pos.argsort(dim=1).to(torch.int32)
    return {
        "pos": pos,
        "order": order,
        "victims": mk.draw_victims(layers, n, k, g),
        "slots": [
            (torch.randn(layers, n, *feat, generator=g) * 10).to(dtype),
            torch.rand(layers, n, generator=g, dtype=torch.float64) * 1000,  # ages
            torch.randn(layers, n, 2, 16, generator=g).to(dtype),  # cached K/V rows
        ],
        "new": [
            (torch.randn(layers, k, *feat, generator=g) * 10).to(dtype),
            torch.arange(k - 1, -1, -1, dtype=torch.float64).repeat(layers, 1),
            torch.randn(layers, k, 2, 16, generator=g).to(dtype),
        ],
    }


@pytest.mark.parametrize("dtype", DTYPES, ids=IDS)
@pytest.mark.parametrize(
    ("layers", "n", "k", "feat"),
    [(1, 1, 1, (8,)), (2, 37, 5, (64,)), (3, 1000, 129, (3, 5)), (2, 513, 513, (33,)), (2, 10240, 256, (4096,))],
)
@pytest.mark.parametrize("victims_on", ["cpu", "cuda"])
def test_memory_update_matches_reference(dtype, layers, n, k, feat, victims_on):
    x = _stm(layers, n, k, feat, dtype, seed=n + k)
    ref = {"pos": x["pos"].clone(), "order": x["order"].clone(), "slots": [s.clone() for s in x["slots"]]}
    ref_dropped = mk.memory_update_(ref["pos"], ref["order"], x["victims"], ref["slots"], x["new"], backend="reference")

    pos, order = x["pos"].to(CUDA), x["order"].to(CUDA)
    slots = [s.to(CUDA) for s in x["slots"]]
    dropped = [nan_like(d.to(CUDA)) for d in ref_dropped]  # caller-owned, NaN: an unwritten row shows
    victims = x["victims"].to(victims_on)
    mk.memory_update_(pos, order, victims, slots, [t.to(CUDA) for t in x["new"]], dropped=dropped)
    torch.cuda.synchronize()
    # the reference compacts the slots into logical order; the kernels write in place: compare the logical memory
    _check_permutations(pos.cpu(), order.cpu())
    for i, (got, exp) in enumerate(zip(slots, ref["slots"])):
        assert_equal(logical_view(got.cpu(), order.cpu()), logical_view(exp, ref["order"]), name=f"logical slots[{i}]")
    for i, (got, exp) in enumerate(zip(dropped, ref_dropped)):
        assert_equal(got.cpu(), exp, name=f"dropped[{i}]")
    if mk.cpp_available():  # the C++ kernel runs the same in-place algorithm: the very same slots
        cpp = {"pos": x["pos"].clone(), "order": x["order"].clone(), "slots": [s.clone() for s in x["slots"]]}
        mk.memory_update_(cpp["pos"], cpp["order"], x["victims"], cpp["slots"], x["new"], backend="cpp")
        assert_equal(pos.cpu(), cpp["pos"], name="pos (vs the C++ kernel)")
        assert_equal(order.cpu(), cpp["order"], name="order (vs the C++ kernel)")
        for i, (got, exp) in enumerate(zip(slots, cpp["slots"])):
            assert_equal(got.cpu(), exp, name=f"slots[{i}] (vs the C++ kernel)")


def _check_permutations(pos: torch.Tensor, order: torch.Tensor) -> None:
    n = pos.shape[1]
    rows = torch.arange(n, dtype=torch.int32).expand_as(pos)
    assert_equal(pos.sort(dim=1).values, rows, name="pos is a permutation per layer")
    assert_equal(pos.gather(1, order.long()), rows, name="order is the inverse of pos")


def test_memory_update_chain_of_updates_stays_exact():
    """Ten updates in a row (positions renumbered each time) against the reference: logical memories equal."""
    x = _stm(2, 300, 40, (16,), torch.bfloat16, seed=3)
    ref_pos, ref_order, ref_slots = x["pos"].clone(), x["order"].clone(), [s.clone() for s in x["slots"]]
    pos, order, slots = x["pos"].to(CUDA), x["order"].to(CUDA), [s.to(CUDA) for s in x["slots"]]
    g = _gen(11)
    for step in range(10):
        victims = mk.draw_victims(2, 300, 40, g)
        new = [(t + step).to(t.dtype) for t in x["new"]]
        exp = mk.memory_update_(ref_pos, ref_order, victims, ref_slots, new, backend="reference")
        got = mk.memory_update_(pos, order, victims.to(CUDA), slots, [t.to(CUDA) for t in new])
        for i, (a, b) in enumerate(zip(got, exp)):
            assert_equal(a.cpu(), b, name=f"update {step}: dropped[{i}]")
    _check_permutations(pos.cpu(), order.cpu())
    for i, (a, b) in enumerate(zip(slots, ref_slots)):
        assert_equal(logical_view(a.cpu(), order.cpu()), logical_view(b, ref_order), name=f"logical slots[{i}]")


# ------------------------------------------------------------------------------------------------ attention
def _tables(num_positions: int, head_dim: int, theta: float = 500000.0) -> tuple[torch.Tensor, torch.Tensor]:
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)
    angles = torch.arange(num_positions, dtype=torch.float32)[:, None] * inv_freq
    return angles.cos(), angles.sin()


def _attn_inputs(b, tq, tk, hq, hkv, d, m, dtype, seed, *, strided=False) -> dict:
    g = _gen(seed)
    p = 2 * (m + tk) + 3

    def rnd(*shape):
        if strided:  # [B, H, T, D] storage seen as [B, T, H, D]: non-contiguous, unit stride on D
            return torch.randn(shape[0], shape[2], shape[1], shape[3], generator=g).to(dtype).transpose(1, 2)
        return torch.randn(*shape, generator=g).to(dtype)

    x = {"q": rnd(b, tq, hq, d), "k": rnd(b, tk, hkv, d), "v": rnd(b, tk, hkv, d)}
    if m > 0:
        x["mem_k"], x["mem_v"] = rnd(b, m, hkv, d), rnd(b, m, hkv, d)
        x["mem_pos"] = torch.randperm(p, generator=g)[:m]
        x["rope_cos"], x["rope_sin"] = _tables(p, d)
    return x


def _check_attention(out, lse, x_cpu, dtype, *, causal=True, kv_len=None, name=""):
    extra = {"causal": causal, "kv_len": kv_len}
    ref_o, ref_l = memory_attention_reference(**x_cpu, **extra)
    out, lse = out.cpu(), lse.cpu()
    assert out.dtype == dtype and out.shape == x_cpu["q"].shape, f"{name}: out {out.dtype} {list(out.shape)}"
    assert lse.dtype == torch.float32 and lse.shape == ref_l.shape, f"{name}: lse {list(lse.shape)}"
    finite = torch.isfinite(ref_l)
    assert torch.equal(torch.isfinite(lse), finite), f"{name}: the -inf pattern of lse differs from the reference"
    if dtype == torch.float32:
        assert_close(out, ref_o, dtype=torch.float32, name=f"{name} out")
        assert_close(lse[finite], ref_l[finite], dtype=torch.float32, name=f"{name} lse")
        return
    low_o, low_l = memory_attention_reference(**x_cpu, **extra, compute_dtype=dtype)
    floor = LOWP_FLOOR[dtype]
    assert_within_reference_error(out, ref_o, low_o, atol_floor=floor, name=f"{name} out")
    assert_within_reference_error(lse[finite], ref_l[finite], low_l[finite], atol_floor=floor, name=f"{name} lse")


# (B, Tq, Tk, Hq, Hkv, D, M): decode (Tq 1) and prefill, GQA 1/4/8, ragged blocks, a cache (Tk > Tq), Tq > Tk
ATTENTION_CASES = [
    pytest.param(1, 1, 1, 32, 8, 128, 12_801, id="decode-mplus8b"),  # one layer of mplus-8b: M 12,801, GQA 4
    pytest.param(2, 1, 17, 8, 1, 64, 300, id="decode-cache-gqa8"),
    pytest.param(1, 1, 1, 4, 4, 128, 0, id="decode-no-memory"),
    pytest.param(1, 63, 63, 4, 4, 64, 100, id="prefill-mha"),
    pytest.param(1, 129, 129, 8, 2, 128, 257, id="prefill-ragged-gqa4"),
    pytest.param(2, 200, 300, 16, 2, 128, 1000, id="prefill-cache-gqa8"),
    pytest.param(2, 9, 4, 2, 1, 64, 0, id="tq-gt-tk-no-memory"),
    pytest.param(1, 1024, 1024, 8, 2, 128, 2561, id="prefill-1024"),
]


@pytest.mark.parametrize("dtype", DTYPES, ids=IDS)
@pytest.mark.parametrize(("b", "tq", "tk", "hq", "hkv", "d", "m"), ATTENTION_CASES)
def test_memory_attention_matches_reference(dtype, b, tq, tk, hq, hkv, d, m):
    x = _attn_inputs(b, tq, tk, hq, hkv, d, m, dtype, seed=tq * 31 + m)
    out, lse = mk.memory_attention(**_cuda(x))
    _check_attention(out, lse, x, dtype, name="cuda")


@pytest.mark.parametrize("dtype", DTYPES, ids=IDS)
@pytest.mark.parametrize("causal", [True, False])
def test_memory_attention_strided_inputs(dtype, causal):
    x = _attn_inputs(2, 33, 40, 8, 2, 64, 70, dtype, seed=5, strided=True)
    assert not x["q"].is_contiguous()
    out, lse = mk.memory_attention(**_cuda(x), causal=causal)
    _check_attention(out, lse, x, dtype, causal=causal, name=f"strided causal={causal}")


@pytest.mark.parametrize("dtype", DTYPES, ids=IDS)
def test_memory_attention_static_cache_kv_len(dtype):
    """Decode over a static cache: keys past ``kv_len[b]`` are never read (they hold NaN here)."""
    x = _attn_inputs(2, 1, 64, 8, 2, 128, 129, dtype, seed=9)
    kv_len = torch.tensor([10, 40], dtype=torch.int32)
    for name in ("k", "v"):
        x[name][0, 10:] = float("nan")
        x[name][1, 40:] = float("nan")
    out, lse = mk.memory_attention(**_cuda(x), kv_len=kv_len.to(CUDA))
    _check_attention(out, lse, x, dtype, kv_len=kv_len, name="kv_len")


@pytest.mark.parametrize("dtype", DTYPES, ids=IDS)
def test_memory_attention_under_cuda_graph(dtype):
    """A decode step captured in a CUDA graph replays with new inputs copied into its static buffers."""
    x = _cuda(_attn_inputs(1, 1, 1, 32, 8, 128, 2000, dtype, seed=2))
    static = {k: v.clone() for k, v in x.items()}
    mk.memory_attention(**static)  # compile and warm up outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out, lse = mk.memory_attention(**static)
    fresh = _attn_inputs(1, 1, 1, 32, 8, 128, 2000, dtype, seed=3)
    for name in ("q", "k", "v", "mem_k", "mem_v"):
        static[name].copy_(fresh[name])
    graph.replay()
    torch.cuda.synchronize()
    fresh["mem_pos"], fresh["rope_cos"], fresh["rope_sin"] = (x[n].cpu() for n in ("mem_pos", "rope_cos", "rope_sin"))
    _check_attention(out, lse, fresh, dtype, name="graph replay")


@pytest.mark.parametrize("dtype", DTYPES, ids=IDS)
@pytest.mark.parametrize(("b", "t", "h", "d"), [(1, 1, 32, 128), (2, 77, 8, 64), (1, 300, 4, 96)])
def test_merge_attention_states_matches_reference(dtype, b, t, h, d):
    g = _gen(t)
    out_a = torch.randn(b, t, h, d, generator=g).to(dtype)
    out_b = torch.randn(b, t, h, d, generator=g).to(dtype)
    lse_a = torch.randn(b, h, t, generator=g) * 5
    lse_b = torch.randn(b, h, t, generator=g) * 5
    lse_a[..., ::7] = float("-inf")  # a part that saw no key
    lse_b[..., ::5] = float("-inf")  # (and, at multiples of 35, neither did)
    ref_o, ref_l = merge_attention_states_reference(out_a, lse_a, out_b, lse_b)
    out, lse = mk.merge_attention_states(out_a.to(CUDA), lse_a.to(CUDA), out_b.to(CUDA), lse_b.to(CUDA))
    atol, rtol = tolerance(dtype)
    assert_close(out.cpu(), ref_o, atol=atol, rtol=rtol, name="merged out")
    lse = lse.cpu()
    finite = torch.isfinite(ref_l)
    assert torch.equal(torch.isfinite(lse), finite), "merged lse: the -inf pattern differs from the reference"
    assert_close(lse[finite], ref_l[finite], dtype=torch.float32, name="merged lse")


@pytest.mark.parametrize("dtype", DTYPES, ids=IDS)
@pytest.mark.parametrize(("b", "n", "h", "d"), [(1, 10240, 8, 128), (2, 77, 3, 64), (1, 300, 4, 96)])
def test_rotate_keys_matches_reference_bits(dtype, b, n, h, d):
    """Compiled with enable_fp_fusion=False: the reference's bits (products rounded before the sum), on a strided
    view of the keys too."""
    g = _gen(n)
    k = torch.randn(b, h, n, d, generator=g).to(dtype).transpose(1, 2)  # heads-major storage
    positions = torch.randperm(n + 100, generator=g)[:n]
    angles = torch.rand(n + 100, d // 2, generator=g) * 6.3
    cos, sin = torch.cos(angles), torch.sin(angles)
    want = mk.rotate_keys_reference(k, positions, cos, sin)
    got = mk.rotate_keys(k.to(CUDA), positions.to(CUDA), cos.to(CUDA), sin.to(CUDA))
    assert_equal(got.cpu(), want, name="rotate_keys on CUDA")


def test_attention_parts_merge_to_one_call():
    """Short-term memory + chunk first, long-term rows after, merged: equals one call over all keys (bf16)."""
    x = _attn_inputs(1, 64, 64, 32, 8, 128, 3000, torch.bfloat16, seed=4)
    xc = _cuda(x)
    whole, whole_lse = mk.memory_attention(**xc)
    split = 1000
    part_a = dict(xc, mem_k=xc["mem_k"][:, split:], mem_v=xc["mem_v"][:, split:], mem_pos=xc["mem_pos"][split:])
    part_b = dict(xc, k=xc["k"][:, :0], v=xc["v"][:, :0], mem_k=xc["mem_k"][:, :split], mem_v=xc["mem_v"][:, :split],
                  mem_pos=xc["mem_pos"][:split])  # fmt: skip
    o_a, l_a = mk.memory_attention(**part_a)
    o_b, l_b = mk.memory_attention(**part_b)
    out, lse = mk.merge_attention_states(o_a, l_a, o_b, l_b)
    assert_close(out.float().cpu(), whole.float().cpu(), atol=1.6e-2, rtol=1.6e-2, name="merged vs one call")
    assert_close(lse.cpu(), whole_lse.cpu(), atol=1e-4, rtol=1e-5, name="lse")


# ------------------------------------------------------------------------------------------------ retrieval
def _check_topk(indices, scores, q, k1, k2, k):
    """Scores within SCORE_ATOL of the fp32 reference; the selected set equal to the reference's except inside a
    near-tie band at the boundary."""
    indices, scores = indices.cpu(), scores.cpu()
    ref_all = retrieval_scores_reference(q, k1, keys2=k2)
    total = ref_all.numel()
    k0 = min(k, total)
    assert indices.dtype == torch.int64 and scores.dtype == torch.float32
    assert indices.shape == (k0,) and scores.shape == (k0,), f"got {list(indices.shape)}, expected [{k0}]"
    if k0 == 0:
        return
    assert bool((indices[1:] > indices[:-1]).all()), "indices must be strictly ascending"
    assert int(indices[0]) >= 0 and int(indices[-1]) < total
    assert_close(scores, ref_all[indices], atol=SCORE_ATOL, rtol=0, name="scores of the selected keys")
    ordered = ref_all.sort(descending=True).values
    tau = float(ordered[k0 - 1])
    gap = float(ordered[k0 - 1] - ordered[k0]) if k0 < total else math.inf
    if gap > 2 * SCORE_ATOL:
        ref_idx, _ = mk.retrieve_topk_reference(q, k1, k, keys2=k2)
        assert_equal(indices, ref_idx, name="selected indices")
    else:
        chosen = torch.zeros(total, dtype=torch.bool)
        chosen[indices] = True
        assert bool((ref_all[chosen] >= tau - 2 * SCORE_ATOL).all()), "a selected key scores clearly below the k-th"
        assert bool((ref_all[~chosen] <= tau + 2 * SCORE_ATOL).all()), "a dropped key scores clearly above the k-th"


@pytest.mark.parametrize("dtype", DTYPES, ids=IDS)
@pytest.mark.parametrize(
    ("t", "s1", "s2", "ds", "k"),
    [
        (1, 0, None, 256, 2560),  # an empty store: empty results, no hang
        (1, 100, None, 16, 10),
        (5, 2559, None, 256, 2560),  # fewer keys than K0: every key
        (7, 1000, 37, 64, 100),
        (300, 20_000, 5_000, 256, 2560),
        (256, 153_600, 15_104, 256, 2560),  # the full M+ long-term store + its cache
        (3, 50_000, None, 256, 20_000),  # K0 beyond any fixed top-k limit
    ],
)
def test_retrieve_topk_matches_reference(dtype, t, s1, s2, ds, k):
    g = _gen(t + s1)
    std = 1.0 / ds**0.25  # q·k ~ N(0, 1): scores spread over (0, 1)
    q = (torch.randn(t, ds, generator=g) * std).to(dtype)
    k1 = (torch.randn(s1, ds, generator=g) * std).to(dtype)
    k2 = None if s2 is None else (torch.randn(s2, ds, generator=g) * std).to(dtype)
    indices, scores = mk.retrieve_topk(q.to(CUDA), k1.to(CUDA), k, keys2=None if k2 is None else k2.to(CUDA))
    assert indices.device.type == "cuda" and scores.device.type == "cuda", "results stay on the device"
    _check_topk(indices, scores, q, k1, k2, k)


def test_retrieve_topk_ties_go_to_the_lower_index():
    q = torch.randn(4, 64)
    base = torch.randn(50, 64)
    keys = base.repeat(40, 1)  # every score appears 40 times
    idx, _ = mk.retrieve_topk(q.to(CUDA), keys.to(CUDA), 333)
    ref_idx, _ = mk.retrieve_topk_reference(q, keys, 333)
    assert_equal(idx.cpu(), ref_idx, name="indices under ties")


# ------------------------------------------------------------------------------------------------ gather
@pytest.mark.parametrize("dtype", [*DTYPES, torch.float64, torch.int32], ids=[*IDS, "fp64", "int32"])
@pytest.mark.parametrize("sources", ["cuda", "pinned"])
@pytest.mark.parametrize(
    ("n_a", "n_b", "rows", "feat"), [(0, 5, 3, (7,)), (33, 17, 40, (3, 5)), (1000, 290, 256, (4096,))]
)
def test_gather_rows_matches_reference(dtype, sources, n_a, n_b, rows, feat):
    """Device sources, and pinned host sources read by the kernel through unified addressing (zero-copy)."""
    g = _gen(n_a + rows)
    a = (torch.randn(n_a, *feat, generator=g) * 100).to(dtype)
    b = (torch.randn(n_b, *feat, generator=g) * 100).to(dtype)
    index = torch.randint(0, n_a + n_b, (rows,), generator=g)
    expected = torch.cat([a, b])[index]
    src = (a.to(CUDA), b.to(CUDA)) if sources == "cuda" else (a.pin_memory(), b.pin_memory())
    out = nan_like(torch.empty(rows, *feat, dtype=dtype, device=CUDA))
    mk.gather_rows_(out, *src, index.to(CUDA))
    assert_equal(out.cpu(), expected, name=f"rows gathered from {sources} sources")


def test_gather_rows_from_strided_pinned_capacity_buffers():
    """Sources that are row slices of bigger pinned buffers (the LTM's capacity buffers, the [L, C, d] cache)."""
    big_a = torch.randn(500, 256).pin_memory()
    big_b = torch.randn(3, 200, 256).pin_memory()
    a, b = big_a[:300], big_b[1, 5:120]
    index = torch.randperm(415)[:100]
    out = torch.full((100, 256), float("nan"), device=CUDA)
    mk.gather_rows_(out, a, b, index.to(CUDA))
    assert_equal(out.cpu(), torch.cat([a, b])[index], name="rows")


# ------------------------------------------------------------------------------------------------ the model
MODEL_DIR = GOLDEN / "model"
needs_golden = pytest.mark.skipif(
    not (MODEL_DIR / "config.json").exists(), reason=f"the golden checkpoint is not on this machine ({MODEL_DIR})"
)


def _model(kernels: str):
    """The golden checkpoint. Its head dim (16) is below the Triton attention kernel's (64, 128), so attention and
    its merge run on the reference there; every other op on its CUDA kernel. Every op on CUDA end to end, attention
    included: tests/test_model_memoryllm.py::test_every_op_on_triton_matches_reference_end_to_end[cuda]."""
    from mplus.model import MPlusForCausalLM

    model = MPlusForCausalLM.from_pretrained(str(MODEL_DIR), semantics="reference", kernels=kernels, max_length=64)
    for layer in model.layers:
        layer.self_attn.backend = "reference" if kernels == "fused" else layer.self_attn.backend
    return model


@needs_golden
@pytest.mark.parametrize("kernels", ["fused", "reference"])
def test_model_on_cuda_injects_and_generates_like_the_cpu(kernels):
    """The tiny golden checkpoint moved with ``.cuda()``: two seeded injections then greedy generation give the CPU
    run's tokens (fp32 end to end), and the short-term memory matches."""
    contexts = [load_state(step)["context_ids"] for step in (1, 2)]
    prompt = torch.tensor([[3, 1, 4, 1, 5, 9, 2, 6]])
    runs = {}
    for device in ("cpu", "cuda"):
        model = _model("reference" if device == "cpu" else kernels)
        if device == "cuda":
            model = model.cuda()
        torch.manual_seed(777)  # injection draws its drop choices from torch's default CPU generator
        for ids in contexts:
            model.inject(ids.to(device))
        out = model.generate(
            prompt.to(device), max_new_tokens=8, do_sample=False, output_logits=True, return_dict_in_generate=True
        )
        runs[device] = (out.sequences.cpu(), torch.cat(out.logits).cpu(), model.stm.logical("hidden").cpu())
    assert_equal(runs["cuda"][0], runs["cpu"][0], name="generated tokens")
    assert_close(runs["cuda"][1], runs["cpu"][1], atol=1e-3, rtol=1e-3, name="per-step logits")
    assert_close(runs["cuda"][2], runs["cpu"][2], atol=1e-4, rtol=1e-4, name="short-term memory after injection")


@needs_golden
@pytest.mark.parametrize("kernels", ["fused", "reference"])
def test_model_on_cuda_reproduces_golden_generation(kernels):
    from safetensors.torch import load_file

    from mplus.checkpoint import load_official_memory

    model = _model(kernels).cuda()
    load_official_memory(model, load_state(4))
    golden = load_file(str(GOLDEN / "stable_argsort" / "d_generate_after_inject4.safetensors"))
    out = model.generate(golden["prompt_ids"].cuda(), max_new_tokens=8, do_sample=False)
    assert_equal(out.cpu(), golden["sequences"], name="generated tokens vs the official run")


# ------------------------------------------------------------------------------------------ serving and training
def _generate_tokens(model, ids, **kw):
    out = model.generate(ids, max_new_tokens=6, do_sample=False, output_logits=True, return_dict_in_generate=True,
                         **kw)  # fmt: skip
    return out.sequences.cpu(), torch.stack(out.logits, 1).cpu()


@needs_golden
def test_padded_batch_and_memory_states_on_cuda():
    """Issue 11 on CUDA: a left-padded batch over one memory, then over [state, default, state], each row equal to
    its sequence alone; a second state placed for generation only (its short-term rows stay on the host)."""
    from mplus.checkpoint import load_official_memory

    model = _model("fused").cuda()
    load_official_memory(model, load_state(4))
    prompts = [[3, 1, 4, 1, 5], [9, 2, 6], [5, 3, 5, 8, 9, 7, 9]]
    t = max(map(len, prompts))
    ids = torch.zeros(len(prompts), t, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, p in enumerate(prompts):
        ids[i, t - len(p) :], mask[i, t - len(p) :] = torch.tensor(p), 1
    state = model.new_memory(seed=1).offload()
    model.inject(load_state(1)["context_ids"].cuda(), memory=state.to("cuda"))
    state.offload().to("cuda", what="generation")
    assert state.stm.hidden.device.type == "cpu" and state.stm.k.is_cuda
    for memories in (None, [state, model.memory, state]):
        per_row = memories or [None] * len(prompts)
        batch_tokens, batch_logits = _generate_tokens(model, ids.cuda(), attention_mask=mask.cuda(), pad_token_id=0,
                                                      memory=memories)  # fmt: skip
        for i, (p, m) in enumerate(zip(prompts, per_row)):
            alone_tokens, alone_logits = _generate_tokens(model, torch.tensor([p]).cuda(), memory=m)
            assert_equal(batch_tokens[i, t:], alone_tokens[0, len(p) :], name=f"row {i} tokens")
            assert_close(batch_logits[i], alone_logits[0], atol=1e-4, rtol=1e-4, name=f"row {i} logits")


def _backward_vs_truth(device: torch.device, dtype: torch.dtype, d: int) -> None:
    """Gradients through autograd on ``device`` against fp64 truth (the PyTorch backward of the fp64 reference):
    fp32 within 2e-4; fp16/bf16 within twice the error of the reference run in that precision (+ a floor)."""
    from mplus_kernels.attention.backward import memory_attention_backward

    g = _gen(d)
    b, tq, tk, hq, hkv, m = 2, 37, 41, 8, 2, 70
    names = ("q", "k", "v", "mem_k", "mem_v")
    shapes = [(b, tq, hq, d), (b, tk, hkv, d), (b, tk, hkv, d), (b, m, hkv, d), (b, m, hkv, d)]
    x = {n: torch.randn(*shape, generator=g).to(dtype) for n, shape in zip(names, shapes)}
    ang = torch.arange(128)[:, None].float() * torch.rand(d // 2, generator=g)
    fixed = {
        "mem_pos": torch.randperm(128, generator=g)[:m].int(),
        "rope_cos": ang.cos(),
        "rope_sin": ang.sin(),
        "kv_len": torch.tensor([41, 39], dtype=torch.int32),
        "kv_start": torch.tensor([0, 3], dtype=torch.int32),
    }
    go, gl = torch.randn(b, tq, hq, d, generator=g), torch.randn(b, hq, tq, generator=g)

    def grads(fn, inputs, where):
        leaves = [inputs[n].to(where).requires_grad_() for n in names]
        out, lse = fn(*leaves, **{k: v.to(where) for k, v in fixed.items()}, causal=True)
        return torch.autograd.grad((out, lse), leaves, (go.to(where, out.dtype), gl.to(where)))

    got = grads(mk.memory_attention, x, device)
    wide = {n: t.double() for n, t in x.items()}
    ref_out, ref_lse = memory_attention_reference(**wide, **fixed, causal=True, compute_dtype=torch.float64)
    truth = memory_attention_backward(go.double(), gl.double(), *(wide[n] for n in names), fixed["mem_pos"],
                                      fixed["rope_cos"], fixed["rope_sin"], ref_out, ref_lse, d**-0.5, True,
                                      fixed["kv_len"], fixed["kv_start"])  # fmt: skip
    if dtype == torch.float32:
        for name, a, e in zip(names, got, truth):
            assert_close(a.cpu(), e.float(), atol=2e-4, rtol=1e-4, name=f"d{name}")
        return
    own = grads(lambda *a, **kw: memory_attention_reference(*a, **kw, compute_dtype=dtype), x, "cpu")
    for name, a, r, e in zip(names, got, own, truth):
        err, err_ref = (a.cpu().double() - e).abs().max(), (r.double() - e).abs().max()
        assert err <= 2 * err_ref + LOWP_FLOOR[dtype], f"d{name}: {err:.3g} vs the reference's own {err_ref:.3g}"


@pytest.mark.parametrize("dtype", DTYPES, ids=IDS)
@pytest.mark.parametrize("d", [64, 128])
def test_memory_attention_backward_on_cuda(dtype, d):
    """Issue 12: the Triton backward through autograd on CUDA (see ``_backward_vs_truth``)."""
    _backward_vs_truth(CUDA, dtype, d)


def _training_run(device: str, kernels: str) -> tuple[float, torch.Tensor, dict]:
    """One training step (issue 12) of a tiny M+ whose head dim (64) the Triton attention kernels take, so on CUDA
    every op runs on its Triton kernel, the attention backward and merge included."""
    from mplus import training
    from mplus.checkpoint import refresh_memory_kv
    from mplus.config import MPlusConfig
    from mplus.model import MPlusForCausalLM

    cfg = MPlusConfig.mplus_8b(vocab_size=101, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                               num_attention_heads=2, num_key_value_heads=1, head_dim=64, num_tokens=8, num_blocks=6,
                               num_ltm_blocks=2, selector_hidden_dim=16, update_ltm_frequency=10,
                               lora_config={"r": 4, "lora_alpha": 8}, bos_token_id=None, eos_token_id=None,
                               pad_token_id=None)  # fmt: skip
    torch.manual_seed(0)
    model = MPlusForCausalLM(cfg, kernels=kernels, max_length=96)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name or name == "bos_embedding":
                p.normal_(0, 0.1)
        model.stm.hidden.normal_()
    refresh_memory_kv(model)
    model = model.to(device)
    training.prepare(model)
    model.eval()
    g = torch.Generator().manual_seed(1)
    ids = lambda t: torch.randint(0, cfg.vocab_size, (1, t), generator=g).to(device)  # noqa: E731
    drops = lambda: mk.draw_victims(cfg.num_hidden_layers, cfg.stm_size, cfg.num_tokens, g)  # noqa: E731
    for _ in range(3):  # cached long-term rows for the target to retrieve
        model.inject(ids(24), victims=drops())
    out = training.training_step(model, [ids(20), ids(17)], ids(13), victims=[drops(), drops()], grad="all")
    out.loss.backward()
    grads = {n: p.grad.cpu() for n, p in model.named_parameters() if p.grad is not None}
    return float(out.loss.detach()), out.logits.detach().cpu(), grads


def test_training_step_on_cuda_matches_the_cpu_reference():
    """Loss, logits and every trained parameter's gradient of a training step on CUDA (Triton forward and backward
    kernels) against the same step on the CPU through the pure-PyTorch references and autograd (fp32)."""
    loss, logits, grads = _training_run("cuda", "fused")
    want_loss, want_logits, want_grads = _training_run("cpu", "reference")
    assert loss == pytest.approx(want_loss, rel=1e-5)
    assert_close(logits, want_logits, atol=1e-4, rtol=1e-4, name="logits")
    assert grads.keys() == want_grads.keys() and grads
    for name, g in grads.items():
        assert_close(g, want_grads[name], atol=1e-4, rtol=1e-3, name=name)
