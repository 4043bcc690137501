"""Long-term-memory row gather on the GPU: 2,560 of 168,704 rows (153,600 LTM + 15,104 cache) of d 4,096, bf16.

Device → device (the rows live in GPU memory):
* ``mplus``: ``mplus_kernels.gather_rows_`` (Triton, two sources, no concatenation);
* ``torch_index_select``: two ``index_select`` calls on clamped indices + ``torch.where`` (no host sync);
* ``memcpy``: a contiguous copy of the same bytes (the bandwidth ceiling).

Host (pinned) → device (the rows live in pinned host memory, the indices on the device, as after retrieval):
* ``mplus_zero_copy``: the same Triton kernel with the *pinned host* tensors as sources and the output on the GPU:
  the kernel reads the selected rows over PCIe/NVLink-C2C through unified virtual addressing, no host sync,
  no CPU gather (DESIGN.md §2.4). Through the wrapper; if the wrapper refuses mixed devices, through the launcher;
* ``torch_host_gather``: indices copied to the host (a sync), ``index_select`` of each source into a pinned staging
  buffer, then ``out.copy_(staging, non_blocking=True)`` (timed on the wall clock: it is host work);
* ``h2d_memcpy``: a pinned → device copy of the same bytes (the link's ceiling).

``gbps`` = the gathered bytes (2,560 × 4,096 × 2 = 21 MB) per second. ``matches_mplus`` checks exact equality.
"""

from __future__ import annotations

import torch

import mplus_kernels as mk

from ._harness import Recorder

NA, NB, D, K0 = 153_600, 15_104, 4_096, 2_560
DTYPE = torch.bfloat16
SHAPE = f"{K0} of {NA}+{NB} rows, d{D}"
MOVED = K0 * D * 2


def _equal(ref: torch.Tensor | None):
    if ref is None:
        return None
    return lambda out: {"matches_mplus": bool(torch.equal(out, ref))}


def _device(rec: Recorder, a: torch.Tensor, b: torch.Tensor, index: torch.Tensor, out: torch.Tensor):
    """Device -> device; returns mplus's output (a copy) for the checks of the host cases."""
    group = "gather/device"
    common = {"shape": SHAPE, "dtype": DTYPE, "moved_bytes": MOVED}
    ref = rec.measure(group, "mplus", lambda: lambda: mk.gather_rows_(out, a, b, index), **common)
    ref = None if ref is None else ref.clone()

    def torch_select():
        ia = index.clamp(max=NA - 1)
        ib = (index - NA).clamp(min=0)
        return torch.where((index < NA)[:, None], a.index_select(0, ia), b.index_select(0, ib))

    rec.measure(group, "torch_index_select", lambda: torch_select, check=_equal(ref), **common)
    contiguous = torch.empty_like(out)
    rec.measure(group, "memcpy", lambda: lambda: contiguous.copy_(a[:K0]), **common)
    return ref


def _host(rec: Recorder, a_host: torch.Tensor, b_host: torch.Tensor, index: torch.Tensor, out: torch.Tensor, ref):
    """Pinned host -> device."""
    group = "gather/host_pinned"
    common = {"shape": SHAPE, "dtype": DTYPE, "moved_bytes": MOVED}
    staging = torch.empty(K0, D, dtype=DTYPE, pin_memory=True)

    def zero_copy():
        try:
            mk.gather_rows_(out, a_host, b_host, index)
            return lambda: mk.gather_rows_(out, a_host, b_host, index)
        except ValueError as exc:  # the wrapper refused mixed devices: the launcher reads host memory all the same
            rec.note(group, info=f"gather_rows_ refused pinned sources ({exc}); timing the launcher")
            from mplus_kernels.gather.triton_impl import gather_rows_fwd

            def launch():
                gather_rows_fwd(out, a_host, b_host, index)
                return out

            return launch

    rec.measure(group, "mplus_zero_copy", zero_copy, check=_equal(ref), **common)

    def host_gather():
        idx = index.cpu()  # the indices come from retrieval, on the device: a sync
        in_a = idx < NA
        ia, ib = idx[in_a], idx[~in_a] - NA
        torch.index_select(a_host, 0, ia, out=staging[: ia.numel()])  # idx is sorted: the a-rows come first
        torch.index_select(b_host, 0, ib, out=staging[ia.numel() :])
        out.copy_(staging, non_blocking=True)
        return out

    rec.measure(group, "torch_host_gather", lambda: host_gather, check=_equal(ref), timer="wall", **common)
    rec.measure(group, "h2d_memcpy", lambda: lambda: out.copy_(staging, non_blocking=True), **common)


def run(rec: Recorder) -> None:
    try:
        g = torch.Generator(device="cuda").manual_seed(0)
        a = torch.randn(NA, D, generator=g, device="cuda").to(DTYPE)
        b = torch.randn(NB, D, generator=g, device="cuda").to(DTYPE)
        index = torch.randperm(NA + NB, generator=g, device="cuda")[:K0].sort().values
        out = torch.empty(K0, D, dtype=DTYPE, device="cuda")
    except Exception as exc:
        rec.note("gather", error=f"inputs: {type(exc).__name__}: {exc}")
        return
    ref = _device(rec, a, b, index, out)
    try:
        a_host = torch.empty(NA, D, dtype=DTYPE, pin_memory=True)
        b_host = torch.empty(NB, D, dtype=DTYPE, pin_memory=True)
        a_host.copy_(a)
        b_host.copy_(b)
    except Exception as exc:
        rec.note("gather/host_pinned", error=f"pinned sources: {type(exc).__name__}: {exc}")
        return
    del a, b
    torch.cuda.empty_cache()
    _host(rec, a_host, b_host, index, out, ref)
