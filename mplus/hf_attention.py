"""The transformers integration: ``attn_implementation="mplus"``, and the mask reading it shares with the drop-in
module :class:`~mplus.attention.FusedLlamaAttention`.

transformers calls an attention function as ``fn(module, query, key, value, attention_mask, scaling=, dropout=,
**kwargs)``, where ``attention_mask`` is whatever the mask function registered under the same name returned
(``masking_utils.create_causal_mask``), and the keys are everything the layer's cache holds (for a static cache, the
whole preallocated buffer). The mask function registered here (:func:`mplus_attention_mask`) returns one of

* ``None``: plain causal attention over every key, bottom-right aligned (a prefill, cached decoding, no padding);
* a ``[B, Tk]`` bool mask, True for a key the row may see: left padding (each row's valid keys are its last ones) and
  a static cache (the rows after the last written one are False). The kernel gets each row's first valid key
  (``kv_start``) and end (``kv_len``) as device tensors, so a static-cache decode step reads nothing on the host;
* a ``[B, 1, Tq, Tk]`` bool mask, materialised as sdpa would, for a mask function it cannot tell from its identity
  (transformers wraps the causal one for packed sequences: ``position_ids`` restarting inside a row with nothing
  cached, e.g. ``DataCollatorWithFlattening``; custom overlays).

:func:`read_attention_mask` turns any mask (those, and the 4-D bool or additive float masks sdpa and eager build,
which the drop-in module may be handed) into what the kernel runs: a key range per row, or packed sequences (one
kernel call per sequence). It compares the mask element by element with the layout it derived and refuses anything
else with a ``ValueError`` naming ``attention_mask`` and pointing to ``attn_implementation="sdpa"``, as it refuses
sliding windows, attention dropout, ``output_attentions``, soft-capping, attention sinks and paged caches: a layout
the kernel cannot honour is an error, never a different answer.

Reading a mask's values costs a host sync; the layers share one mask object, so it is read once per forward and the
result kept (:data:`_READ`, by object and version). While ``torch.compile`` traces or a CUDA graph is captured nothing
is read on the host: the 2-D mask's key ranges are reductions on the device (not checked there: a mask function
called outside tracing checks them), and 4-D masks are refused.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.weak import WeakIdKeyDictionary
from transformers import AttentionInterface
from transformers.masking_utils import AttentionMaskInterface, causal_mask_function, sdpa_mask

from mplus_kernels.attention import memory_attention

__all__ = [
    "MaskLayout",
    "attend_with_mask",
    "mplus_attention_forward",
    "mplus_attention_mask",
    "read_attention_mask",
    "refuse_unsupported",
    "register_with_transformers",
]

_WHO = "attn_implementation='mplus'"
_INSTEAD = "use attn_implementation='sdpa' (or 'eager') for it"

# keyword arguments transformers may pass to an attention function that the kernel cannot honour when set
_UNSUPPORTED = {
    "sliding_window": "sliding-window attention",
    "softcap": "logit soft-capping",
    "s_aux": "attention sinks",
    "sinks": "attention sinks",
    "position_bias": "an additive position bias",
    "cache": "a paged cache (continuous batching)",
    "block_table": "a paged cache (continuous batching)",
}


@dataclasses.dataclass
class MaskLayout:
    """What an attention mask means to the kernel; all None: plain causal attention over every key.

    Attributes:
        kv_start: ``[B]`` int32, each row's first visible key (left padding: flash-attn's ``cache_leftpad``).
        kv_len: ``[B]`` int32, each row's end of visible keys (a static cache: ``cache_seqlens``); causality is
            aligned to it (query t of Tq sees key j iff ``j <= t + kv_len - Tq``).
        sequences: packed rows: per batch row, the ``(start, end)`` token spans of its sequences, each attended alone.
    """

    kv_start: Tensor | None = None
    kv_len: Tensor | None = None
    sequences: list[list[tuple[int, int]]] | None = None


# what each mask object was read as: {mask: (key, MaskLayout)}, key = its version and the shapes it was read for
_READ: WeakIdKeyDictionary = WeakIdKeyDictionary()


def _may_read(t: Tensor) -> bool:
    """Whether ``t``'s values may be read on the host: not while tracing or capturing, not on the meta device."""
    if torch.compiler.is_compiling() or t.device.type == "meta":
        return False
    return not (t.device.type == "cuda" and torch.cuda.is_current_stream_capturing())


def _shape(t: Tensor) -> str:
    return f"[{', '.join(str(s) for s in t.shape)}]"


