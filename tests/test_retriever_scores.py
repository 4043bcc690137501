"""Issue 12, item 2: the fused retriever scores ``mplus::retriever_scores`` and its backward, on every backend.

Truth: autograd of the plain formula ``sigmoid(q @ kᵀ).mean(1)`` in float64, on the very inputs the backend gets
(bf16 / fp16 inputs are rounded first, so only the kernels' arithmetic is measured). Inputs are scaled so that
``q·k ~ N(0, 1)``: the sigmoid is in its sensitive range, not saturated.

Tolerances (:func:`_assert_within`): ``|got − truth| ≤ out_eps·|truth| + op_eps·abs_sum + floor``, elementwise, where
``abs_sum`` is the same sum taken over absolute values (``Σ_t σ`` for w, ``(1/T) Σ_n |g_n σ'| |k_n|`` for dq, ...):
the bound of a floating-point sum of those terms.
* ``op_eps``: fp32 accumulation over at most a few hundred terms, ``1e-5`` (bf16 / fp16 products are exact in fp32,
  so this holds for every input dtype); the Triton kernels round the second product's operand (σ', or σ'·g/ĝ) to the
  fp16 input dtype for the tensor cores: ``2^-10`` (twice fp16's half-ulp) there.
* ``out_eps``: the rounding of the result to its dtype: 0 for the fp32 scores, half an ulp for gradients returned in
  bf16 (``2^-8``) or fp16 (``2^-11``); ``floor`` covers fp16's subnormal spacing.
"""

from __future__ import annotations

import pytest
import torch

from mplus_kernels import _backend, compile_check
from mplus_kernels._backend import BackendUnavailableError
from mplus_kernels.retrieval import scores as sc
from mplus_kernels.retrieval import triton_scores as ts
from mplus_kernels.testing import assert_equal, measure_peak_memory, peak_memory_available

if not _backend.cpp_available():  # a missing build is a failure, not a skip
    raise ImportError(f"the C++ extension did not load: {_backend.cpp_import_error()}")

# (L, T, N, ds): T = 1, N = 1, N = 0, N and T not multiples of any tile (kBlock 8/16/32, kDotMR 6/14, chunks of
# 48/112 rows), T and N above one chunk, ds 16/64/256 and one that is no multiple of the vector width (40)
SHAPES = [
    (1, 1, 1, 16),
    (2, 5, 37, 16),
    (3, 33, 70, 64),
    (1, 130, 150, 64),
    (2, 17, 45, 256),
    (2, 1, 60, 256),
    (1, 40, 1, 256),
    (2, 9, 21, 40),
    (2, 19, 41, 33),  # odd ds: a tail of every vector loop, and a zero-padded last pair of the vdpbf16ps dots
    (2, 3, 0, 16),
]
# the Triton interpreter is slow: smaller shapes, and TINY tiles so that they still span many blocks and ds slices
TRITON_SHAPES = [(1, 1, 1, 16), (2, 5, 37, 16), (2, 9, 21, 40), (1, 17, 33, 64), (1, 3, 5, 256), (2, 3, 0, 16)]
TINY = ts.ScoresConfig(16, 16, 16, 16, 4, 1)
OUT_EPS = {torch.float32: 0.0, torch.bfloat16: 2.0**-8, torch.float16: 2.0**-11}
FP16_FLOOR = 2.0**-25  # half of fp16's subnormal spacing


def _inputs(shape, dtype, seed=0):
    n_layers, t, n, ds = shape
    gen = torch.Generator().manual_seed(seed)
    std = ds**-0.25
    q = (torch.randn(n_layers, t, ds, generator=gen) * std).to(dtype)
    k = (torch.randn(n_layers, n, ds, generator=gen) * std).to(dtype)
    g = torch.randn(n_layers, n, generator=gen)
    return q, k, g


def _truth(q, k, g):
    """fp64 autograd of the plain formula, and the absolute-value sums that bound each result's rounding error."""
    q64, k64 = q.double().requires_grad_(), k.double().requires_grad_()
    s = q64 @ k64.transpose(1, 2)
    w = torch.sigmoid(s).mean(1)
    dq, dk = torch.autograd.grad(w, (q64, k64), g.double())
    with torch.no_grad():
        sig = torch.sigmoid(s)
        d = (sig * (1 - sig) * g.double()[:, None, :]).abs() / q.shape[1]  # [L, T, N]
        bounds = {"w": w, "dq": d @ k64.abs(), "dk": d.transpose(1, 2) @ q64.abs()}
    return {"w": w.detach(), "dq": dq, "dk": dk}, bounds


