"""Fuzz tests of every public op and every raw ``torch.ops.mplus`` op (issue 10, findings 2 and 7).

Each example builds a valid call (odd and empty shapes, every dtype the op takes, transposed / sliced / ``expand()``ed
/ non-contiguous layouts), then applies at most one mutation: an out-of-range or negative index, a wrong dtype, shape
or device (``meta`` tensors mixed with CPU ones), None in place of a tensor, an aliased or stride-0 output, ... For the
public wrappers (``cpp`` and ``reference`` backends) and for the raw ops the contract is:

* a malformed call raises ``ValueError`` or ``TypeError`` whose message names the offending argument, and the whole
  storage of every tensor argument is bit-identical afterwards;
* any other call returns what the pure-PyTorch reference computes (bit-exact for data movement, the package's
  tolerances for arithmetic) and writes nothing outside its outputs;
* never a crash: a segfault kills the run, an internal error (IndexError, AttributeError, a bare RuntimeError) fails
  the example.

One exception, for raw ops only: torch's schema parser refuses a list holding None where the schema says ``Tensor[]``
before any kernel runs, with a RuntimeError naming the argument. The Triton backend shares the wrappers' validation
and is not fuzzed here (the interpreter is too slow for hundreds of calls); tests/test_*.py cover its kernels.
Hypothesis runs derandomised (one fixed seed per test), so CI sees the same examples every time.
"""

from __future__ import annotations

import math
import re

import pytest
import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from torch import Tensor

import mplus_kernels as mk
from mplus_kernels import _backend
from mplus_kernels._utils import as_bits
from mplus_kernels.attention.reference import memory_attention_reference, merge_attention_states_reference
from mplus_kernels.memory_update import logical_view
from mplus_kernels.retrieval.reference import retrieval_scores_reference
from mplus_kernels.testing import assert_close, assert_equal

if not _backend.cpp_available():  # a missing build is a failure, not a skip
    raise ImportError(f"the C++ extension did not load: {_backend.cpp_import_error()}")

# Every mutation kind is a test of its own (so each runs in CI whatever hypothesis draws), on FUZZ_KIND examples of
# the calls it applies to; FUZZ_VALID examples of unmutated calls check the results. function_scoped_fixture: the
# only fixture is cpu_isa, which holds for the whole test (every example), as intended.
FUZZ_KIND = settings(
    max_examples=10,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much, HealthCheck.function_scoped_fixture],
)
FUZZ_VALID = settings(FUZZ_KIND, max_examples=200)
FLOATS = [torch.float32, torch.float16, torch.bfloat16]
ANY_DTYPES = [*FLOATS, torch.float64, torch.int8, torch.int32, torch.int64, torch.uint8, torch.bool]
META = torch.device("meta")
PARSER_ERROR = "Expected a value of type"  # torch's schema parser (raw ops only), see the module docstring


# ------------------------------------------------------------------------------------------------------- helpers
def _gen(data) -> torch.Generator:
    return torch.Generator().manual_seed(data.draw(st.integers(0, 2**16 - 1), label="seed"))


def _values(shape, dtype: torch.dtype, gen: torch.Generator) -> Tensor:
    """Exact small values: multiples of 1/8 in [-1/2, 1/2] for floats (every product and short sum exact)."""
    if dtype == torch.bool:
        return torch.randint(0, 2, shape, generator=gen).bool()
    if dtype.is_floating_point:
        return (torch.randint(-4, 5, shape, generator=gen) * 0.125).to(dtype)
    return torch.randint(0 if dtype == torch.uint8 else -100, 100, shape, generator=gen).to(dtype)


def _laid_out(values: Tensor, layout: str, gen: torch.Generator) -> Tensor:
    """``values`` in another memory layout (same logical shape). ``sliced<d>``: every other index of dim d of a larger
    buffer of garbage; ``swap<ij>``: dims i and j swapped in memory; ``last_strided``: the last dim has stride 2;
    ``expanded<d>``: dim d has stride 0 (every slice along it a copy of the first: the values change)."""
    dims = values.dim()
    if layout == "contiguous" or dims == 0:
        return values
    kind, d = layout.rstrip("0123"), [int(c) for c in layout[len(layout.rstrip("0123")) :]]
    if kind == "sliced" and d[0] < dims:
        shape = list(values.shape)
        shape[d[0]] = 2 * shape[d[0]] + 1
        buf = _values(shape, values.dtype, gen)
        view = buf.narrow(d[0], 1, 2 * values.shape[d[0]]).unflatten(d[0], (values.shape[d[0]], 2)).select(d[0] + 1, 0)
        view.copy_(values)
        return view
    if kind == "swap" and max(d) < dims:
        return values.transpose(*d).contiguous().transpose(*d)
    if kind == "last_strided":
        buf = _values((*values.shape[:-1], 2 * values.shape[-1]), values.dtype, gen)
        buf[..., ::2] = values
        return buf[..., ::2]
    if kind == "expanded" and d[0] < dims and values.shape[d[0]] > 0:
        return values.narrow(d[0], 0, 1).expand(values.shape)
    return values


def _storage(t: Tensor) -> Tensor | None:
    """A copy of every byte of ``t``'s storage (None for meta tensors: they have no data)."""
    if t.device.type == "meta":
        return None
    return torch.empty(0, dtype=torch.uint8).set_(t.untyped_storage()).clone()


def _tensors(*args) -> list[Tensor]:
    """Every tensor among ``args`` (lists and tuples included), once."""
    out: list[Tensor] = []
    for a in args:
        for t in a if isinstance(a, (list, tuple)) else [a]:
            if isinstance(t, Tensor) and not any(t is u for u in out):
                out.append(t)
    return out


def _names(msg: str, name: str) -> bool:
    return re.search(rf"(?<!\w){re.escape(name)}(?!\w)", msg) is not None


def _assert_rejected(call, culprits: tuple[str, ...], args: list[Tensor], *, raw: bool = False) -> None:
    """``call()`` raises ValueError/TypeError naming one of ``culprits`` and leaves every tensor's storage as it was."""
    before = [(t, _storage(t)) for t in args]
    with pytest.raises((ValueError, TypeError, RuntimeError)) as info:
        call()
    err, msg = info.value, str(info.value)
    if not isinstance(err, (ValueError, TypeError)):  # only torch's schema parser, and only for a raw op
        assert raw and PARSER_ERROR in msg, f"expected ValueError/TypeError naming {culprits}, got {err!r}"
    assert any(_names(msg, c) for c in culprits), f"{type(err).__name__} does not name any of {culprits}: {msg}"
    for i, (t, b) in enumerate(before):
        if b is not None:
            assert_equal(_storage(t), b, name=f"storage of tensor argument {i} after a rejected call ({msg[:80]})")


def _assert_storage(t: Tensor, before: Tensor, expected: Tensor | None, name: str) -> None:
    """``t``'s storage equals ``before`` except that ``t``'s own elements hold ``expected`` (None: whatever they hold
    now): nothing outside the view was written."""
    want = before.clone()
    view = torch.empty(0, dtype=t.dtype).set_(want.untyped_storage(), t.storage_offset(), t.shape, t.stride())
    view.copy_(t if expected is None else expected)
    assert_equal(_storage(t), want, name=f"storage of {name}")


def _assert_bits(actual: Tensor, expected: Tensor, name: str) -> None:
    assert actual.shape == expected.shape and actual.dtype == expected.dtype, f"{name}: {actual.dtype} {actual.shape}"
    assert_equal(as_bits(actual.contiguous()), as_bits(expected.contiguous()), name=name)


def _pick(kind: str, options: dict[str, bool]) -> str:
    """``kind`` when it applies to the call drawn so far (``options[kind]``), else the example is discarded."""
    assume(kind == "none" or options[kind])
    return kind