# --------------------------------------------------------------------------------------------------------------------
# the mask function
# --------------------------------------------------------------------------------------------------------------------
def mplus_attention_mask(
    batch_size: int,
    q_length: int,
    kv_length: int,
    q_offset: int | Tensor = 0,
    kv_offset: int = 0,
    mask_function: Callable = causal_mask_function,
    attention_mask: Tensor | None = None,
    use_vmap: bool = False,
    device: torch.device | str = "cpu",
    **kwargs,
) -> Tensor | None:
    """The mask function of ``"mplus"`` (``AttentionMaskInterface``): ``None``, a ``[B, Tk]`` bool key mask, or a
    materialised ``[B, 1, Tq, Tk]`` bool mask (see the module docstring).

    Args (as ``create_causal_mask`` passes them):
        batch_size, q_length: the queries' ``[B, Tq]``. kv_length: Tk, the keys the layer will attend (a static
            cache: its capacity). q_offset: the first query's cache row (a 0-d device tensor for a static cache, so
            nothing here reads it on the host). kv_offset: the first key's position (non-zero only for windows).
        mask_function: transformers' mask rule; anything but the plain causal one is materialised and checked.
        attention_mask: the ``[B, past + Tq]`` bool padding mask (True: a real token), or None.
    """
    if kv_offset != 0:
        raise ValueError(
            f"{_WHO}: the keys start at kv_offset={kv_offset} (a sliding-window or chunked cache), which the kernel "
            f"cannot attend; {_INSTEAD}"
        )
    if mask_function is not causal_mask_function:
        # packed sequences, overlays: the mask sdpa would get, read back now so that a layout the kernel cannot run
        # is refused here (and the layers find it read)
        mask = sdpa_mask(
            batch_size=batch_size, q_length=q_length, kv_length=kv_length, q_offset=q_offset,
            mask_function=mask_function, attention_mask=attention_mask, allow_is_causal_skip=False,
            use_vmap=use_vmap, device=device,
        )  # fmt: skip
        read_attention_mask(mask, batch_size, q_length, kv_length)
        return mask
    end = q_offset + q_length  # one past the last query's cache row: the keys at and after it are not written yet
    static = isinstance(end, Tensor) or end != kv_length
    if attention_mask is None and not static:
        return None
    valid = (torch.arange(kv_length, device=device) < end).expand(batch_size, kv_length)
    if attention_mask is None:  # a static cache, nothing padded: the layout is known without reading anything
        if _may_read(valid):
            _remember(valid, q_length, kv_length, True, MaskLayout(kv_len=_lens(end, batch_size, device)))
        return valid
    if attention_mask.dim() != 2 or attention_mask.shape[0] != batch_size:
        raise ValueError(
            f"{_WHO}: attention_mask must be the [B={batch_size}, tokens] padding mask, got {_shape(attention_mask)}"
        )
    padding = attention_mask.to(device=device, dtype=torch.bool)[:, :kv_length]
    valid = valid & F.pad(padding, (0, kv_length - padding.shape[1]))  # keys past the mask: not written
    if _may_read(valid):
        _remember(valid, q_length, kv_length, True, _read_key_mask(valid, end))
    return valid


