// Dot products of bf16 vectors on vdpbf16ps, as pairs of elements: the avx512_bf16 level's kernels for retrieval
// scoring (retrieval_impl.h) and the retriever scores (retriever_scores_impl.h). Included inside namespace
// mplus::MPLUS_ISA after vec.h, at level 3 only.
//
// A bf16 row of ds elements is read as depth = ceil(ds / 2) 32-bit elements, each a pair (x[2i], x[2i+1]) (the last
// one zero-padded for an odd ds). vdpbf16ps multiplies 16 such pairs by 16 others and adds both products (exact:
// bf16 x bf16 fits fp32) into 16 fp32 sums, so a dot product over ds runs as depth instructions per 16 lanes, twice
// the multiply-adds of an fp32 FMA. On a Zen 4 core that is twice the FMA's flops; Intel's cores (measured on an
// AVX-512 + AMX Xeon) retire it at a quarter of the FMA's rate, which is why only the avx512_bf16 level uses it.

#if MPLUS_ISA_LEVEL != 3
#error "bf16_pairs.h is for the avx512_bf16 level"
#endif

inline int64_t pairs_depth(int64_t ds) { return (ds + 1) / 2; }

// A bf16 row (its bits) as pairs: dst holds pairs_depth(ds) 32-bit elements.
inline void copy_pairs(const void* src, int64_t ds, float* dst) {
  auto* out = reinterpret_cast<uint16_t*>(dst);
  std::memcpy(out, src, ds * sizeof(uint16_t));
  if (ds % 2 != 0) out[ds] = 0;
}

// out[r][v] lane l = sum_{d < depth} packed[d * ldp + v * kLanes + l] . rows[r * lda + d], the products of pairs, d
// ascending: MR rows (each pair broadcast to the 16 lanes) against NV vectors of packed columns.
template <int MR, int NV>
inline void dot_pairs(const float* __restrict packed, int64_t ldp, const float* __restrict rows, int64_t lda,
                      int64_t depth, vf (&out)[MR][NV]) {
  __m512 acc[MR][NV];
#pragma GCC unroll 32
  for (int r = 0; r < MR; ++r) {
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) acc[r][v] = _mm512_setzero_ps();
  }
  for (int64_t d = 0; d < depth; ++d) {
    __m512bh col[NV];
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) col[v] = reinterpret_cast<__m512bh>(_mm512_load_ps(packed + d * ldp + v * kLanes));
#pragma GCC unroll 32
    for (int r = 0; r < MR; ++r) {
      const __m512bh x = reinterpret_cast<__m512bh>(_mm512_set1_ps(rows[r * lda + d]));  // the pair, 16 times
#pragma GCC unroll 4
      for (int v = 0; v < NV; ++v) acc[r][v] = _mm512_dpbf16_ps(acc[r][v], col[v], x);
    }
  }
#pragma GCC unroll 32
  for (int r = 0; r < MR; ++r) {
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) out[r][v] = reinterpret_cast<vf>(acc[r][v]);
  }
}