def _run(backend, q, k, g, **kwargs):
    q, k = q.clone().requires_grad_(), k.clone().requires_grad_()
    w = sc.retriever_scores(q, k, backend=backend, **kwargs)
    dq, dk = torch.autograd.grad(w, (q, k), g)
    return {"w": w, "dq": dq, "dk": dk}


def _assert_within(got, truth, abs_sum, *, out_eps, op_eps, floor=0.0, name="tensor"):
    assert got.shape == truth.shape, f"{name}: shape {list(got.shape)} != {list(truth.shape)}"
    err = (got.double() - truth).abs()
    bound = out_eps * truth.abs() + op_eps * abs_sum + floor
    bad = ~(err <= bound)  # NaN fails
    if bad.any():
        i = tuple(bad.nonzero()[0].tolist())
        worst = float((err / bound.clamp_min(1e-300)).max())
        raise AssertionError(
            f"{name}: {int(bad.sum())} of {bad.numel()} elements out of bounds (worst: {worst:.3g}x the bound); "
            f"first at {i}: {float(got[i]):.8g} vs {float(truth[i]):.8g}, bound {float(bound[i]):.3g}"
        )


def _assert_matches_truth(got, q, k, g, *, op_eps=1e-5):
    truth, bounds = _truth(q, k, g)
    assert got["w"].dtype == torch.float32 and got["dq"].dtype == q.dtype and got["dk"].dtype == k.dtype
    _assert_within(got["w"], truth["w"], bounds["w"], out_eps=0.0, op_eps=op_eps, floor=1e-7, name="w")
    floor = FP16_FLOOR if q.dtype == torch.float16 else 0.0
    for name in ("dq", "dk"):
        _assert_within(got[name], truth[name], bounds[name], out_eps=OUT_EPS[q.dtype], op_eps=op_eps, floor=floor,
                       name=name)  # fmt: skip


@pytest.fixture
def nan_outputs(monkeypatch):
    """Every output buffer the Triton launchers allocate starts as NaN, so an element never written shows up."""
    monkeypatch.setattr(ts, "_empty", lambda *a, **kw: torch.empty(*a, **kw).fill_(float("nan")))


# ------------------------------------------------------------------------------------------------ parity
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=["fp32", "bf16", "fp16"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "L{}T{}N{}ds{}".format(*s))
def test_cpp_matches_the_fp64_formula(cpu_isa, shape, dtype):  # noqa: ARG001 - cpu_isa: every ISA level
    q, k, g = _inputs(shape, dtype)
    _assert_matches_truth(_run("cpp", q, k, g), q, k, g)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=["fp32", "bf16", "fp16"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "L{}T{}N{}ds{}".format(*s))
def test_reference_matches_the_fp64_formula(shape, dtype):
    q, k, g = _inputs(shape, dtype)
    _assert_matches_truth(_run("reference", q, k, g), q, k, g)