# --------------------------------------------------------------------------------------------------------------------
# reading a mask
# --------------------------------------------------------------------------------------------------------------------
def read_attention_mask(
    attention_mask: Tensor | None,
    batch: int,
    q_len: int,
    k_len: int,
    *,
    causal: bool = True,
    end: int | Tensor | None = None,
) -> MaskLayout:
    """The layout the kernel runs for ``attention_mask`` over ``[B=batch, Tq=q_len]`` queries and ``Tk=k_len`` keys.

    ``attention_mask``: None; a ``[B, <= Tk]`` bool key mask (True: visible; shorter ones end with unwritten rows);
    or a ``[B or 1, 1, Tq, Tk]`` bool or additive float mask. ``end``: one past the last query's key row when the
    caller knows it (the drop-in module: its cache's length), else Tk; a 2-D mask's valid keys must be the run just
    before it. Raises ``ValueError`` naming ``attention_mask`` for anything that is not causal attention with a key
    range per row (left padding, a static cache) or packed causal sequences.
    """
    if attention_mask is None:
        return MaskLayout()
    if not isinstance(attention_mask, Tensor):
        raise TypeError(
            f"{_WHO}: attention_mask must be None or a tensor, got {type(attention_mask).__name__}; {_INSTEAD}"
        )
    mask = attention_mask
    if mask.dim() == 2 and mask.dtype == torch.bool and mask.shape[0] == batch and mask.shape[1] < k_len:
        mask = F.pad(mask, (0, k_len - mask.shape[1]))  # a flash-style mask over the written rows of a static cache
    if not _may_read(mask):
        if mask.dim() == 2 and mask.dtype == torch.bool and tuple(mask.shape) == (batch, k_len):
            return _key_range(mask)  # on the device, unchecked (see the module docstring)
        raise ValueError(
            f"{_WHO}: a {mask.dim()}-D attention_mask {_shape(mask)} cannot be checked while compiling or capturing; "
            f"build the model with attn_implementation='mplus' (compact masks) or {_INSTEAD}"
        )
    key = _key_of(mask, q_len, k_len, causal)
    hit = _READ.get(mask)
    if hit is not None and hit[0] == key:
        return hit[1]
    if mask.dim() == 2:
        if mask.dtype != torch.bool or tuple(mask.shape) != (batch, k_len):
            raise ValueError(
                f"{_WHO}: a 2-D attention_mask reaching the attention must be the bool [B={batch}, Tk={k_len}] key "
                f"mask, got {_shape(attention_mask)} {attention_mask.dtype}"
            )
        layout = _read_key_mask(mask, k_len if end is None else end)
    elif mask.dim() == 4:
        layout = _read_4d(mask, batch, q_len, k_len, causal)
    else:
        raise ValueError(
            f"{_WHO}: attention_mask must be None, [B, Tk] or [B, 1, Tq, Tk], got {_shape(mask)}; {_INSTEAD}"
        )
    return _remember(mask, q_len, k_len, causal, layout)


def _key_of(mask: Tensor, q_len: int, k_len: int, causal: bool) -> tuple:
    # a 2-D key mask means the same for any query length and causality; a 4-D one is read for both
    return (mask._version, k_len) if mask.dim() == 2 else (mask._version, q_len, k_len, causal)


def _remember(mask: Tensor, q_len: int, k_len: int, causal: bool, layout: MaskLayout) -> MaskLayout:
    _READ[mask] = (_key_of(mask, q_len, k_len, causal), layout)
    return layout


def _lens(end: int | Tensor, batch: int, device: torch.device | str) -> Tensor:
    """``end`` (an int or a 0-d tensor, not read on the host) as the ``[B]`` int32 ``kv_len`` of every row."""
    end = end.to(device) if isinstance(end, Tensor) else torch.tensor(end, device=device)
    return end.to(torch.int32).reshape(1).expand(batch).contiguous()


def _key_range(valid: Tensor) -> MaskLayout:
    """``kv_start``/``kv_len`` of a ``[B, Tk]`` key mask whose valid keys are one run per row, on the device."""
    count = valid.sum(-1, dtype=torch.int32)
    ranks = torch.arange(1, valid.shape[1] + 1, device=valid.device, dtype=torch.int32)
    end = (valid * ranks).amax(-1)  # one past the last valid key; 0 for a row with none
    return MaskLayout(kv_start=end - count, kv_len=end)


def _read_key_mask(valid: Tensor, end: int | Tensor) -> MaskLayout:
    """A ``[B, Tk]`` key mask whose valid keys must be, per row, one run ending just before ``end`` (left padding;
    the rows from ``end`` on are a static cache's unwritten ones). One host sync."""
    b, k = valid.shape
    keys = torch.arange(k, device=valid.device)
    count = valid.sum(-1)
    start = end - count
    expected = (keys >= start[:, None]) & (keys < end)
    if not torch.equal(valid, expected):
        row = int((valid != expected).any(-1).nonzero()[0, 0])
        raise ValueError(
            f"{_WHO}: attention_mask {_shape(valid)} is not left padding: in row {row} the valid tokens are not one "
            f"run ending at the last query (right padding, or a hole); pad on the left (tokenizer "
            f"padding_side='left') or {_INSTEAD}"
        )
    if not isinstance(end, Tensor) and end == k and bool((count == k).all()):
        return MaskLayout()  # nothing padded: plain causal
    return MaskLayout(kv_start=start.to(torch.int32), kv_len=_lens(end, b, valid.device))