# The mutations of each op: (for both the wrapper and the raw op, the wrapper only, the raw op only). Each fuzz
# function's applicability table names the same kinds (a KeyError there means the two drifted apart).
KINDS = {
    "gather_rows_": (
        "index_high index_negative index_float index_bool index_shape index_2d index_meta src_a_meta src_b_meta "
        "src_dtype src_row_shape src_not_dense out_not_dense out_stride0 out_aliases_src out_0d empty_sources "
        "none_out none_src_a none_src_b none_index",
        "bad_backend all_meta",
        "index_int32 index_noncontig",
    ),
    "memory_update_": (
        "victim_high victim_negative victim_duplicate victims_float victims_shape victims_too_many victims_meta "
        "order_out_of_range pos_not_inverse pos_int64 pos_noncontig order_shape pos_meta slot_meta slot_not_dense "
        "slot_stride0 slot_shape fresh_shape fresh_dtype fresh_meta dropped_shape dropped_dtype dropped_meta "
        "dropped_not_dense dropped_stride0 dropped_aliases_slot none_pos none_order none_victims none_slot "
        "none_fresh none_dropped length_mismatch",
        "slots_tensor bad_backend all_meta",
        "victims_unsorted victims_int32 fresh_not_dense",
    ),
    "retrieve_topk": (
        "queries_empty keys_width keys2_width keys_dtype keys2_dtype queries_int queries_f64 keys_3d keys_1d "
        "keys_meta keys2_meta queries_meta k_negative none_queries none_keys nan_queries",
        "k_float k_bool bad_backend all_meta",
        "",
    ),
    "memory_attention": (
        "mem_pos_high mem_pos_negative kv_len_high kv_len_negative kv_start_after_len kv_len_int64 kv_len_shape "
        "kv_len_meta mem_v_missing mem_k_3d mem_k_1d mem_v_shape rope_missing rope_width rope_f64 mem_pos_shape "
        "mem_pos_float mem_pos_meta k_dtype v_shape hkv_mismatch q_3d q_int q_f64 k_meta q_meta mem_k_meta none_q "
        "none_k none_v mem_pos_without_mem rope_without_pos",
        "scale_nan causal_int d_odd bad_backend all_meta",
        "mem_pos_int64",
    ),
    "merge_attention_states": (
        "out_b_shape out_b_dtype lse_a_shape lse_b_dtype out_a_3d out_a_int lse_a_meta out_b_meta out_a_meta "
        "none_out_a none_lse_a none_out_b none_lse_b",
        "bad_backend all_meta",
        "",
    ),
}


def _kinds(op: str, raw: bool) -> list[str]:
    both, wrapper, raw_only = KINDS[op]
    return (both + " " + (raw_only if raw else wrapper)).split()


# --------------------------------------------------------------------------------------------------- gather_rows_
def _fuzz_gather(data, raw: bool, kind: str) -> None:
    draw, gen = data.draw, _gen(data)
    na, nb = draw(st.integers(0, 4)), draw(st.integers(0, 4))
    r = draw(st.integers(0, 5)) if na + nb else 0
    feat = draw(st.sampled_from([(), (0,), (1,), (3,), (2, 3)]))
    dtype = draw(st.sampled_from(ANY_DTYPES))
    row, total = math.prod(feat), na + nb
    src = ["contiguous", "sliced0", "expanded0"]
    a = {
        "out": _laid_out(_values((r, *feat), dtype, gen), draw(st.sampled_from(["contiguous", "sliced0"])), gen),
        "src_a": _laid_out(_values((na, *feat), dtype, gen), draw(st.sampled_from(src)), gen),
        "src_b": _laid_out(_values((nb, *feat), dtype, gen), draw(st.sampled_from(src)), gen),
        "index": torch.randint(0, max(total, 1), (r,), generator=gen),
    }
    if not raw:  # the wrapper takes any integer dtype and layout
        a["index"] = _laid_out(a["index"].to(draw(st.sampled_from([torch.int64, torch.int32, torch.int16]))),
                               draw(st.sampled_from(["contiguous", "sliced0"])), gen)  # fmt: skip
    backend = None if raw else draw(st.sampled_from(["cpp", "reference"]))
    culprits: tuple[str, ...] = ()
    kind = _pick(kind, {
        "index_high": r > 0, "index_negative": r > 0, "index_float": True, "index_bool": True, "index_shape": True,
        "index_2d": True, "index_meta": True, "src_a_meta": True, "src_b_meta": True, "src_dtype": True,
        "src_row_shape": True, "src_not_dense": bool(feat) and feat[-1] >= 2 and na > 0,
        "out_not_dense": bool(feat) and feat[-1] >= 2 and r > 0,
        "out_stride0": r >= 2 and row > 0, "out_aliases_src": 1 <= r <= na and row > 0 and backend != "reference",
        "out_0d": True, "empty_sources": r > 0, "none_out": True, "none_src_a": True, "none_src_b": True,
        "none_index": True,
        "bad_backend": not raw, "index_int32": raw, "index_noncontig": raw and r >= 2, "all_meta": not raw,
    })  # fmt: skip
    if kind in ("index_high", "index_negative"):
        a["index"] = a["index"].clone()
        j, x = draw(st.integers(0, r - 1)), draw(st.integers(0, 3))
        big = draw(st.sampled_from([0, 2**32, 2**62])) if a["index"].dtype == torch.int64 else 0
        a["index"][j] = total + x + big if kind == "index_high" else -1 - x - big
        culprits = ("index",)
    elif kind in ("index_float", "index_bool", "index_int32"):
        a["index"] = a["index"].to({"index_float": torch.float32, "index_bool": torch.bool}.get(kind, torch.int32))
        if kind == "index_float" and r > 0:
            a["index"][0] = float("nan")  # indices as floats, NaN among them
        culprits = ("index",)
    elif kind == "index_shape":
        a["index"], culprits = torch.zeros(r + 1, dtype=torch.int64), ("index",)
    elif kind == "index_2d":
        a["index"], culprits = a["index"][:, None], ("index",)
    elif kind == "index_noncontig":
        a["index"], culprits = _laid_out(a["index"], "sliced0", gen), ("index",)
    elif kind in ("index_meta", "src_a_meta", "src_b_meta"):
        name = kind[: -len("_meta")]
        a[name], culprits = a[name].to(META), (name,)
    elif kind == "src_dtype":
        a["src_a"] = a["src_a"].to(torch.float64 if dtype != torch.float64 else torch.float32)
        culprits = ("src_a",)
    elif kind == "src_row_shape":
        a["src_b"], culprits = a["src_b"][..., None].expand(*a["src_b"].shape, 2), ("src_b",)
    elif kind in ("src_not_dense", "out_not_dense"):
        name = "src_a" if kind == "src_not_dense" else "out"
        a[name], culprits = _laid_out(a[name].contiguous(), "last_strided", gen), (name,)
    elif kind == "out_stride0":
        a["out"], culprits = _laid_out(a["out"].contiguous(), "expanded0", gen), ("out",)
    elif kind == "out_aliases_src":
        a["out"], culprits = a["src_a"][:r], ("out", "src_a")
    elif kind == "empty_sources":
        a["src_a"], a["src_b"], culprits = a["src_a"][:0], a["src_b"][:0], ("index",)
    elif kind == "out_0d":
        a["out"], culprits = _values((), dtype, gen), ("out",)
    elif kind.startswith("none_"):
        a[kind[5:]], culprits = None, (kind[5:],)
    elif kind == "bad_backend":
        backend, culprits = "gpu", ("backend",)
    elif kind == "all_meta":  # out and index on the meta device, host sources: the fake kernel, no values
        a["out"], a["index"] = a["out"].to(META), a["index"].to(META)
        backend = None if backend == "cpp" else backend  # cpp has CPU kernels only; reference runs on meta
    call = (
        (lambda: torch.ops.mplus.gather_rows_(*a.values()))
        if raw
        else (lambda: mk.gather_rows_(*a.values(), backend=backend))
    )
    if culprits:
        _assert_rejected(call, culprits, _tensors(*a.values()), raw=raw)
        return
    if kind == "all_meta":
        assert mk.gather_rows_(*a.values(), backend=backend) is a["out"]
        return
    expected = torch.cat([a["src_a"], a["src_b"]])[a["index"].long()]
    before = _storage(a["out"])
    result = call()
    assert raw or result is a["out"]
    _assert_bits(a["out"], expected, "gathered rows")
    _assert_storage(a["out"], before, expected, "out")


@FUZZ_VALID
@given(st.data())
def test_fuzz_gather_rows_valid(data):
    _fuzz_gather(data, raw=False, kind="none")


@FUZZ_VALID
@given(st.data())
def test_fuzz_gather_rows_raw_op_valid(data):
    _fuzz_gather(data, raw=True, kind="none")


@pytest.mark.parametrize("kind", _kinds("gather_rows_", raw=False))
@FUZZ_KIND
@given(data=st.data())
def test_fuzz_gather_rows(kind, data):
    _fuzz_gather(data, raw=False, kind=kind)