@pytest.mark.parametrize("config", [TINY, None], ids=["tiny-tiles", "launch-configs"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("shape", TRITON_SHAPES, ids=lambda s: "L{}T{}N{}ds{}".format(*s))
def test_triton_matches_the_fp64_formula(nan_outputs, shape, dtype, config):  # noqa: ARG001
    q, k, g = _inputs(shape, dtype)
    got = {"w": ts.retriever_scores_fwd(q, k, config=config)}
    got["dq"], got["dk"] = ts.retriever_scores_bwd(g, q, k, config=config)
    _assert_matches_truth(got, q, k, g, op_eps=1e-5 if dtype == torch.float32 else 2.0**-10)


def test_triton_backend_through_the_wrapper_is_differentiable():
    """``backend="triton"`` on CPU tensors (the interpreter route, an autograd.Function) gives the same gradients."""
    q, k, g = _inputs((2, 5, 37, 16), torch.float32)
    _assert_matches_truth(_run("triton", q, k, g), q, k, g)


def test_small_gradients_keep_their_precision_in_fp16_triton():
    """A training loss's upstream gradient is ~1/(rows counted), below fp16's normal range once multiplied by σ':
    the dq kernel normalises it by the layer's max |g| before rounding the operand to fp16."""
    q, k, g = _inputs((1, 9, 40, 16), torch.float16)
    g = g * 1e-6
    got = {"w": ts.retriever_scores_fwd(q, k)}
    got["dq"], got["dk"] = ts.retriever_scores_bwd(g, q, k)
    _assert_matches_truth(got, q, k, g, op_eps=2.0**-10)


@pytest.mark.parametrize("backend", ["cpp", "triton", "reference"])
def test_non_contiguous_inputs(backend):
    """Layers and rows in any order, and keys whose ds dimension is not unit-stride."""
    gen = torch.Generator().manual_seed(3)
    q = (torch.randn(9, 2, 16, generator=gen) * 0.5).transpose(0, 1)  # [2, 9, 16], layer stride 16
    k = (torch.randn(2, 16, 21, generator=gen) * 0.5).transpose(1, 2)  # [2, 21, 16], ds stride 21
    g = torch.randn(2, 21, generator=gen)
    _assert_matches_truth(_run(backend, q, k, g), q, k, g)


def test_backends_agree_on_the_public_op():
    q, k, g = _inputs((2, 9, 21, 40), torch.float32)
    runs = {b: _run(b, q, k, g) for b in ("auto", "cpp", "reference", "triton")}
    assert_equal(runs["auto"]["dq"], runs["cpp"]["dq"], name="auto on CPU is cpp")
    for b in ("reference", "triton"):
        for name in ("w", "dq", "dk"):
            torch.testing.assert_close(runs[b][name], runs["cpp"][name], atol=1e-6, rtol=1e-5)


# ------------------------------------------------------------------------------------------------ determinism
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_cpp_backward_is_deterministic_across_runs_and_thread_counts(cpu_isa, dtype):  # noqa: ARG001
    """At every ISA level (bf16 at avx512_bf16: the vdpbf16ps dot products), odd ds (a zero-padded last pair)."""
    q, k, g = _inputs((2, 70, 150, 63), dtype, seed=5)
    first = torch.ops.mplus.retriever_scores_backward(g, q, k)
    again = torch.ops.mplus.retriever_scores_backward(g, q, k)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        single = torch.ops.mplus.retriever_scores_backward(g, q, k)
        w_single = torch.ops.mplus.retriever_scores(q, k)
    finally:
        torch.set_num_threads(threads)
    for name, a, b, c in zip(("dq", "dk"), first, again, single):
        assert_equal(b, a, name=f"{name}, second run")
        assert_equal(c, a, name=f"{name}, one thread")
    assert_equal(w_single, torch.ops.mplus.retriever_scores(q, k), name="w, one thread")


def test_triton_backward_is_deterministic():
    q, k, g = _inputs((1, 33, 40, 16), torch.float32, seed=6)
    a = ts.retriever_scores_bwd(g, q, k, config=TINY)
    b = ts.retriever_scores_bwd(g, q, k, config=TINY)
    for name, x, y in zip(("dq", "dk"), a, b):
        assert_equal(x, y, name=name)


# ------------------------------------------------------------------------------------------------ autograd, opcheck
@pytest.mark.parametrize("shape", [(2, 4, 7, 5), (1, 1, 1, 3), (1, 3, 0, 2)], ids=str)
def test_gradcheck_fp64_cpp(shape):
    n_layers, t, n, ds = shape
    gen = torch.Generator().manual_seed(1)
    q = torch.randn(n_layers, t, ds, dtype=torch.float64, generator=gen, requires_grad=True)
    k = torch.randn(n_layers, n, ds, dtype=torch.float64, generator=gen, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, b: sc.retriever_scores(a, b, backend="cpp"), (q, k))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16], ids=["fp32", "fp64", "bf16"])
def test_opcheck_raw_ops(dtype):
    q, k, g = _inputs((2, 3, 9, 8), dtype)
    g = g.to(sc._score_dtype(dtype))
    torch.library.opcheck(torch.ops.mplus.retriever_scores.default, (q.requires_grad_(), k.requires_grad_()))
    torch.library.opcheck(torch.ops.mplus.retriever_scores_backward.default, (g, q.detach(), k.detach()))


def test_double_backward_is_refused():
    q, k, g = _inputs((1, 3, 4, 8), torch.float32)
    q.requires_grad_()
    w = sc.retriever_scores(q, k)
    with pytest.raises(NotImplementedError, match="retriever_scores_backward: queries requires grad"):
        torch.autograd.grad(w, q, g, create_graph=True)