def _read_4d(mask: Tensor, batch: int, q_len: int, k_len: int, causal: bool) -> MaskLayout:
    """A ``[B or 1, 1, Tq, Tk]`` mask (bool, or additive float: 0 visible, <= the dtype's minimum / 2 not) as a key
    range per row (bottom-right causal when ``causal``) or as packed causal sequences (``Tq == Tk``). One host sync
    per attempt."""
    if mask.shape[0] not in (1, batch) or mask.shape[1] != 1 or tuple(mask.shape[2:]) != (q_len, k_len):
        raise ValueError(
            f"{_WHO}: a 4-D attention_mask must be [B={batch} or 1, 1, Tq={q_len}, Tk={k_len}] (one mask for all "
            f"heads), got {_shape(mask)}; {_INSTEAD}"
        )
    if mask.dtype == torch.bool:
        allowed = mask[:, 0]
    elif mask.is_floating_point():
        allowed = mask[:, 0] == 0
        if not bool((allowed | (mask[:, 0] <= torch.finfo(mask.dtype).min / 2)).all()):
            raise ValueError(
                f"{_WHO}: the additive attention_mask {_shape(mask)} holds biases (values other than 0 and the "
                f"dtype's minimum), which the kernel cannot add; {_INSTEAD}"
            )
    else:
        raise ValueError(f"{_WHO}: a 4-D attention_mask must be bool or float, got {mask.dtype}; {_INSTEAD}")
    n, device = allowed.shape[0], allowed.device
    keys = torch.arange(k_len, device=device)
    queries = torch.arange(q_len, device=device)

    # 1. one key range per row, read off the last query's row
    last = allowed[:, -1]
    count = last.sum(-1)
    end = (last * (keys + 1)).amax(-1)
    start = end - count
    expected = (keys >= start[:, None, None]) & (keys < end[:, None, None])
    if causal:
        expected = expected & (keys <= queries[:, None] + (end - q_len)[:, None, None])
    if torch.equal(allowed, expected):
        if bool(((start == 0) & (end == k_len)).all()):
            return MaskLayout()
        return MaskLayout(
            kv_start=start.to(torch.int32).expand(batch).contiguous(),
            kv_len=end.to(torch.int32).expand(batch).contiguous(),
        )

    # 2. packed sequences: block-diagonal causal; a sequence starts where a query does not see the key before it
    if causal and q_len == k_len:
        starts = torch.ones(n, q_len, dtype=torch.bool, device=device)
        starts[:, 1:] = ~allowed.diagonal(offset=-1, dim1=-2, dim2=-1)
        ids = starts.cumsum(-1)
        expected = (ids[:, :, None] == ids[:, None, :]) & (keys <= queries[:, None])
        if torch.equal(allowed, expected):
            rows = [_spans(row.nonzero()[:, 0].tolist(), q_len) for row in starts.cpu()]
            return MaskLayout(sequences=rows * batch if n == 1 and batch > 1 else rows)

    raise ValueError(
        f"{_WHO}: the attention_mask {_shape(mask)} is neither causal attention over one run of keys per row (left "
        f"padding, a static cache) nor packed causal sequences; the kernel cannot run it, {_INSTEAD}"
    )


def _spans(starts: Sequence[int], length: int) -> list[tuple[int, int]]:
    bounds = [*starts, length]
    return [(s, e) for s, e in zip(bounds, bounds[1:]) if e > s]


def _with_cu_seq_lens(
    layout: MaskLayout, cu_q: Tensor | None, cu_k: Tensor | None, b: int, tq: int, tk: int
) -> MaskLayout:
    """Flash-attention's varlen kwargs (``cu_seq_lens_q/k``, e.g. from ``DataCollatorWithFlattening(
    return_flash_attn_kwargs=True)``): one flattened row of packed sequences, attended apart."""
    if cu_q is None and cu_k is None:
        return layout
    bounds = None if cu_q is None else cu_q.tolist()
    if cu_k is None or cu_q is None or bounds != cu_k.tolist() or b != 1 or tq != tk:
        raise ValueError(
            f"{_WHO}: cu_seq_lens_q/cu_seq_lens_k are read only as packed sequences of one flattened row (batch 1, "
            f"equal query and key boundaries, nothing cached); got batch {b}, Tq={tq}, Tk={tk}; {_INSTEAD}"
        )
    if bounds[0] != 0 or bounds[-1] != tq or any(e < s for s, e in zip(bounds, bounds[1:])):
        raise ValueError(f"{_WHO}: cu_seq_lens_q must rise from 0 to the {tq} tokens of the row, got {bounds}")
    sequences = [_spans(bounds[:-1], tq)]
    if layout.kv_start is not None or layout.kv_len is not None or layout.sequences not in (None, sequences):
        raise ValueError(f"{_WHO}: cu_seq_lens_q {bounds} disagree with the attention_mask; {_INSTEAD}")
    return MaskLayout(sequences=sequences)