@pytest.mark.parametrize("kind", _kinds("gather_rows_", raw=True))
@FUZZ_KIND
@given(data=st.data())
def test_fuzz_gather_rows_raw_op(kind, data):
    _fuzz_gather(data, raw=True, kind=kind)


# -------------------------------------------------------------------------------------------------- memory_update_
def _fuzz_memory_update(data, raw: bool, kind: str) -> None:
    draw, gen = data.draw, _gen(data)
    num_layers, n = draw(st.integers(0, 3)), draw(st.integers(0, 6))
    k = draw(st.integers(0, n))
    order = torch.stack([torch.randperm(n, generator=gen) for _ in range(num_layers)]) if num_layers else None
    order = torch.empty(0, n, dtype=torch.int64) if order is None else order
    pos = torch.empty_like(order).scatter_(1, order, torch.arange(n).expand_as(order))  # pos[order[p]] = p
    victims = [torch.randperm(n, generator=gen)[:k].sort().values for _ in range(num_layers)]
    victims = torch.stack(victims) if victims else torch.empty(0, k, dtype=torch.int64)
    a = {"pos": pos.int(), "order": order.int(), "victims": victims}
    if not raw:  # any order, integer dtype and layout
        a["victims"] = a["victims"][:, torch.randperm(k, generator=gen)]
        a["victims"] = a["victims"].to(draw(st.sampled_from([torch.int64, torch.int32, torch.int16])))
        a["victims"] = _laid_out(a["victims"], draw(st.sampled_from(["contiguous", "swap01"])), gen)
    slots, fresh, dropped, rows = [], [], [], []
    for _ in range(draw(st.integers(0, 3))):
        feat, dtype = draw(st.sampled_from([(), (1,), (3,), (2, 2), (0,)])), draw(st.sampled_from(ANY_DTYPES))
        rows.append(math.prod(feat))
        slot_layout = draw(st.sampled_from(["contiguous", "sliced0", "sliced1", "swap01"]))
        fresh_layouts = ["contiguous", "sliced1", "expanded0", "expanded1"] + ([] if raw else ["last_strided"])
        slots.append(_laid_out(_values((num_layers, n, *feat), dtype, gen), slot_layout, gen))
        fresh.append(_laid_out(_values((num_layers, k, *feat), dtype, gen), draw(st.sampled_from(fresh_layouts)), gen))
        drop_layout = draw(st.sampled_from(["contiguous", "sliced1", "swap01"]))
        dropped.append(_laid_out(_values((num_layers, k, *feat), dtype, gen), drop_layout, gen))
    a.update(slots=slots, new_rows=fresh, dropped=dropped)
    backend = None if raw else draw(st.sampled_from(["cpp", "reference"]))
    if not raw and draw(st.booleans()):
        a["dropped"] = None  # the wrapper allocates them
    m = len(slots)
    i = draw(st.integers(0, max(m - 1, 0)))  # the slot tensor a per-slot mutation targets
    has_rows = m > 0 and rows[i] > 0
    wide = m > 0 and slots[i].dim() > 2 and slots[i].shape[-1] >= 2  # a last dim that can be made non-dense
    kind = _pick(kind, {
        "victim_high": num_layers * k > 0, "victim_negative": num_layers * k > 0,
        "victim_duplicate": k >= 2 and num_layers > 0,
        "victims_float": True, "victims_shape": True, "victims_too_many": True, "victims_meta": True,
        "order_out_of_range": num_layers * n > 0, "pos_not_inverse": n >= 2 and num_layers > 0, "pos_int64": True,
        "pos_noncontig": n >= 2 and num_layers >= 2, "order_shape": True, "pos_meta": True,
        "slot_meta": m > 0, "slot_not_dense": wide and num_layers * n > 0,
        "slot_stride0": has_rows and num_layers * n >= 2 and min(num_layers, n) > 0,
        "slot_shape": m > 0, "fresh_shape": m > 0, "fresh_dtype": m > 0, "fresh_meta": m > 0,
        "dropped_shape": m > 0 and a["dropped"] is not None, "dropped_dtype": m > 0 and a["dropped"] is not None,
        "dropped_meta": m > 0 and a["dropped"] is not None,
        "dropped_not_dense": wide and a["dropped"] is not None and num_layers * k > 0,
        "dropped_stride0": has_rows and a["dropped"] is not None and num_layers * k >= 2 and min(num_layers, k) > 0,
        "dropped_aliases_slot": has_rows and num_layers * k > 0 and backend != "reference" and a["dropped"] is not None,
        "none_pos": True, "none_order": True, "none_victims": True, "none_slot": m > 0, "none_fresh": m > 0,
        "none_dropped": m > 0 and a["dropped"] is not None, "length_mismatch": m > 0, "slots_tensor": not raw and m > 0,
        "bad_backend": not raw, "victims_unsorted": raw and k >= 2 and num_layers > 0, "victims_int32": raw,
        "fresh_not_dense": raw and wide and num_layers * k > 0, "all_meta": not raw,
    })  # fmt: skip
    culprits: tuple[str, ...] = ()
    si, fi, di = f"slots[{i}]", f"new_rows[{i}]", f"dropped[{i}]"
    if kind in ("victim_high", "victim_negative", "victim_duplicate", "victims_unsorted"):
        v = a["victims"] = a["victims"].clone()
        layer = draw(st.integers(0, num_layers - 1))
        if kind == "victim_duplicate":
            v[layer, 1] = v[layer, 0]
        elif kind == "victims_unsorted":
            v[layer] = v[layer].flip(0)
        else:
            v[layer, draw(st.integers(0, k - 1))] = n + draw(st.integers(0, 3)) if kind == "victim_high" else -1
        culprits = ("victims",)
    elif kind in ("victims_float", "victims_int32"):
        a["victims"] = a["victims"].to(torch.float32 if kind == "victims_float" else torch.int32)
        if kind == "victims_float" and num_layers * k > 0:
            a["victims"][0, 0] = float("nan")
        culprits = ("victims",)
    elif kind == "victims_shape":
        a["victims"], culprits = torch.zeros(num_layers + 1, k, dtype=torch.int64), ("victims",)
    elif kind == "victims_too_many":
        a["victims"] = torch.arange(n + 1).expand(num_layers, n + 1).contiguous()
        culprits = ("victims",)
    elif kind in ("victims_meta", "pos_meta"):
        name = kind[: -len("_meta")]
        a[name], culprits = a[name].to(META), ("victims",) if name == "victims" else ("pos", "order")
    elif kind == "order_out_of_range":
        a["order"][draw(st.integers(0, num_layers - 1)), draw(st.integers(0, n - 1))] = n + draw(st.integers(0, 3))
        culprits = ("order",)
    elif kind == "pos_not_inverse":
        a["pos"][draw(st.integers(0, num_layers - 1)), :2] = a["pos"][0, :2].flip(0).clone()
        culprits = ("pos", "order")
        if bool((a["pos"].gather(1, a["order"].long()) == torch.arange(n)).all()):
            culprits = ()  # the swap happened to keep them inverse (layers with the same two entries swapped back)
    elif kind == "pos_int64":
        a["pos"], culprits = a["pos"].long(), ("pos",)
    elif kind == "pos_noncontig":
        a["pos"], culprits = _laid_out(a["pos"], "swap01", gen), ("pos",)
    elif kind == "order_shape":
        a["order"], culprits = torch.zeros(num_layers, n + 1, dtype=torch.int32), ("order",)
    elif kind in ("slot_meta", "fresh_meta", "dropped_meta"):
        key, name = {"slot_meta": ("slots", si), "fresh_meta": ("new_rows", fi), "dropped_meta": ("dropped", di)}[kind]
        a[key][i], culprits = a[key][i].to(META), (name,)
    elif kind in ("slot_not_dense", "dropped_not_dense", "fresh_not_dense"):
        key, name = {"slot_not_dense": ("slots", si), "dropped_not_dense": ("dropped", di)}.get(kind, ("new_rows", fi))
        a[key][i], culprits = _laid_out(a[key][i].contiguous(), "last_strided", gen), (name,)
    elif kind in ("slot_stride0", "dropped_stride0"):
        key, name = ("slots", si) if kind == "slot_stride0" else ("dropped", di)
        t = a[key][i].contiguous()
        a[key][i] = _laid_out(t, "expanded0" if num_layers >= 2 else "expanded1", gen)  # a dim of size >= 2
        culprits = (name,)
    elif kind in ("slot_shape", "fresh_shape", "dropped_shape"):
        key, name = {"slot_shape": ("slots", si), "fresh_shape": ("new_rows", fi)}.get(kind, ("dropped", di))
        t = a[key][i]
        a[key][i], culprits = torch.zeros((t.shape[0], t.shape[1] + 1, *t.shape[2:]), dtype=t.dtype), (name,)
    elif kind in ("fresh_dtype", "dropped_dtype"):
        key, name = ("new_rows", fi) if kind == "fresh_dtype" else ("dropped", di)
        t = a[key][i]
        a[key][i] = t.to(torch.float64 if t.dtype != torch.float64 else torch.float32)
        culprits = (name,)
    elif kind == "dropped_aliases_slot":
        a["dropped"][i], culprits = slots[i][:, :k], (si, di)
    elif kind.startswith("none_"):
        key = {"slot": "slots", "fresh": "new_rows", "dropped": "dropped"}.get(kind[5:], kind[5:])
        if key in ("slots", "new_rows", "dropped"):
            a[key][i], culprits = None, (f"{key}[{i}]", key)
        else:
            a[key], culprits = None, (key,)
    elif kind == "length_mismatch":
        a["new_rows"], culprits = a["new_rows"][:-1], ("new_rows", "slots")
    elif kind == "slots_tensor":
        a["slots"], culprits = slots[0], ("slots",)
    elif kind == "bad_backend":
        backend, culprits = "gpu", ("backend",)
    elif kind == "all_meta":
        a = {
            key: [t.to(META) for t in x] if isinstance(x, list) else x.to(META) for key, x in a.items() if x is not None
        }
        a.setdefault("dropped", None)
        backend = None if backend == "cpp" else backend  # cpp has CPU kernels only; reference runs on meta
    args = list(a.values())

    def call():
        if raw:
            return torch.ops.mplus.memory_update_(*args)
        return mk.memory_update_(*args[:5], dropped=args[5], backend=backend)

    if culprits:
        _assert_rejected(call, culprits, _tensors(*args), raw=raw)
        return
    if kind == "all_meta":
        out = call()
        assert [tuple(t.shape) for t in out] == [(num_layers, k, *s.shape[2:]) for s in a["slots"]]
        return
    logical = [logical_view(s, a["order"]).clone() for s in slots]
    expected = mk.official_memory_update_(logical, a["victims"].long().sort(dim=1).values, fresh)
    before = [_storage(t) for t in slots]
    before_dropped = [_storage(t) for t in dropped] if a["dropped"] is not None else None
    out = call()
    out = a["dropped"] if raw else out
    _assert_bits(a["pos"].gather(1, a["order"].long()), torch.arange(n, dtype=torch.int32).expand(num_layers, n), "pos")
    for j, (s, got, want, exp_drop) in enumerate(zip(slots, out, logical, expected)):
        _assert_bits(logical_view(s, a["order"]), want, f"logical slots[{j}]")
        _assert_bits(got, exp_drop, f"dropped[{j}]")
        _assert_storage(s, before[j], None, f"slots[{j}]")
        if before_dropped is not None:
            _assert_storage(got, before_dropped[j], exp_drop, f"dropped[{j}]")