def test_compiles_fullgraph_forward_and_backward():
    from torch._dynamo.testing import CompileCounterWithBackend

    torch._dynamo.reset()
    counter = CompileCounterWithBackend("aot_eager")
    fn = torch.compile(lambda a, b: sc.retriever_scores(a, b).square().sum(), backend=counter, fullgraph=True)
    try:
        for seed in range(2):
            q, k, _ = _inputs((2, 5, 11, 16), torch.float32, seed=seed)
            a = [q.clone().requires_grad_(), k.clone().requires_grad_()]
            b = [q.clone().requires_grad_(), k.clone().requires_grad_()]
            fn(*a).backward()
            sc.retriever_scores(*b).square().sum().backward()
            for x, y, name in zip(a, b, ("dq", "dk")):
                assert_equal(x.grad, y.grad, name=f"compiled {name}, step {seed}")
        assert counter.frame_count == 1
    finally:
        torch._dynamo.reset()


# ------------------------------------------------------------------------------------------------ meta device
@pytest.mark.parametrize("backend", ["auto", "reference"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.float64], ids=["fp16", "fp64"])
def test_meta_shapes_forward_and_backward(backend, dtype):
    q = torch.empty(3, 5, 16, dtype=dtype, device="meta", requires_grad=True)
    k = torch.empty(3, 11, 16, dtype=dtype, device="meta", requires_grad=True)
    w = sc.retriever_scores(q, k, backend=backend)
    assert w.device.type == "meta" and w.shape == (3, 11) and w.dtype == sc._score_dtype(dtype)
    w.sum().backward()
    assert q.grad.shape == q.shape and q.grad.dtype == dtype and k.grad.shape == k.shape and k.grad.dtype == dtype


def test_meta_raw_ops():
    q, k = torch.empty(2, 4, 8, device="meta"), torch.empty(2, 6, 8, device="meta")
    assert torch.ops.mplus.retriever_scores(q, k).shape == (2, 6)
    dq, dk = torch.ops.mplus.retriever_scores_backward(torch.empty(2, 6, device="meta"), q, k)
    assert dq.shape == q.shape and dk.shape == k.shape and dq.device.type == "meta"


# ------------------------------------------------------------------------------------------------ bad input
def _q(*shape, dtype=torch.float32, device="cpu"):
    return torch.zeros(*shape, dtype=dtype, device=device)