# --------------------------------------------------------------------------------------------------------------------
# attending
# --------------------------------------------------------------------------------------------------------------------
def refuse_unsupported(dropout: float, kwargs: dict) -> None:
    """``ValueError`` for the attention arguments the kernel cannot honour (dropout > 0, ``output_attentions``,
    sliding windows, soft-capping, sinks, position biases, paged caches), naming the argument."""
    if dropout:
        raise ValueError(
            f"{_WHO}: attention dropout is not implemented, got dropout={dropout} (the attention's attention_dropout "
            f"in training mode); set config.attention_dropout=0.0 or {_INSTEAD}"
        )
    if kwargs.get("output_attentions"):
        raise ValueError(
            f"{_WHO}: output_attentions=True needs the attention weights, which the fused kernel never forms; use "
            "attn_implementation='eager' for it"
        )
    for name, what in _UNSUPPORTED.items():
        if kwargs.get(name) is not None:
            raise ValueError(f"{_WHO}: {name} ({what}) is not supported, got {name}={kwargs[name]!r}; {_INSTEAD}")


def attend_with_mask(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    attention_mask: Tensor | None,
    *,
    softmax_scale: float | None,
    causal: bool = True,
    backend: str | None = None,
    cache_len: int | Tensor | None = None,
    cu_seq_lens: tuple[Tensor | None, Tensor | None] = (None, None),
) -> Tensor:
    """Attention of ``q [B, Tq, Hq, D]`` over ``k, v [B, Tk, Hkv, D]`` (rotated; any strides) as ``attention_mask``
    lays it out (:func:`read_attention_mask`), on ``memory_attention``. ``cache_len``: the number of valid cache
    rows when the keys are a cache's buffer (a 0-d device tensor for a static cache), used as ``kv_len`` when the
    mask does not say where the keys end. Returns ``[B, Tq, Hq, D]``."""
    b, tq, tk = q.shape[0], q.shape[1], k.shape[1]
    end = None if cache_len is None or (not isinstance(cache_len, Tensor) and cache_len == tk) else cache_len
    layout = read_attention_mask(attention_mask, b, tq, tk, causal=causal, end=end)
    layout = _with_cu_seq_lens(layout, *cu_seq_lens, b, tq, tk)
    if layout.sequences is not None:
        rows = []
        for r, spans in enumerate(layout.sequences):
            parts = [
                memory_attention(q[r : r + 1, s:e], k[r : r + 1, s:e], v[r : r + 1, s:e], softmax_scale=softmax_scale,
                                 causal=causal, backend=backend)[0]
                for s, e in spans
            ]  # fmt: skip
            rows.append(torch.cat(parts, dim=1))
        return torch.cat(rows)
    kv_len = layout.kv_len
    if kv_len is None and end is not None:  # the keys are a static buffer and no mask says where they end
        kv_len = _lens(end, b, q.device)
    out, _ = memory_attention(
        q, k, v, softmax_scale=softmax_scale, causal=causal, kv_len=kv_len, kv_start=layout.kv_start, backend=backend
    )
    return out


def mplus_attention_forward(
    module: nn.Module,
    query: Tensor,
    key: Tensor,
    value: Tensor,
    attention_mask: Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    **kwargs,
) -> tuple[Tensor, None]:
    """The attention function of ``"mplus"`` (``AttentionInterface``): ``query [B, Hq, Tq, D]``, ``key/value
    [B, Hkv, Tk, D]`` (Hugging Face layout, rotated, the cache already updated; GQA native) → ``(out [B, Tq, Hq, D],
    None)``, laid out by ``attention_mask`` (module docstring). Causal unless ``is_causal=False`` is passed or the
    module's ``is_causal`` is False."""
    refuse_unsupported(dropout, kwargs)
    is_causal = kwargs.get("is_causal")
    causal = bool(getattr(module, "is_causal", True) if is_causal is None else is_causal)
    out = attend_with_mask(
        query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2), attention_mask, softmax_scale=scaling,
        causal=causal, backend=getattr(module, "backend", None),
        cu_seq_lens=(kwargs.get("cu_seq_lens_q"), kwargs.get("cu_seq_lens_k")),
    )  # fmt: skip
    return out, None


def register_with_transformers() -> None:
    """Register ``"mplus"`` with transformers' attention and mask registries (idempotent; done on ``import mplus``)."""
    AttentionInterface.register("mplus", mplus_attention_forward)
    AttentionMaskInterface.register("mplus", mplus_attention_mask)


register_with_transformers()
