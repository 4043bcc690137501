"""GPU benchmarks of the mplus ops at M+ shapes, for a machine with an NVIDIA GPU (run by ``make gpu-check``).

Not a pytest suite (no file here matches ``bench_*.py``): ``python -m benchmarks.gpu`` from the repository root runs
the families below, each in a few seconds to a minute on an H100/H200, and writes one JSON line per result:

* ``attention``: Hq 32 / Hkv 8, D 128, memory M 12,801, Tq 2048, 256 (prefill) and 1 (decode), vs SDPA (GQA, a
  bottom-right bias or mask), the official SDPA path, FlexAttention (compiled) and flash-attn (when it imports);
* ``memory_update``: L 32, N 10,240, d 4,096, K 256 (+ fp64 ages), vs batched in-place ``index_select``/``index_copy_``;
* ``retrieval``: T 2,048, ds 256, S 153,600 and 1,000,000, K0 2,560, vs chunked torch matmul + sigmoid + mean + topk;
* ``gather``: 2,560 of 168,704 rows (153,600 + 15,104) of d 4,096, device → device vs ``index_select`` and memcpy,
  and pinned host → device (zero-copy) vs host ``index_select`` into pinned memory + ``.to(cuda, non_blocking)``.

Timing: CUDA events around each call, after a warm-up, with the L2 cache flushed before every timed call, median of
N (N adapted so a case takes about half a second); calls that do host work (the host-gather peers) are timed on the
wall clock between ``torch.cuda.synchronize()`` calls. Peak memory: ``torch.cuda.max_memory_allocated()`` above
the allocation at the start of one separate call (outputs included). Every case is guarded: an error is recorded
and the next case runs; after an error that leaves the CUDA context unusable the rest of the family is skipped.
Benchmarks never assert on time.
"""