@FUZZ_VALID
@given(st.data())
def test_fuzz_memory_update_valid(data):
    _fuzz_memory_update(data, raw=False, kind="none")


@FUZZ_VALID
@given(st.data())
def test_fuzz_memory_update_raw_op_valid(data):
    _fuzz_memory_update(data, raw=True, kind="none")


@pytest.mark.parametrize("kind", _kinds("memory_update_", raw=False))
@FUZZ_KIND
@given(data=st.data())
def test_fuzz_memory_update(kind, data):
    _fuzz_memory_update(data, raw=False, kind=kind)


@pytest.mark.parametrize("kind", _kinds("memory_update_", raw=True))
@FUZZ_KIND
@given(data=st.data())
def test_fuzz_memory_update_raw_op(kind, data):
    _fuzz_memory_update(data, raw=True, kind=kind)


# --------------------------------------------------------------------------------------------------- retrieve_topk
SCORE_ATOL = 2e-5  # as tests/test_retrieval.py: fp32 scores, only the summation order and exp differ


def _check_topk(indices: Tensor, scores: Tensor, q: Tensor, keys: Tensor, keys2: Tensor | None, k: int) -> None:
    """Valid ascending indices, scores within SCORE_ATOL of the fp32 reference, and the reference's selection
    wherever its boundary is not a near-tie (then any key inside the band is right)."""
    ref = retrieval_scores_reference(q, keys, keys2=keys2)
    total = ref.numel()
    k0 = min(k, total)
    assert indices.dtype == torch.int64 and scores.dtype == torch.float32
    assert indices.shape == (k0,) and scores.shape == (k0,), f"got {indices.shape}, expected ({k0},)"
    if k0 == 0:
        return
    assert bool((indices[1:] > indices[:-1]).all()) and int(indices[0]) >= 0 and int(indices[-1]) < total
    assert_close(scores, ref[indices], atol=SCORE_ATOL, rtol=0, name="scores of the selected keys")
    ordered = ref.sort(descending=True).values
    tau = float(ordered[k0 - 1])
    chosen = torch.zeros(total, dtype=torch.bool)
    chosen[indices] = True
    assert bool((ref[chosen] >= tau - 2 * SCORE_ATOL).all()), "a selected key scores clearly below the k-th"
    assert bool((ref[~chosen] <= tau + 2 * SCORE_ATOL).all()), "a dropped key scores clearly above the k-th"
    if k0 == total or float(ordered[k0 - 1] - ordered[k0]) > 2 * SCORE_ATOL:
        assert_equal(indices, mk.retrieve_topk_reference(q, keys, k, keys2=keys2)[0], name="selected indices")


def _fuzz_retrieval(data, raw: bool, kind: str) -> None:
    draw, gen = data.draw, _gen(data)
    t, ds, s1 = draw(st.integers(1, 4)), draw(st.integers(0, 5)), draw(st.integers(0, 6))
    s2 = draw(st.none() | st.integers(0, 6))
    dtype, k = draw(st.sampled_from(FLOATS)), draw(st.integers(0, 14))
    layouts = st.sampled_from(["contiguous", "sliced0", "swap01", "expanded0"])
    a = {
        "queries": _laid_out(_values((t, ds), dtype, gen), draw(layouts), gen),
        "keys": _laid_out(_values((s1, ds), dtype, gen), draw(layouts), gen),
        "keys2": None if s2 is None else _laid_out(_values((s2, ds), dtype, gen), draw(layouts), gen),
        "k": k,
    }
    backend = None if raw else draw(st.sampled_from(["cpp", "reference"]))
    other = torch.float32 if dtype != torch.float32 else torch.bfloat16
    kind = _pick(kind, {
        "queries_empty": True, "keys_width": True, "keys2_width": s2 is not None, "keys_dtype": True,
        "keys2_dtype": s2 is not None, "queries_int": True, "queries_f64": True, "keys_3d": True, "keys_1d": True,
        "keys_meta": True, "keys2_meta": s2 is not None, "queries_meta": True, "k_negative": True,
        "k_float": not raw, "k_bool": not raw, "none_queries": True, "none_keys": True, "nan_queries": ds > 0,
        "bad_backend": not raw, "all_meta": not raw,
    })  # fmt: skip
    culprits: tuple[str, ...] = ()
    if kind == "queries_empty":
        a["queries"], culprits = a["queries"][:0], ("queries",)
    elif kind in ("keys_width", "keys2_width"):
        name = kind[: -len("_width")]
        a[name], culprits = _values((a[name].shape[0], ds + 1), dtype, gen), (name,)
    elif kind in ("keys_dtype", "keys2_dtype"):
        name = kind[: -len("_dtype")]
        a[name], culprits = a[name].to(other), (name,)
    elif kind in ("queries_int", "queries_f64"):
        a["queries"] = a["queries"].to(torch.int32 if kind == "queries_int" else torch.float64)
        culprits = ("queries",)
    elif kind == "keys_3d":
        a["keys"], culprits = a["keys"][None], ("keys",)
    elif kind == "keys_1d":
        a["keys"], culprits = a["keys"].flatten(), ("keys",)
    elif kind in ("keys_meta", "keys2_meta", "queries_meta"):
        name = kind[: -len("_meta")]
        a[name], culprits = a[name].to(META), (name, "queries") if name == "queries" else (name,)
    elif kind in ("k_negative", "k_float", "k_bool"):
        a["k"], culprits = {"k_negative": -1 - k, "k_float": float(k), "k_bool": True}[kind], ("k",)
    elif kind.startswith("none_"):
        a[kind[5:]], culprits = None, (kind[5:],)
    elif kind == "nan_queries":
        a["queries"] = a["queries"].clone()
        a["queries"][draw(st.integers(0, t - 1)), draw(st.integers(0, ds - 1))] = float("nan")
    elif kind == "bad_backend":
        backend, culprits = "gpu", ("backend",)
    elif kind == "all_meta":
        a = {name: x.to(META) if isinstance(x, Tensor) else x for name, x in a.items()}
        backend = None if backend == "cpp" else backend  # cpp has CPU kernels only; reference runs on meta

    def call():
        if raw:
            return torch.ops.mplus.retrieve_topk(*a.values())
        return mk.retrieve_topk(a["queries"], a["keys"], a["k"], keys2=a["keys2"], backend=backend)

    if culprits:
        _assert_rejected(call, culprits, _tensors(*a.values()), raw=raw)
        return
    indices, scores = call()
    if kind == "all_meta":
        assert indices.device == META and indices.shape == (min(k, s1 + (s2 or 0)),)
    elif kind == "nan_queries":  # the selection is unspecified, its form is not
        assert indices.shape == (min(k, s1 + (s2 or 0)),) and bool((indices[1:] > indices[:-1]).all())
        assert indices.numel() == 0 or (int(indices[0]) >= 0 and int(indices[-1]) < s1 + (s2 or 0))
    else:
        _check_topk(indices, scores, a["queries"], a["keys"], a["keys2"], k)


