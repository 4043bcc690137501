"""``mplus.segments``: the memory-segment types ``FusedMemoryAttention`` takes and the builder inference and training
share. A pending segment is resolved once, after the segments before it, without changing what the caller passed;
anything that is not a segment is refused with a ``TypeError`` naming ``memory``."""

from __future__ import annotations

import pytest
import torch

from mplus.attention import FusedMemoryAttention, rope_tables
from mplus.segments import MemoryKV, MemorySegments, PendingSegment, layer_segments, prefix_segment, shared_segment
from mplus_kernels.testing import assert_close, assert_equal

D, HQ, HKV, P = 16, 4, 2, 64  # head dim, query / key-value heads, RoPE table rows


def _attention() -> FusedMemoryAttention:
    torch.manual_seed(0)
    return FusedMemoryAttention(HQ * D, HQ, HKV, D, backend="reference")


def _tables() -> tuple[torch.Tensor, torch.Tensor]:
    return rope_tables(1.0 / (10000 ** (torch.arange(0, D, 2).float() / D)), P)


def _chunk(b: int, t: int, seed: int) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
    gen = torch.Generator().manual_seed(seed)
    cos, sin = _tables()
    rows = slice(40, 40 + t)
    pe = torch.cat([cos[rows], cos[rows]], -1)[None], torch.cat([sin[rows], sin[rows]], -1)[None]
    return torch.randn(b, t, HQ * D, generator=gen), pe


def _rows(m: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(m, HKV, D, generator=gen), torch.randn(m, HKV, D, generator=gen)


class _Handle:
    """A transfer handle that counts its waits."""

    def __init__(self, result) -> None:
        self.result, self.waits = result, 0

    def wait(self):
        self.waits += 1
        return self.result


@pytest.mark.parametrize("b", [1, 3])
def test_a_pending_segment_is_resolved_once_and_the_memory_passed_is_not_changed(b):
    attn, (cos, sin) = _attention(), _tables()
    h, pe = _chunk(b, 5, seed=1)
    stm_k, stm_v = _rows(7, seed=2)
    pre_k, pre_v = _rows(3, seed=3)
    stm = (stm_k, stm_v, torch.arange(4, 11, dtype=torch.int32))
    ready = layer_segments(stm, (pre_k, pre_v), cos, sin, b)
    handle = _Handle("rows")
    pending = PendingSegment(handle, lambda got: shared_segment(pre_k, pre_v, ready[1].positions, cos, sin, b))
    segments = layer_segments(stm, pending, cos, sin, b)
    parts = segments.parts
    with torch.no_grad():
        expected = attn(h, pe, ready)
        got = attn(h, pe, segments)
        again = attn(h, pe, segments)
    assert_equal(got, expected, name="pending vs ready segments")
    assert_equal(again, expected, name="second call")
    assert handle.waits == 1 and pending.done and pending.result == "rows"
    assert segments.parts is parts and segments[1] is pending, "the caller's segments were rewritten"
    settled = segments.resolved()
    assert isinstance(settled[1], MemoryKV) and settled[1] is pending.resolve() and settled[0] is segments[0]


def test_plain_lists_and_one_memory_kv_are_still_taken():
    attn, (cos, sin) = _attention(), _tables()
    h, pe = _chunk(2, 4, seed=4)
    k, v = _rows(6, seed=5)
    one = shared_segment(k, v, torch.arange(6, dtype=torch.int32), cos, sin, 2)
    per_row = [shared_segment(k, v, torch.arange(6, dtype=torch.int32), cos, sin) for _ in range(2)]
    with torch.no_grad():
        base = attn(h, pe, one)
        assert_equal(attn(h, pe, [one]), base, name="a list of one MemoryKV")
        assert_equal(attn(h, pe, MemorySegments((one,))), base, name="MemorySegments of one")
        # one kernel call per row: the same sums, grouped per row (fp32 rounding, not a different result)
        assert_close(attn(h, pe, [per_row]), base, atol=1e-6, rtol=1e-6, name="a per-row segment")


@pytest.mark.parametrize(
    "memory",
    [
        pytest.param(lambda seg: [seg, lambda: seg], id="callable"),
        pytest.param(lambda seg: "memory", id="string"),
        pytest.param(lambda seg: {"k": seg.k}, id="dict"),
        pytest.param(lambda seg: [seg, [seg.k]], id="per-row-of-tensors"),
        pytest.param(lambda seg: [[]], id="empty-per-row"),
        pytest.param(lambda seg: seg.k, id="tensor"),
    ],
)
def test_anything_else_is_a_type_error_naming_memory(memory):
    attn, (cos, sin) = _attention(), _tables()
    h, pe = _chunk(1, 2, seed=6)
    k, v = _rows(3, seed=7)
    seg = shared_segment(k, v, torch.arange(3, dtype=torch.int32), cos, sin)
    with pytest.raises(TypeError, match="memory"):
        attn(h, pe, memory(seg))
    with pytest.raises(TypeError, match="MemorySegments: part 1"):
        MemorySegments((seg, "x"))


def test_layer_segments_share_the_short_term_rows_and_number_the_prefix():
    cos, sin = _tables()
    k, v = _rows(5, seed=8)
    pre_k, pre_v = _rows(2, seed=9)
    pos = torch.arange(3, 8, dtype=torch.int32)
    shared = layer_segments((k, v, pos), (pre_k, pre_v), cos, sin, batch=4)
    assert shared[0].k.shape == (4, 5, HKV, D) and shared[0].k.stride(0) == 0, "the short-term rows were copied"
    assert shared[0].k.data_ptr() == k.data_ptr() and shared[0].positions is pos
    assert_equal(shared[1].positions, torch.arange(2, dtype=torch.int32), name="prefix positions")
    per_row = layer_segments([(k, v, pos), (k, v, pos + 1)], (pre_k, pre_v), cos, sin, batch=2)
    assert isinstance(per_row[0], list) and len(per_row[0]) == 2 and per_row[0][1].k.shape == (1, 5, HKV, D)


def test_prefix_segment_rows_and_refusal():
    """[BOS ; each row's long-term rows] per row, at positions 0..R, in one buffer; rows of another size are refused
    by name (a copy would broadcast a single row silently)."""
    g = torch.Generator().manual_seed(3)
    bos_k, bos_v = torch.randn(1, 2, 8, generator=g), torch.randn(1, 2, 8, generator=g)
    rows = [(torch.randn(5, 2, 8, generator=g), torch.randn(5, 2, 8, generator=g)) for _ in range(3)]
    cos = sin = torch.zeros(10, 4)
    seg = prefix_segment(bos_k, bos_v, rows, cos, sin)
    assert torch.equal(seg.k, torch.stack([torch.cat([bos_k, k]) for k, _ in rows]))
    assert torch.equal(seg.v, torch.stack([torch.cat([bos_v, v]) for _, v in rows]))
    assert seg.positions.tolist() == list(range(6))
    with pytest.raises(ValueError, match=r"rows\[1\] has k \(1, 2, 8\)"):
        prefix_segment(bos_k, bos_v, [rows[0], (rows[1][0][:1], rows[1][1][:1])], cos, sin)