BAD = {
    "queries-2d": (lambda: (_q(5, 16), _q(2, 7, 16)), ValueError, r"queries must be a 3-D \[L, T, ds\]"),
    "keys-2d": (lambda: (_q(2, 5, 16), _q(7, 16)), ValueError, "keys"),
    "L-mismatch": (lambda: (_q(2, 5, 16), _q(3, 7, 16)), ValueError, r"keys.*\[3, 7, 16\]"),
    "ds-mismatch": (lambda: (_q(2, 5, 16), _q(2, 7, 8)), ValueError, r"keys.*\[2, 7, 8\]"),
    "T=0": (lambda: (_q(2, 0, 16), _q(2, 7, 16)), ValueError, r"T = 0"),
    "dtype-mismatch": (lambda: (_q(2, 5, 16), _q(2, 7, 16, dtype=torch.float16)), TypeError, "keys have dtype"),
    "int-dtype": (
        lambda: (_q(2, 5, 16, dtype=torch.int32), _q(2, 7, 16, dtype=torch.int32)),
        TypeError,
        "queries must be float",
    ),
    "device-mismatch": (lambda: (_q(2, 5, 16), _q(2, 7, 16, device="meta")), ValueError, "keys.*meta"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_input_wrapper(case):
    make, exc, pattern = BAD[case]
    with pytest.raises(exc, match=pattern):
        sc.retriever_scores(*make())


@pytest.mark.parametrize("case", list(BAD))
def test_bad_input_raw_ops(case):
    make, exc, pattern = BAD[case]
    q, k = make()
    with pytest.raises(exc, match=pattern):
        torch.ops.mplus.retriever_scores(q, k)
    grad = torch.zeros(q.shape[0], k.shape[1] if k.dim() > 1 else 1)
    with pytest.raises(exc, match=pattern):
        torch.ops.mplus.retriever_scores_backward(grad, q, k)


@pytest.mark.parametrize("device", ["cpu", "meta"])
def test_bad_grad_raw_backward(device):
    q, k = _q(2, 5, 16, device=device), _q(2, 7, 16, device=device)
    with pytest.raises(ValueError, match=r"grad must be .*\[L=2, N=7\].*\[2, 6\]"):
        torch.ops.mplus.retriever_scores_backward(_q(2, 6, device=device), q, k)
    with pytest.raises(TypeError, match=r"(?i)grad must be .*float.*got .*(double|float64)"):
        torch.ops.mplus.retriever_scores_backward(_q(2, 7, dtype=torch.float64, device=device), q, k)


def test_none_argument():
    with pytest.raises(TypeError, match="keys must be a torch.Tensor"):
        sc.retriever_scores(_q(2, 5, 16), None)


# ------------------------------------------------------------------------------------------------ routing
def test_auto_on_cpu_goes_through_the_dispatcher(monkeypatch):
    calls = []
    real = torch.ops.mplus.retriever_scores

    def spy(*args):
        calls.append(args)
        return real(*args)

    monkeypatch.setattr(torch.ops.mplus, "retriever_scores", spy, raising=False)
    q, k, _ = _inputs((1, 3, 4, 8), torch.float32)
    sc.retriever_scores(q, k)
    sc.retriever_scores(q, k, backend="reference")
    assert len(calls) == 1 and calls[0][0] is q


def test_requested_backend_that_cannot_run_raises(monkeypatch):
    q, k, _ = _inputs((1, 3, 4, 8), torch.float32)
    with pytest.raises(BackendUnavailableError, match="CPU kernels only"):
        sc.retriever_scores(q.to("meta"), k.to("meta"), backend="cpp")
    with pytest.raises(TypeError, match="triton backend takes .* float64"):
        sc.retriever_scores(q.double(), k.double(), backend="triton")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(BackendUnavailableError, match="interpreter"):
        sc.retriever_scores(q, k, backend="triton")


def test_missing_cpu_kernel_or_extension_raises(monkeypatch):
    q, k, _ = _inputs((1, 3, 4, 8), torch.float32)
    with monkeypatch.context() as m:
        m.setattr(torch._C, "_dispatch_has_kernel_for_dispatch_key", lambda op, key: False)
        with pytest.raises(BackendUnavailableError, match=r"no CPU kernel for mplus::retriever_scores"):
            sc.retriever_scores(q, k)
    monkeypatch.setattr(_backend, "_C_IMPORT_ERROR", "ImportError: simulated")
    with pytest.raises(BackendUnavailableError, match="simulated"):
        sc.retriever_scores(q, k, backend="cpp")


# ------------------------------------------------------------------------------------------------ memory
@pytest.mark.skipif(not peak_memory_available(), reason="peak memory needs /proc/self/clear_refs")
def test_cpp_never_materialises_the_score_matrix():
    """[T, N] fp32 is 16 MiB here, the inputs 320 KiB: the fused forward + backward stays far below the matrix,
    the reference (which holds it) does not."""
    q, k, g = _inputs((1, 1024, 4096, 16), torch.float32)
    matrix = 1024 * 4096 * 4

    def run(backend):
        return lambda: _run(backend, q, k, g)

    run("cpp")()
    _, fused = measure_peak_memory(run("cpp"))
    _, reference = measure_peak_memory(run("reference"))
    assert fused < matrix / 8, f"cpp peak {fused / 2**20:.1f} MiB"
    assert reference > matrix, f"reference peak {reference / 2**20:.1f} MiB: the meter measures nothing"


# ------------------------------------------------------------------------------------------------ compile check
def test_compile_specs_cover_every_kernel_and_config():
    """Each launched kernel of triton_scores has a compile spec, every configuration the launchers can pick is among
    them, and the compile check reaches the module (SPEC_MODULES). Under the interpreter the kernels are not
    JITFunctions: the names the specs point at are checked."""
    specs = ts.compile_specs()
    fns = {spec.fn.__name__ if hasattr(spec.fn, "__name__") else spec.fn.fn.__name__ for spec in specs}
    assert fns == {"_scores_fwd_kernel", "_scores_bwd_dk_kernel", "_scores_bwd_dq_kernel"}, fns
    names = {spec.name for spec in specs}
    for dtype, ty in ((torch.float16, "fp16"), (torch.bfloat16, "bf16"), (torch.float32, "fp32")):
        for ds in (1, 16, 40, 64, 65, 128, 200, 256, 300, 1024):
            for kernel in ("fwd", "dk", "dq"):
                cfg = ts.select_config(kernel, ds, dtype)
                want = f"retriever_scores_{kernel}[{ty}{f',DS{cfg.block_ds}' if kernel != 'fwd' else ''}]"
                assert want in names, want
                spec = next(s for s in specs if s.name == want)
                assert (spec.num_warps, spec.num_stages) == (cfg.num_warps, cfg.num_stages)
                assert spec.constexprs["BLOCK_M"] == cfg.block_m and spec.constexprs["BLOCK_K"] == cfg.block_k
    assert "triton_scores" in compile_check.SPEC_MODULES["retrieval"]
    assert names <= {s.name for s in compile_check.all_specs(("retrieval",))}