@FUZZ_VALID
@given(st.data())
def test_fuzz_retrieve_topk_valid(data):
    _fuzz_retrieval(data, raw=False, kind="none")


@pytest.mark.usefixtures("cpu_isa")  # the C++ kernels of every ISA level this CPU runs
@FUZZ_VALID
@given(st.data())
def test_fuzz_retrieve_topk_raw_op_valid(data):
    _fuzz_retrieval(data, raw=True, kind="none")


@pytest.mark.parametrize("kind", _kinds("retrieve_topk", raw=False))
@FUZZ_KIND
@given(data=st.data())
def test_fuzz_retrieve_topk(kind, data):
    _fuzz_retrieval(data, raw=False, kind=kind)


@pytest.mark.parametrize("kind", _kinds("retrieve_topk", raw=True))
@FUZZ_KIND
@given(data=st.data())
def test_fuzz_retrieve_topk_raw_op(kind, data):
    _fuzz_retrieval(data, raw=True, kind=kind)


# ------------------------------------------------------------------------------------------------- draw_victims
@FUZZ_VALID
@given(
    st.integers(-2, 3) | st.sampled_from([None, 1.0, True, "2"]),
    st.integers(-1, 7) | st.sampled_from([None, 4.0, False]),
    st.integers(-1, 8) | st.sampled_from([None, 2.0, True]),
    st.sampled_from(["none", "generator", "seed", "cuda"]),
)
def test_fuzz_draw_victims(num_layers, n, k, generator):
    gen = {"none": None, "generator": torch.Generator().manual_seed(5), "seed": 5, "cuda": "cuda"}[generator]
    is_int = {name: isinstance(x, int) and not isinstance(x, bool) for name, x in (("num_layers", num_layers),
              ("n", n), ("k", k))}  # fmt: skip
    ints = all(is_int.values())
    if not ints or num_layers < 0 or not 0 <= k <= n or generator in ("seed", "cuda"):
        culprits = [name for name, ok in is_int.items() if not ok]
        culprits += ["num_layers"] if is_int["num_layers"] and num_layers < 0 else []
        culprits += ["n"] if is_int["n"] and n < 0 else []
        culprits += ["n", "k"] if ints and not 0 <= k <= n else []
        culprits += ["generator"] if generator in ("seed", "cuda") else []
        _assert_rejected(lambda: mk.draw_victims(num_layers, n, k, gen), tuple(culprits), [])
        return
    state = torch.random.get_rng_state() if gen is None else gen.get_state()
    out = mk.draw_victims(num_layers, n, k, gen)
    replay = torch.Generator()
    replay.set_state(state)
    expected = [torch.randperm(n, generator=replay)[n - k :].sort().values for _ in range(num_layers)]
    _assert_bits(out, torch.stack(expected) if expected else torch.empty(0, k, dtype=torch.int64), "victims")


# ------------------------------------------------------------------------------- memory_attention, merge states
LSE_TOL = 1e-4  # as tests/test_attention_cpu.py


def _check_attention(out: Tensor, lse: Tensor, ref: Tensor, ref_lse: Tensor) -> None:
    assert out.dtype == ref.dtype and out.shape == ref.shape and lse.dtype == torch.float32
    assert_close(out, ref, name="out")  # TOLERANCES[out.dtype] against the fp32 reference
    assert_equal(torch.isneginf(lse), torch.isneginf(ref_lse), name="lse -inf pattern")
    finite = torch.isfinite(ref_lse)
    assert_close(lse[finite], ref_lse[finite], atol=LSE_TOL, rtol=LSE_TOL, name="lse")


