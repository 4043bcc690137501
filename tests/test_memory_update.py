"""The random-drop memory update: parity of every backend with the official cat-based semantics, golden replay,
bad inputs, backend selection, opcheck."""

from __future__ import annotations

import pytest
import torch
from _golden import load_state

import mplus_kernels as mk
from mplus import ShortTermMemory
from mplus_kernels import BackendUnavailableError
from mplus_kernels.memory_update import logical_view
from mplus_kernels.testing import assert_equal, nan_like

BACKENDS = ["cpp", "triton", "reference"]


def _identity_state(num_layers: int, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    pos = torch.arange(n, dtype=torch.int32).repeat(num_layers, 1)
    return pos, pos.clone()


def _random(shape, dtype, gen):
    if dtype.is_floating_point:
        return torch.randn(shape, generator=gen).to(dtype)
    return torch.randint(-1000, 1000, shape, generator=gen, dtype=dtype)


def _check_inverse(pos: torch.Tensor, order: torch.Tensor) -> None:
    n = pos.shape[1]
    assert_equal(pos.gather(1, order.long()), torch.arange(n, dtype=torch.int32).expand_as(pos), name="pos[order]")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(
    ("num_layers", "n", "d", "k"),
    [(1, 1, 1, 1), (2, 7, 3, 1), (3, 37, 5, 6), (2, 33, 17, 33), (3, 129, 64, 8), (1, 10, 4, 0)],
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_matches_official_semantics(backend, num_layers, n, d, k, dtype):
    gen = torch.Generator().manual_seed(n * 100 + k)
    hidden = _random((num_layers, n, d), dtype, gen)
    kcache = _random((num_layers, n, 2, 3), dtype, gen)
    age = torch.arange(n, dtype=torch.float64).repeat(num_layers, 1)
    ref = [hidden.clone(), kcache.clone(), age.clone()]
    pos, order = _identity_state(num_layers, n)
    for step in range(4):  # several updates: later ones start from a scrambled slot layout
        victims = mk.draw_victims(num_layers, n, k, gen)
        if step % 2:  # any victim order is accepted
            victims = victims[:, torch.randperm(k, generator=gen)]
        fresh = [_random((num_layers, k, d), dtype, gen), _random((num_layers, k, 2, 3), dtype, gen)]
        fresh.append(torch.arange(k - 1, -1, -1, dtype=torch.float64).repeat(num_layers, 1))
        slots = [hidden, kcache, age]
        outs = [nan_like(torch.empty((num_layers, k, *s.shape[2:]), dtype=s.dtype)) for s in slots]
        got = mk.memory_update_(pos, order, victims, slots, fresh, dropped=outs, backend=backend)
        expected = mk.official_memory_update_(ref, victims.sort(dim=1).values, fresh)
        for name, slot, r, g, e in zip(("hidden", "k", "age"), slots, ref, got, expected):
            assert_equal(logical_view(slot, order), r, name=f"logical {name} after update {step}")
            assert_equal(g, e, name=f"dropped {name} after update {step}")
        _check_inverse(pos, order)


@pytest.mark.parametrize("backend", BACKENDS)
def test_integer_ages_and_strided_dropped_buffer(backend):
    """Dropped rows can land in a slice of a bigger (long-term cache) buffer; integer slot tensors work too."""
    num_layers, n, d, k = 2, 20, 8, 5
    hidden = torch.randn(num_layers, n, d)
    age = torch.randint(0, 50, (num_layers, n), dtype=torch.int32)
    ref = [hidden.clone(), age.clone()]
    cache_h = torch.full((num_layers, 3 * k, d), float("nan"))
    cache_a = torch.full((num_layers, 3 * k), -1, dtype=torch.int32)
    pos, order = _identity_state(num_layers, n)
    for step in range(3):
        victims = mk.draw_victims(num_layers, n, k, torch.Generator().manual_seed(step))
        fresh = [torch.randn(num_layers, k, d), torch.randint(0, 50, (num_layers, k), dtype=torch.int32)]
        window = slice(step * k, (step + 1) * k)
        mk.memory_update_(
            pos, order, victims, [hidden, age], fresh, dropped=[cache_h[:, window], cache_a[:, window]], backend=backend
        )
        expected = mk.official_memory_update_(ref, victims, fresh)
        assert_equal(cache_h[:, window], expected[0], name="dropped hidden in the cache buffer")
        assert_equal(cache_a[:, window], expected[1], name="dropped ages in the cache buffer")
    assert_equal(logical_view(hidden, order), ref[0], name="hidden")


@pytest.mark.parametrize("backend", BACKENDS)
def test_golden_replay(backend):
    """Feeding the official run's recorded drop choices reproduces its STM and STM ages exactly (state 1..5)."""
    state = load_state(0)
    stm = ShortTermMemory(state["memory"].clone(), state["memory_ages"].clone())
    for step in range(1, 6):
        golden = load_state(step)
        dropped_before = stm.logical("hidden")[torch.arange(3)[:, None], golden["drop_dropped_indices"]]
        out = stm.update(golden["delta_memory"][0], victims=golden["drop_dropped_indices"], backend=backend)
        assert_equal(stm.logical("hidden"), golden["memory"], name=f"memory after injection {step}")
        assert_equal(stm.logical("age"), golden["memory_ages"], name=f"memory_ages after injection {step}")
        assert_equal(out.hidden, dropped_before, name=f"dropped rows of injection {step}")
        if "cached_dropped_memories" in golden and golden["cached_dropped_memories"].shape[1] == 8:
            # the cache holds exactly this injection's dropped rows when it was (re)started by it
            assert_equal(out.hidden, golden["cached_dropped_memories"], name=f"cached dropped rows {step}")
            assert_equal(out.age, golden["cached_dropped_memory_ages"], name=f"cached dropped ages {step}")


def test_official_rng_reproduces_recorded_choices():
    """Seeding torch's default CPU generator as the golden run did gives the same drop choices (no replay hooks)."""
    torch.manual_seed(777)
    for step in range(1, 6):
        golden = load_state(step)
        victims = mk.draw_victims(3, 32, 8)
        assert_equal(victims, golden["drop_dropped_indices"], name=f"victims of injection {step}")


def test_training_age_mode_matches_spec_example():
    """SPEC.md §6.2: N=6, K=2, ages [5 4 3 2 1 0], drop [1 3] → ages [7 5 3 2 1 0], dropped ages [6 4]."""
    for mode, ages, dropped_ages in [
        ("reference", [5, 3, 1, 0, 1, 0], [4, 2]),
        ("training", [7, 5, 3, 2, 1, 0], [6, 4]),
    ]:
        stm = ShortTermMemory(
            torch.randn(1, 6, 4), torch.tensor([[5.0, 4, 3, 2, 1, 0]], dtype=torch.float64), age_mode=mode
        )
        out = stm.update(torch.randn(1, 2, 4), victims=torch.tensor([[1, 3]]))
        assert stm.logical("age").tolist() == [ages], mode
        assert out.age.tolist() == [dropped_ages], mode


def _snapshot(*tensors):
    return [t.clone() for t in tensors]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(
    ("case", "error", "match"),
    [
        ("k_gt_n", ValueError, r"drop K=9 rows of only N=8"),
        ("duplicate", ValueError, r"layer 1 contain duplicates"),
        ("out_of_range", ValueError, r"logical positions in \[0, 8\)"),
        ("negative", ValueError, r"logical positions in \[0, 8\)"),
        ("float_victims", TypeError, r"victims must be an integer tensor"),
        ("victims_layers", ValueError, r"victims must be \[L=2, K\]"),
        ("new_shape", ValueError, r"new_rows\[0\] must be \[2, 3, 4\]"),
        ("new_dtype", TypeError, r"new_rows\[0\] has dtype torch.float64"),
        ("new_device", ValueError, r"new_rows\[0\] is on meta"),
        ("slot_shape", ValueError, r"slots\[1\] must be \[L=2, N=8"),
        ("pos_dtype", ValueError, r"pos must be an int32"),
        ("dropped_shape", ValueError, r"dropped\[0\] must be \[2, 3, 4\]"),
        ("list_len", ValueError, r"2 slot tensors but 1 new_rows"),
        ("not_tensor", TypeError, r"new_rows\[1\] must be a torch.Tensor"),
        ("noncontig_slot", ValueError, r"slots\[0\] .* must have contiguous rows"),
    ],
)
def test_bad_input_raises_and_leaves_state_untouched(backend, case, error, match):
    num_layers, n, d, k = 2, 8, 4, 3
    hidden, age = torch.randn(num_layers, n, d), torch.zeros(num_layers, n, dtype=torch.float64)
    pos, order = _identity_state(num_layers, n)
    victims = torch.tensor([[0, 2, 5], [1, 3, 7]])
    fresh = [torch.randn(num_layers, k, d), torch.zeros(num_layers, k, dtype=torch.float64)]
    slots = [hidden, age]
    kwargs = {}
    if case == "k_gt_n":
        victims = torch.arange(9).repeat(2, 1)
    elif case == "duplicate":
        victims = torch.tensor([[0, 2, 5], [1, 1, 7]])
    elif case == "out_of_range":
        victims = torch.tensor([[0, 2, 8], [1, 3, 7]])
    elif case == "negative":
        victims = torch.tensor([[0, 2, -1], [1, 3, 7]])
    elif case == "float_victims":
        victims = victims.float()
    elif case == "victims_layers":
        victims = victims[:1]
    elif case == "new_shape":
        fresh[0] = torch.randn(num_layers, k + 1, d)
    elif case == "new_dtype":
        fresh[0] = fresh[0].double()
    elif case == "new_device":
        fresh[0] = fresh[0].to("meta")
    elif case == "slot_shape":
        slots = [hidden, torch.zeros(num_layers, n + 1, dtype=torch.float64)]
    elif case == "pos_dtype":
        pos = pos.long()
    elif case == "dropped_shape":
        kwargs["dropped"] = [torch.empty(num_layers, k + 1, d), torch.empty(num_layers, k, dtype=torch.float64)]
    elif case == "list_len":
        fresh = fresh[:1]
    elif case == "not_tensor":
        fresh[1] = [0.0] * k
    elif case == "noncontig_slot":
        slots = [torch.randn(num_layers, n, 2 * d)[:, :, ::2], age]
    before = _snapshot(pos, order, *[s for s in slots if isinstance(s, torch.Tensor)])
    with pytest.raises(error, match=match):
        mk.memory_update_(pos, order, victims, slots, fresh, backend=backend, **kwargs)
    for b, a in zip(before, [pos, order, *slots]):
        assert_equal(a, b, name="state after a rejected update")


def test_stm_rejects_bad_update_and_keeps_state():
    stm = ShortTermMemory(torch.randn(2, 8, 4), age_mode="training")
    before = _snapshot(stm.hidden, stm.age, stm.pos, stm.order)
    with pytest.raises(ValueError, match="duplicates"):
        stm.update(torch.randn(2, 2, 4), victims=torch.tensor([[0, 0], [1, 2]]))
    with pytest.raises(ValueError, match=r"new_hidden must be \[L=2, K, d=4\]"):
        stm.update(torch.randn(2, 2, 5))
    with pytest.raises(ValueError, match="more than the N=8 slots"):
        stm.update(torch.randn(2, 9, 4))
    for b, a in zip(before, [stm.hidden, stm.age, stm.pos, stm.order]):
        assert_equal(a, b, name="STM after rejected updates")


def test_backend_selection(monkeypatch):
    from mplus_kernels import _backend

    cpu = torch.device("cpu")
    monkeypatch.setenv("MPLUS_BACKEND", "auto")
    assert _backend.resolve("op", cpu) == "cpp"
    monkeypatch.setenv("MPLUS_BACKEND", "reference")
    assert _backend.resolve("op", cpu) == "reference"
    assert _backend.resolve("op", cpu, "cpp") == "cpp"  # per-call argument wins over the environment
    monkeypatch.setenv("MPLUS_BACKEND", "bogus")
    with pytest.raises(ValueError, match="MPLUS_BACKEND='bogus'"):
        _backend.resolve("op", cpu)
    monkeypatch.delenv("MPLUS_BACKEND")
    with pytest.raises(BackendUnavailableError, match="cpp backend has CPU kernels only"):
        _backend.resolve("op", torch.device("cuda"), "cpp")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(BackendUnavailableError, match="only under the interpreter"):
        _backend.resolve("op", cpu, "triton")
    monkeypatch.setattr(_backend, "_C_IMPORT_ERROR", "ImportError: simulated broken build")
    with pytest.raises(BackendUnavailableError, match="simulated broken build"):
        _backend.resolve("op", cpu)


def test_cpp_extension_is_built():
    """The package under test must have its C++ kernels: a broken build is a failure, never a silent fallback."""
    from mplus_kernels import _backend

    assert _backend.cpp_available(), _backend.cpp_import_error()


def _opcheck_args():
    num_layers, n, d, k = 2, 9, 4, 3
    pos, order = _identity_state(num_layers, n)
    slots = [torch.randn(num_layers, n, d), torch.zeros(num_layers, n, dtype=torch.float64)]
    fresh = [torch.randn(num_layers, k, d), torch.ones(num_layers, k, dtype=torch.float64)]
    dropped = [torch.empty(num_layers, k, d), torch.empty(num_layers, k, dtype=torch.float64)]
    return (pos, order, torch.tensor([[0, 4, 8], [1, 2, 3]]), slots, fresh, dropped)


def test_opcheck():
    torch.library.opcheck(torch.ops.mplus.memory_update_.default, _opcheck_args())


def test_torch_compile_traces_the_op():
    args = _opcheck_args()
    expected = _snapshot(*args[:2], *args[3])
    eager_args = (expected[0], expected[1], args[2], expected[2:4], args[4], [torch.empty_like(t) for t in args[5]])
    torch.ops.mplus.memory_update_(*eager_args)

    @torch.compile(backend="aot_eager", fullgraph=True)
    def step(pos, order, victims, hidden, age, new_hidden, new_age, out_hidden, out_age):
        torch.ops.mplus.memory_update_(pos, order, victims, [hidden, age], [new_hidden, new_age], [out_hidden, out_age])
        return out_hidden.sum()

    pos, order, victims, (hidden, age), (nh, na), (oh, oa) = args
    step(pos, order, victims, hidden, age, nh, na, oh, oa)
    assert_equal(pos, eager_args[0], name="pos")
    assert_equal(hidden, eager_args[3][0], name="hidden")
    assert_equal(oh, eager_args[5][0], name="dropped hidden")


# ------------------------------------------------------------------------------------------------------------------
# The raw C++ op checks what it indexes with (DESIGN.md §2.5): direct calls, no Python validation in front
# ------------------------------------------------------------------------------------------------------------------
def _raw_args(num_layers=2, n=8, d=4, k=3):
    """A valid raw call on a scrambled slot layout: pos/order inverse permutations, sorted distinct victims."""
    gen = torch.Generator().manual_seed(1)
    order = torch.stack([torch.randperm(n, generator=gen) for _ in range(num_layers)]).int()
    pos = torch.empty_like(order).scatter_(1, order.long(), torch.arange(n, dtype=torch.int32).repeat(num_layers, 1))
    victims = torch.tensor([[0, 2, 5], [1, 3, 7]])[:num_layers, :k].contiguous()
    slots = [
        torch.randn(num_layers, n, d, generator=gen),
        torch.arange(num_layers * n, dtype=torch.float64).view(num_layers, n),
    ]
    fresh = [torch.randn(num_layers, k, d, generator=gen), torch.full((num_layers, k), -1.0, dtype=torch.float64)]
    dropped = [nan_like(torch.empty(num_layers, k, d)), nan_like(torch.empty(num_layers, k, dtype=torch.float64))]
    return {"pos": pos, "order": order, "victims": victims, "slots": slots, "new_rows": fresh, "dropped": dropped}


def _corrupt(case, a):
    n = a["pos"].shape[1]
    if case == "victim_out_of_range":
        a["victims"] = torch.tensor([[0, 2, n], [1, 3, 7]])
    elif case == "victim_negative":
        a["victims"] = torch.tensor([[-1, 2, 5], [1, 3, 7]])
    elif case == "victims_unsorted":
        a["victims"] = torch.tensor([[0, 2, 5], [3, 1, 7]])
    elif case == "victims_duplicate":
        a["victims"] = torch.tensor([[0, 2, 2], [1, 3, 7]])
    elif case == "order_out_of_range":
        a["order"][1, 4] = n
    elif case == "order_negative":
        a["order"][0, 0] = -5
    elif case == "order_not_permutation":  # a slot twice, another never: in range, but not a permutation
        a["order"][1, 6] = a["order"][1, 2]
    elif case == "pos_not_inverse":  # both permutations, but not inverse of each other
        a["pos"][0, [0, 1]] = a["pos"][0, [1, 0]]
    elif case == "pos_is_order":
        a["order"] = a["pos"]
    elif case == "slots_stride0":  # every slot row of a layer aliases one row
        a["slots"][0] = torch.randn(2, 1, 4).expand(2, 8, 4)
    elif case == "slots_overlapping_rows":  # row stride 2 < row size 4
        a["slots"][0] = torch.randn(2 * 8 * 4).as_strided((2, 8, 4), (32, 2, 1))
    elif case == "slots_layers_alias":  # two layers share one buffer
        a["slots"][1] = torch.zeros(8, dtype=torch.float64).expand(2, 8)
    elif case == "dropped_stride0":
        a["dropped"][0] = torch.zeros(2, 1, 4).expand(2, 3, 4)
    elif case == "dropped_aliases_slots":
        a["dropped"][1] = a["slots"][1][:, :3]
    elif case == "new_rows_alias_slots":
        a["new_rows"][0] = a["slots"][0][:, 4:7]
    elif case == "new_rows_dtype":
        a["new_rows"][1] = a["new_rows"][1].float()
    elif case == "new_rows_shape":
        a["new_rows"][0] = torch.randn(2, 3, 5)
    elif case == "dropped_rows":
        a["dropped"][0] = torch.zeros(2, 4, 4)
    elif case == "slots_not_dense":
        a["slots"][0] = torch.randn(2, 8, 8)[:, :, ::2]
    elif case == "slots_twice":
        a["slots"][1] = a["slots"][0][..., 0]
        a["new_rows"][1], a["dropped"][1] = a["new_rows"][0][..., 0], a["dropped"][0][..., 0].clone()
    elif case == "victims_int32":
        a["victims"] = a["victims"].int()
    return a


@pytest.mark.parametrize(
    ("case", "match"),
    [
        ("victim_out_of_range", r"victims \[2, 3\] has victims\[0, 2\]=8, expected logical positions in \[0, N=8\)"),
        ("victim_negative", r"victims\[0, 0\]=-1, expected logical positions in \[0, N=8\)"),
        ("victims_unsorted", r"of layer 1 must be strictly ascending .* victims\[1, 0\]=3 then victims\[1, 1\]=1"),
        ("victims_duplicate", r"of layer 0 must be strictly ascending .*victims\[0, 1\]=2 then victims\[0, 2\]=2"),
        ("order_out_of_range", r"order \[2, 8\] has order\[1, 4\]=8, expected slot ids in \[0, N=8\)"),
        ("order_negative", r"order\[0, 0\]=-5, expected slot ids in \[0, N=8\)"),
        ("order_not_permutation", r"pos and order \[2, 8\] must be inverse permutations per layer, but order\[1, 6\]"),
        ("pos_not_inverse", r"must be inverse permutations per layer, but order\[0, \d\]"),
        ("pos_is_order", r"pos \[2, 8\] \(strides \[8, 1\]\) and order \[2, 8\] \(strides \[8, 1\]\) share memory"),
        ("slots_stride0", r"slots\[0\] \[2, 8, 4\] with strides \[4, 0, 1\] has overlapping rows"),
        ("slots_overlapping_rows", r"slots\[0\] \[2, 8, 4\] with strides \[32, 2, 1\] has overlapping rows"),
        ("slots_layers_alias", r"slots\[1\] \[2, 8\] with strides \[0, 1\] has overlapping rows"),
        ("dropped_stride0", r"dropped\[0\] \[2, 3, 4\] with strides \[4, 0, 1\] has overlapping rows"),
        (
            "dropped_aliases_slots",
            r"slots\[1\] \[2, 8\] \(strides \[8, 1\]\) and dropped\[1\] \[2, 3\] .* share memory",
        ),
        (
            "new_rows_alias_slots",
            r"slots\[0\] \[2, 8, 4\] .* and new_rows\[0\] \[2, 3, 4\] \(strides \[32, 4, 1\]\) share",
        ),
        ("new_rows_dtype", r"new_rows\[1\] has dtype Float, expected Double"),
        ("new_rows_shape", r"new_rows\[0\] has shape \[2, 3, 5\], its trailing dims must equal those of slots\[0\]"),
        ("dropped_rows", r"dropped\[0\] has shape \[2, 4, 4\], expected \[2, 3, \.\.\.\]"),
        ("slots_not_dense", r"slots\[0\] \[2, 8, 4\] with strides \[64, 8, 2\] must have dense rows"),
        ("slots_twice", r"slots\[0\] .* and slots\[1\] .* share memory"),
        ("victims_int32", r"victims must be a contiguous CPU int64 \[L=2, K\] tensor, got Int"),
    ],
)
def test_raw_op_rejects_malformed_input_and_writes_nothing(case, match):
    args = _corrupt(case, _raw_args())
    flat = [args["pos"], args["order"], args["victims"], *args["slots"], *args["new_rows"], *args["dropped"]]
    before = _snapshot(*flat)
    error = TypeError if case.endswith("_dtype") else ValueError  # TORCH_CHECK_TYPE / TORCH_CHECK_VALUE
    with pytest.raises(error, match=match):
        torch.ops.mplus.memory_update_(*args.values())
    for i, (b, a) in enumerate(zip(before, flat)):
        assert_equal(a, b, name=f"input {i} after a rejected raw call ({case})")


def test_raw_op_checks_state_even_without_victims():
    """K = 0 moves nothing, but a corrupted pos/order is still reported rather than carried into the next update."""
    args = _raw_args(k=0)
    args["victims"] = torch.empty(2, 0, dtype=torch.int64)
    args["order"][0, 3] = 99
    with pytest.raises(ValueError, match=r"order\[0, 3\]=99"):
        torch.ops.mplus.memory_update_(*args.values())


def test_raw_op_accepts_disjoint_strided_layouts():
    """The overlap check is exact enough not to reject real layouts: layer/slot-interleaved slots ([N, L, d] storage
    seen as [L, N, d]), dropped rows in a slice of a bigger buffer, and read-only new rows that alias each other
    (the STM passes new ages as an expand() over the layers)."""
    num_layers, n, d, k = 3, 10, 4, 4
    gen = torch.Generator().manual_seed(2)
    hidden = torch.randn(n, num_layers, d, generator=gen).transpose(0, 1)  # strides (d, L·d, 1)
    ages = torch.randn(num_layers, n + k, generator=gen, dtype=torch.float64)  # one buffer: [slots | dropped] per layer
    age = ages[:, :n]
    ref = [hidden.clone(), age.clone()]
    pos, order = _identity_state(num_layers, n)
    victims = torch.tensor([[0, 3, 4, 9], [1, 2, 5, 8], [6, 7, 8, 9]])
    fresh = [
        torch.randn(1, 1, d, generator=gen).expand(num_layers, k, d),
        torch.arange(k, dtype=torch.float64).expand(num_layers, k),
    ]
    cache = torch.full((num_layers, 3 * k, d), float("nan"))
    dropped = [cache[:, k : 2 * k], ages[:, n:]]  # ages: byte spans interleave with the slots', rows do not
    torch.ops.mplus.memory_update_(pos, order, victims, [hidden, age], fresh, dropped)
    expected = mk.official_memory_update_(ref, victims, [f.contiguous() for f in fresh])
    assert_equal(logical_view(hidden, order), ref[0], name="hidden")
    assert_equal(logical_view(age, order), ref[1], name="age")
    assert_equal(dropped[0], expected[0], name="dropped hidden")
    assert_equal(dropped[1], expected[1], name="dropped age")
    assert bool(cache[:, :k].isnan().all() and cache[:, 2 * k :].isnan().all()), "nothing outside dropped is written"
    _check_inverse(pos, order)


def _row_elements(t: torch.Tensor) -> set[int]:
    """Storage offsets (elements) of every element of a [L, R, F] view: brute force, for small views."""
    base = t.storage_offset()
    return {
        base + a * t.stride(0) + b * t.stride(1) + c * t.stride(2)
        for a in range(t.shape[0])
        for b in range(t.shape[1])
        for c in range(t.shape[2])
    }


def test_raw_op_alias_check_is_exact_for_views_of_one_buffer():
    """Slots and dropped rows as views of one buffer with the same strides (layer-major or layer-interleaved) at
    random offsets: the op refuses exactly when some element is shared (brute force), and is right when it runs."""
    num_layers, n, k, f = 2, 4, 2, 2
    gen = torch.Generator().manual_seed(3)
    victims = torch.tensor([[0, 3], [1, 2]])
    refused = 0
    for trial in range(120):
        row_stride = int(torch.randint(f, f + 4, (), generator=gen))
        if trial % 2:  # layer-major: [L][N][F] with gaps
            strides = (row_stride * n + int(torch.randint(0, 4, (), generator=gen)), row_stride, 1)
        else:  # layer-interleaved: [N][L][F] with gaps
            strides = (row_stride, row_stride * num_layers + int(torch.randint(0, 4, (), generator=gen)), 1)
        buf = torch.randn(256, generator=gen)
        slot_off, drop_off = (int(x) for x in torch.randint(0, 60, (2,), generator=gen))
        slots = buf.as_strided((num_layers, n, f), strides, slot_off)
        out = buf.as_strided((num_layers, k, f), strides, drop_off)
        shared = bool(_row_elements(slots) & _row_elements(out))
        pos, order = _identity_state(num_layers, n)
        fresh = torch.randn(num_layers, k, f, generator=gen)
        before, ref = buf.clone(), slots.clone()
        if shared:
            refused += 1
            with pytest.raises(ValueError, match=r"slots\[0\] .* and dropped\[0\] .* share memory"):
                torch.ops.mplus.memory_update_(pos, order, victims, [slots], [fresh], [out])
            assert_equal(buf, before, name=f"buffer after a refused aliasing call (trial {trial})")
        else:
            torch.ops.mplus.memory_update_(pos, order, victims, [slots], [fresh], [out])
            expected = mk.official_memory_update_([ref], victims, [fresh])
            assert_equal(out, expected[0], name=f"dropped rows (trial {trial})")
            assert_equal(logical_view(slots, order), ref, name=f"slots (trial {trial})")
    assert 10 < refused < 110, f"set-up: {refused} of 120 trials alias; both outcomes must be exercised"