def _fuzz_attention(data, raw: bool, kind: str) -> None:
    draw, gen = data.draw, _gen(data)
    b, tq, tk, hkv, group = (draw(st.integers(lo, hi)) for lo, hi in ((0, 2), (0, 3), (0, 4), (1, 2), (1, 2)))
    hq, d = hkv * group, draw(st.sampled_from([2, 4, 8] + ([3, 5] if raw else [])))  # odd D: raw op, no RoPE
    dtype, other = draw(st.sampled_from(FLOATS)), torch.float64
    lay = st.sampled_from(["contiguous", "swap12", "last_strided", "sliced1", "expanded0", "expanded2"])
    a = {name: _laid_out(_values((b, t, h, d), dtype, gen), draw(lay), gen)
         for name, t, h in (("q", tq, hq), ("k", tk, hkv), ("v", tk, hkv))}  # fmt: skip
    use_mem, m, p_rows = draw(st.booleans()), draw(st.integers(0, 3)), draw(st.integers(1, 6))
    mem_lay = st.sampled_from(["contiguous", "expanded0", "swap12", "last_strided"])
    for name in ("mem_k", "mem_v"):
        a[name] = _laid_out(_values((b, m, hkv, d), dtype, gen), draw(mem_lay), gen) if use_mem else None
    use_pos = use_mem and d % 2 == 0 and draw(st.booleans())
    pos_dtype = torch.int32 if raw else draw(st.sampled_from([torch.int32, torch.int64]))
    a["mem_pos"] = torch.randint(0, p_rows, (m,), generator=gen).to(pos_dtype) if use_pos else None
    rope_lay = st.sampled_from(["contiguous", "swap01", "sliced0"])
    for name in ("rope_cos", "rope_sin"):
        a[name] = _laid_out(_values((p_rows, d // 2), torch.float32, gen), draw(rope_lay), gen) if use_pos else None
    kv = draw(st.sampled_from(["none", "len", "start", "both"]))
    kv_len = torch.randint(0, tk + 1, (b,), generator=gen).int()
    kv_start = (torch.rand(b, generator=gen) * (kv_len + 1)).int().clamp(max=kv_len)
    if kv == "start":
        kv_start = (torch.rand(b, generator=gen) * (tk + 1)).int().clamp(max=tk)
    a["kv_len"] = kv_len if kv in ("len", "both") else None
    a["kv_start"] = kv_start if kv in ("start", "both") else None
    causal, scale = draw(st.booleans()), draw(st.none() | st.floats(0.1, 2.0))
    backend = None if raw else draw(st.sampled_from(["cpp", "reference"]))
    rope_checked = use_pos and (m > 0 or not raw)  # the raw op ignores mem_pos and the tables when M = 0
    kind = _pick(kind, {
        "mem_pos_high": use_pos and m > 0, "mem_pos_negative": use_pos and m > 0,
        "kv_len_high": a["kv_len"] is not None and b > 0, "kv_len_negative": a["kv_len"] is not None and b > 0,
        "kv_start_after_len": a["kv_start"] is not None and b > 0, "kv_len_int64": a["kv_len"] is not None,
        "kv_len_shape": a["kv_len"] is not None, "kv_len_meta": a["kv_len"] is not None, "mem_v_missing": use_mem,
        "mem_k_3d": use_mem, "mem_k_1d": use_mem, "mem_v_shape": use_mem, "rope_missing": rope_checked,
        "rope_width": rope_checked, "rope_f64": rope_checked, "mem_pos_shape": rope_checked,
        "mem_pos_float": rope_checked, "mem_pos_int64": raw and rope_checked, "mem_pos_meta": rope_checked,
        "k_dtype": True, "v_shape": True, "hkv_mismatch": True, "q_3d": True, "q_int": True, "q_f64": True,
        "k_meta": True, "q_meta": True, "mem_k_meta": use_mem, "none_q": True, "none_k": True, "none_v": True,
        "scale_nan": not raw, "causal_int": not raw, "d_odd": not raw, "mem_pos_without_mem": not use_mem,
        "rope_without_pos": not use_pos, "bad_backend": not raw, "all_meta": not raw,
    })  # fmt: skip
    culprits: tuple[str, ...] = ()
    kv_names = ("kv_len", "kv_start")
    if kind in ("mem_pos_high", "mem_pos_negative"):
        big = 2**32 if a["mem_pos"].dtype == torch.int64 else 0  # int64 values that wrap to valid int32 rows
        high = p_rows + draw(st.integers(0, 3)) + draw(st.sampled_from([0, big]))
        a["mem_pos"][draw(st.integers(0, m - 1))] = high if kind.endswith("high") else -1 - big
        culprits = ("mem_pos",)
    elif kind in ("kv_len_high", "kv_len_negative", "kv_start_after_len"):
        row, name = draw(st.integers(0, b - 1)), "kv_start" if kind == "kv_start_after_len" else "kv_len"
        if kind == "kv_len_high":
            a[name][row] = tk + 1 + draw(st.sampled_from([0, 1000, 2**31 - tk - 2]))
        elif kind == "kv_len_negative":
            a[name][row] = -1 - draw(st.sampled_from([0, 2**31 - 1]))
        else:
            a[name][row] = (tk if a["kv_len"] is None else int(a["kv_len"][row])) + 1
        culprits = kv_names
    elif kind in ("kv_len_int64", "kv_len_shape", "kv_len_meta"):
        a["kv_len"] = {"kv_len_int64": lambda x: x.long(), "kv_len_shape": lambda x: torch.zeros(b + 1).int()}.get(
            kind, lambda x: x.to(META)
        )(a["kv_len"])
        culprits = ("kv_len",)
    elif kind == "mem_v_missing":
        a["mem_v"], culprits = None, ("mem_k", "mem_v")
    elif kind in ("mem_k_3d", "mem_k_1d"):
        a["mem_k"], culprits = a["mem_k"][:, :, 0] if kind == "mem_k_3d" else a["mem_k"].flatten(), ("mem_k",)
    elif kind == "mem_v_shape":
        a["mem_v"], culprits = _values((b, m + 1, hkv, d), dtype, gen), ("mem_v", "mem_k")
    elif kind == "rope_missing":
        a["rope_sin"], culprits = None, ("rope_cos", "rope_sin", "mem_pos")
    elif kind in ("rope_width", "rope_f64"):
        t = a["rope_cos"]
        a["rope_cos"] = _values((p_rows, d // 2 + 1), torch.float32, gen) if kind == "rope_width" else t.double()
        culprits = ("rope_cos", "rope_sin")
    elif kind in ("mem_pos_shape", "mem_pos_float", "mem_pos_int64", "mem_pos_meta"):
        t = a["mem_pos"]
        a["mem_pos"] = {"mem_pos_shape": lambda: torch.zeros(m + 1, dtype=torch.int32), "mem_pos_float": t.float,
                        "mem_pos_int64": t.long, "mem_pos_meta": lambda: t.to(META)}[kind]()  # fmt: skip
        culprits = ("mem_pos",)
    elif kind == "k_dtype":
        a["k"], culprits = a["k"].to(other), ("k",)
    elif kind == "v_shape":
        a["v"], culprits = _values((b, tk + 1, hkv, d), dtype, gen), ("v", "k")
    elif kind == "hkv_mismatch":
        a["k"], a["v"] = _values((b, tk, hq + 1, d), dtype, gen), _values((b, tk, hq + 1, d), dtype, gen)
        culprits = ("k", "q", "Hkv", "Hq")
    elif kind in ("q_3d", "q_int", "q_f64"):
        q = a["q"]
        a["q"] = {"q_3d": lambda: q[..., 0], "q_int": lambda: q.to(torch.int32), "q_f64": q.double}[kind]()
        culprits = ("q",)
    elif kind in ("k_meta", "q_meta", "mem_k_meta"):
        name = kind[: -len("_meta")]
        a[name], culprits = a[name].to(META), (name, "k") if name == "q" else (name,)
    elif kind.startswith("none_"):
        a[kind[5:]], culprits = None, (kind[5:],)
    elif kind == "scale_nan":
        scale, culprits = float("nan"), ("softmax_scale",)
    elif kind == "causal_int":
        causal, culprits = 1, ("causal",)
    elif kind == "d_odd":
        a.update({n: a[n][..., 1:] for n in ("q", "k", "v")})
        culprits = ("q", "D")
    elif kind == "mem_pos_without_mem":
        a["mem_pos"] = torch.zeros(m, dtype=torch.int32)
        culprits = () if raw else ("mem_pos",)
    elif kind == "rope_without_pos":
        a["rope_cos"] = a["rope_sin"] = _values((p_rows, d // 2), torch.float32, gen)
        culprits = () if raw else ("rope_cos", "rope_sin")
    elif kind == "bad_backend":
        backend, culprits = "gpu", ("backend",)
    elif kind == "all_meta":
        a = {name: None if x is None else x.to(META) for name, x in a.items()}
        backend = None if backend == "cpp" else backend  # cpp has CPU kernels only; reference runs on meta
    names = ("q", "k", "v", "mem_k", "mem_v", "mem_pos", "rope_cos", "rope_sin")
    kw = {"softmax_scale": scale, "causal": causal, "kv_len": a["kv_len"], "kv_start": a["kv_start"]}

    def call():
        if raw:
            s = 1 / math.sqrt(d) if scale is None else scale
            return torch.ops.mplus.memory_attention(*(a[n] for n in names), s, causal, a["kv_len"], a["kv_start"])
        return mk.memory_attention(*(a[n] for n in names), **kw, backend=backend)

    if culprits:
        _assert_rejected(call, culprits, _tensors(*a.values()), raw=raw)
        return
    out, lse = call()
    if kind == "all_meta":
        assert out.device == META and out.shape == (b, tq, hq, d) and lse.shape == (b, hq, tq)
        return
    with torch.no_grad():
        ref, ref_lse = memory_attention_reference(*(a[n] for n in names), **kw)
    _check_attention(out, lse, ref, ref_lse)


@FUZZ_VALID
@given(st.data())
def test_fuzz_memory_attention_valid(data):
    _fuzz_attention(data, raw=False, kind="none")


@pytest.mark.usefixtures("cpu_isa")  # the C++ kernels of every ISA level this CPU runs
@FUZZ_VALID
@given(st.data())
def test_fuzz_memory_attention_raw_op_valid(data):
    _fuzz_attention(data, raw=True, kind="none")


@pytest.mark.parametrize("kind", _kinds("memory_attention", raw=False))
@FUZZ_KIND
@given(data=st.data())
def test_fuzz_memory_attention(kind, data):
    _fuzz_attention(data, raw=False, kind=kind)


@pytest.mark.parametrize("kind", _kinds("memory_attention", raw=True))
@FUZZ_KIND
@given(data=st.data())
def test_fuzz_memory_attention_raw_op(kind, data):
    _fuzz_attention(data, raw=True, kind=kind)


def _fuzz_merge(data, raw: bool, kind: str) -> None:
    draw, gen = data.draw, _gen(data)
    b, t, h, d = draw(st.integers(0, 2)), draw(st.integers(0, 3)), draw(st.integers(0, 2)), draw(st.integers(0, 5))
    dtype = draw(st.sampled_from(FLOATS))
    lay = st.sampled_from(["contiguous", "swap12", "last_strided", "expanded0"])
    a = {}
    for side in ("a", "b"):
        a[f"out_{side}"] = _laid_out(_values((b, t, h, d), dtype, gen), draw(lay), gen)
        lse = _values((b, h, t), torch.float32, gen) * 8
        lse[torch.rand(b, h, t, generator=gen) < 0.3] = float("-inf")  # parts where a query saw no key
        a[f"lse_{side}"] = _laid_out(lse, draw(st.sampled_from(["contiguous", "swap12", "expanded0"])), gen)
    backend = None if raw else draw(st.sampled_from(["cpp", "reference"]))
    kind = _pick(kind, {
        "out_b_shape": True, "out_b_dtype": True, "lse_a_shape": True, "lse_b_dtype": True, "out_a_3d": True,
        "out_a_int": True, "lse_a_meta": True, "out_b_meta": True, "out_a_meta": True, "none_out_a": True,
        "none_lse_a": True, "none_out_b": True, "none_lse_b": True, "bad_backend": not raw, "all_meta": not raw,
    })  # fmt: skip
    culprits: tuple[str, ...] = ()
    if kind == "out_b_shape":
        a["out_b"], culprits = _values((b, t + 1, h, d), dtype, gen), ("out_b", "out_a")
    elif kind == "out_b_dtype":  # the raw op merges mixed dtypes (the result has out_a's)
        a["out_b"] = a["out_b"].to(torch.float32 if dtype != torch.float32 else torch.float16)
        culprits = () if raw else ("out_b",)
    elif kind == "lse_a_shape":
        a["lse_a"], culprits = _values((b, h, t + 1), torch.float32, gen), ("lse_a",)
    elif kind == "lse_b_dtype":
        a["lse_b"], culprits = a["lse_b"].half(), ("lse_b",)
    elif kind in ("out_a_3d", "out_a_int"):
        a["out_a"] = a["out_a"].flatten(-2) if kind == "out_a_3d" else a["out_a"].to(torch.int32)
        culprits = ("out_a",)
    elif kind.endswith("_meta") and kind != "all_meta":
        name = kind[: -len("_meta")]
        a[name], culprits = a[name].to(META), (name, "out_a")
    elif kind.startswith("none_"):
        a[kind[5:]], culprits = None, (kind[5:],)
    elif kind == "bad_backend":
        backend, culprits = "gpu", ("backend",)
    elif kind == "all_meta":
        a = {name: x.to(META) for name, x in a.items()}
        backend = None if backend == "cpp" else backend  # cpp has CPU kernels only; reference runs on meta

    def call():
        if raw:
            return torch.ops.mplus.merge_attention_states(*a.values())
        return mk.merge_attention_states(*a.values(), backend=backend)

    if culprits:
        _assert_rejected(call, culprits, _tensors(*a.values()), raw=raw)
        return
    out, lse = call()
    if kind == "all_meta":
        assert out.device == META and out.shape == (b, t, h, d) and lse.shape == (b, h, t)
        return
    ref, ref_lse = merge_attention_states_reference(*a.values())
    assert out.dtype == ref.dtype and out.shape == ref.shape
    assert_close(out, ref, name="merged out")
    assert_equal(torch.isneginf(lse), torch.isneginf(ref_lse), name="lse -inf pattern")
    finite = torch.isfinite(ref_lse)
    assert_close(lse[finite], ref_lse[finite], name="merged lse")


@FUZZ_VALID
@given(st.data())
def test_fuzz_merge_attention_states_valid(data):
    _fuzz_merge(data, raw=False, kind="none")


@pytest.mark.usefixtures("cpu_isa")  # the C++ kernels of every ISA level this CPU runs
@FUZZ_VALID
@given(st.data())
def test_fuzz_merge_attention_states_raw_op_valid(data):
    _fuzz_merge(data, raw=True, kind="none")


@pytest.mark.parametrize("kind", _kinds("merge_attention_states", raw=False))
@FUZZ_KIND
@given(data=st.data())
def test_fuzz_merge_attention_states(kind, data):
    _fuzz_merge(data, raw=False, kind=kind)


@pytest.mark.parametrize("kind", _kinds("merge_attention_states", raw=True))
@FUZZ_KIND
@given(data=st.data())
def test_fuzz_merge_attention_states_raw_op(kind, data):
    _fuzz_merge(data, raw=True, kind=kind)


# ------------------------------------------------------------------------------------------------------------------
# What the fuzzing found, one minimal case each (every case failed before its fix: see the comment on each)
# ------------------------------------------------------------------------------------------------------------------
I32, I64 = torch.int32, torch.int64


def _z(*shape, **kw) -> Tensor:
    return torch.zeros(*shape, **kw)


def _pos(num_layers: int, n: int) -> Tensor:
    return torch.arange(n, dtype=I32).repeat(num_layers, 1)


REJECTED = [
    # None for a Tensor argument of a raw op reached the kernel as an undefined tensor: RuntimeError "tensor does not
    # have a device" (or "Hq=1 must be a multiple of Hkv=0" for k).
    ("gather_none_out", lambda: torch.ops.mplus.gather_rows_(None, _z(1, 2), _z(1, 2), _z(1, dtype=I64)),
     TypeError, r"gather_rows_: out must be a tensor, got None"),
    ("gather_none_index", lambda: torch.ops.mplus.gather_rows_(_z(1, 2), _z(1, 2), _z(1, 2), None),
     TypeError, r"gather_rows_: index must be a tensor, got None"),
    ("retrieve_none_queries", lambda: torch.ops.mplus.retrieve_topk(None, _z(3, 2), None, 1),
     TypeError, r"retrieve_topk: queries must be a tensor, got None"),
    ("merge_none_lse_a", lambda: torch.ops.mplus.merge_attention_states(_z(1, 1, 1, 2), None, _z(1, 1, 1, 2),
                                                                        _z(1, 1, 1)),
     TypeError, r"merge_attention_states: lse_a must be a tensor, got None"),
    ("attention_none_k", lambda: torch.ops.mplus.memory_attention(_z(1, 1, 1, 2), None, _z(1, 1, 1, 2), None, None,
                                                                  None, None, None, 1.0, True),
     TypeError, r"memory_attention: k must be a tensor, got None"),
    ("update_none_order", lambda: torch.ops.mplus.memory_update_(_pos(1, 2), None, _z(1, 0, dtype=I64), [], [], []),
     TypeError, r"memory_update_: order must be a tensor, got None"),
    # mem_k's length was read before its shape was checked: IndexError "Dimension out of range".
    ("attention_mem_k_1d", lambda: torch.ops.mplus.memory_attention(_z(1, 1, 1, 2), _z(1, 1, 1, 2), _z(1, 1, 1, 2),
                                                                    _z(2), _z(1, 1, 1, 2), None, None, None, 1.0,
                                                                    True),
     ValueError, r"memory_attention: mem_k must be a 4-D CPU tensor, got \[2\]"),
    # A meta tensor among CPU ones sent a raw op to its fake kernel, which returned uninitialised *CPU* outputs
    # (garbage indices from retrieve_topk) or did nothing (an out-of-range index or victim went unnoticed).
    ("retrieve_meta_keys2", lambda: torch.ops.mplus.retrieve_topk(_z(1, 2), _z(3, 2), _z(3, 2, device=META), 2),
     ValueError, r"retrieve_topk: keys2 is on meta, expected cpu \(where queries is\)"),
    ("attention_meta_k", lambda: torch.ops.mplus.memory_attention(_z(1, 1, 1, 2), _z(1, 1, 1, 2, device=META),
                                                                  _z(1, 1, 1, 2), None, None, None, None, None, 1.0,
                                                                  True),
     ValueError, r"memory_attention: k is on meta, expected cpu \(where q is\)"),
    ("merge_meta_lse_b", lambda: torch.ops.mplus.merge_attention_states(_z(1, 1, 1, 2), _z(1, 1, 1), _z(1, 1, 1, 2),
                                                                        _z(1, 1, 1, device=META)),
     ValueError, r"merge_attention_states: lse_b is on meta, expected cpu"),
    ("gather_meta_index", lambda: torch.ops.mplus.gather_rows_(_z(1, 2), _z(1, 2), _z(1, 2),
                                                               torch.tensor([5], device=META)),
     ValueError, r"gather_rows_: index is on meta, expected cpu \(where out is\)"),
    ("update_meta_victims", lambda: torch.ops.mplus.memory_update_(_pos(1, 4), _pos(1, 4),
                                                                   torch.tensor([[9]], device=META), [_z(1, 4)],
                                                                   [_z(1, 1)], [_z(1, 1)]),
     ValueError, r"memory_update_: victims is on meta, expected cpu \(where pos is\)"),
    # Messages that did not say which argument was wrong ("lse must be", "dtype must be").
    ("merge_lse_a_dtype", lambda: torch.ops.mplus.merge_attention_states(_z(1, 1, 1, 2), _z(1, 1, 1).half(),
                                                                         _z(1, 1, 1, 2), _z(1, 1, 1)),
     ValueError, r"merge_attention_states: lse_a must be float32 \[B=1, H=1, T=1\], got Half"),
    ("attention_q_dtype", lambda: torch.ops.mplus.memory_attention(_z(1, 1, 1, 2).double(), _z(1, 1, 1, 2),
                                                                   _z(1, 1, 1, 2), None, None, None, None, None, 1.0,
                                                                   True),
     TypeError, r"memory_attention: q must be float32, bfloat16 or float16, got Double"),
    # The reference backend indexed with an order outside [0, N) (IndexError) and accepted a pos that is not its
    # inverse (the cpp backend refuses both).
    ("reference_order_out_of_range", lambda: mk.memory_update_(_pos(2, 4), torch.tensor([[0, 7, 2, 3], [0, 1, 2, 3]],
                                                                                         dtype=I32),
                                                               torch.tensor([[0], [1]]), [_z(2, 4, 3)],
                                                               [_z(2, 1, 3)], backend="reference"),
     ValueError, r"order \[2, 4\] has order\[0, 1\]=7, expected slot ids in \[0, N=4\)"),
    ("reference_pos_not_inverse", lambda: mk.memory_update_(torch.tensor([[1, 0, 2, 3]], dtype=I32), _pos(1, 4),
                                                            torch.tensor([[0]]), [_z(1, 4, 3)], [_z(1, 1, 3)],
                                                            backend="reference"),
     ValueError, r"pos and order \[1, 4\] must be inverse permutations per layer, but order\[0, 0\]=0"),
    # A stride-0 output reached torch's copy_ in the reference backend: RuntimeError "more than one element of the
    # written-to tensor refers to a single memory location".
    ("reference_gather_stride0_out", lambda: mk.gather_rows_(_z(1, 2).expand(3, 2), torch.randn(4, 2),
                                                             torch.randn(1, 2), torch.tensor([0, 1, 2]),
                                                             backend="reference"),
     ValueError, r"gather_rows_: out \[3, 2\] with strides \[0, 1\] has overlapping rows"),
    # memory_update_ took a tensor for the dropped list (iterating over its first dim).
    # backend="reference" on meta tensors (the backend table allows it) copied them to the host: NotImplementedError
    # "Cannot copy out of meta tensor; no data!". Meta calls reach the fake kernel whatever the backend now.
    ("reference_gather_meta", lambda: mk.gather_rows_(_z(2, 3, device=META), _z(4, 3), _z(1, 3),
                                                      _z(2, dtype=I64, device=META), backend="reference").shape,
     None, (2, 3)),
    ("reference_update_meta", lambda: mk.memory_update_(_pos(1, 4).to(META), _pos(1, 4).to(META), torch.tensor([[1]]),
                                                        [_z(1, 4, 3, device=META)], [_z(1, 1, 3, device=META)],
                                                        backend="reference")[0].shape,
     None, (1, 1, 3)),
    ("update_dropped_tensor", lambda: mk.memory_update_(_pos(2, 4), _pos(2, 4), torch.tensor([[0], [1]]),
                                                        [_z(2, 4, 3)], [_z(2, 1, 3)], dropped=_z(1, 2, 1, 3)),
     TypeError, r"memory_update_: dropped must be a list of tensors, got Tensor"),
    # draw_victims: internal errors not naming the argument, or no error at all.
    ("draw_victims_k_none", lambda: mk.draw_victims(2, 4, None),
     TypeError, r"draw_victims: k must be an int, got NoneType"),  # was "'<=' not supported between ..."
    ("draw_victims_layers_bool", lambda: mk.draw_victims(True, 4, 1),
     TypeError, r"draw_victims: num_layers must be an int, got bool"),  # was "empty() takes 1 positional argument"
    ("draw_victims_n_float", lambda: mk.draw_victims(1, 4.0, 1),
     TypeError, r"draw_victims: n must be an int, got float"),  # was randperm's "invalid combination of arguments"
    ("draw_victims_generator_str", lambda: mk.draw_victims(0, 4, 1, "seed"),
     TypeError, r"draw_victims: generator must be a torch.Generator or None, got str"),  # was accepted
]  # fmt: skip


@pytest.mark.parametrize(("call", "error", "match"), [c[1:] for c in REJECTED], ids=[c[0] for c in REJECTED])
def test_found_by_fuzzing_rejected(call, error, match):
    if error is None:  # a call that must now run: ``match`` is its result
        assert tuple(call()) == match
        return
    with pytest.raises(error, match=match):
        call()


def test_found_by_fuzzing_reference_stride0_slot_writes_nothing():
    """The reference backend wrote hidden rows, then failed on the stride-0 ages (RuntimeError from copy_): a
    half-applied update. The wrapper now refuses the stride-0 slot tensor before anything is written."""
    pos, hidden, ages = _pos(2, 4), torch.randn(2, 4, 3), _z(1, 4).expand(2, 4)
    before = [t.clone() for t in (pos, hidden)]
    with pytest.raises(ValueError, match=r"slots\[1\] \[2, 4\] with strides \[0, 1\] has overlapping rows"):
        mk.memory_update_(pos, pos.clone(), torch.tensor([[0], [1]]), [hidden, ages], [_z(2, 1, 3), _z(2, 1)],
                          backend="reference")  # fmt: skip
    assert_equal(pos, before[0], name="pos")
    assert_equal(hidden, before[1], name="hidden")


def _empty_update(case: str) -> tuple[list, list]:
    if case == "no_layers":  # reference: RuntimeError "stack expects a non-empty TensorList"
        return [_z(0, 3, dtype=I32), _z(0, 3, dtype=I32), _z(0, 1, dtype=I64), [_z(0, 3, 2)], [_z(0, 1, 2)]], [
            (0, 1, 2)
        ]
    if case == "no_slot_tensors":  # reference: IndexError in official_memory_update_
        order = torch.tensor([[2, 0, 3, 1]], dtype=I32)
        return [torch.empty_like(order).scatter_(1, order.long(), _pos(1, 4)), order, torch.tensor([[1]]), [], []], []
    if case == "empty_strided_new_rows":  # cpp: "new_rows[0] [1, 0, 3] with strides [6, 6, 2] must have dense rows"
        return [
            _pos(1, 2),
            _pos(1, 2),
            _z(1, 0, dtype=I64),
            [torch.randn(1, 2, 3)],
            [torch.empty(1, 0, 6)[..., ::2]],
        ], [(1, 0, 3)]
    # cpp: "slots[0] [2, 0, 1] with strides [0, 1, 1] has overlapping rows" (no rows at all)
    stride0 = torch.empty(1, 0, 1).expand(2, 0, 1)
    return [_z(2, 0, dtype=I32), _z(2, 0, dtype=I32), _z(2, 0, dtype=I64), [stride0], [_z(2, 0, 1)]], [(2, 0, 1)]


@pytest.mark.parametrize("backend", ["cpp", "reference"])
@pytest.mark.parametrize("case", ["no_layers", "no_slot_tensors", "empty_strided_new_rows", "empty_stride0_slots"])
def test_found_by_fuzzing_empty_updates_run(case, backend):
    """Updates that move nothing used to fail (the comment in _empty_update says how, before the fix)."""
    args, shapes = _empty_update(case)
    out = mk.memory_update_(*args, backend=backend)
    assert [tuple(t.shape) for t in out] == shapes
    pos, order = args[0], args[1]
    assert_equal(pos.gather(1, order.long()), torch.arange(pos.shape[1], dtype=I32).expand_as(pos), name="pos[order]")


def test_found_by_fuzzing_empty_gather_source_with_odd_strides():
    """An empty source with non-unit strides (nothing to read) was refused: "must have contiguous rows"."""
    src_a, src_b, out = torch.empty(0, 6)[:, ::2], torch.randn(2, 3), torch.full((1, 3), float("nan"))
    torch.ops.mplus.gather_rows_(out, src_a, src_b, torch.tensor([1]))
    assert_equal(out, src_b[1:], name="gathered row")
