// Inner kernels of the CPU memory-attention prefill in fp32 (attention_impl.h drives them), ISA-generic: written on
// vec.h's `vf` (kLanes fp32 lanes, one register of the level) and compiled once per ISA level (isa.h). Everything
// computes in fp32. These are the kernels of every level for fp32 and fp16 inputs (fp16 FMAs would accumulate in
// fp16), and for bf16 inputs below the bf16 levels; at avx512_bf16 and amx, bf16 inputs take bf16 matrix products
// instead (attention_prefill_bf16.h). (vdpbf16ps runs at half the FLOP rate of vfmadd231ps on the AVX-512 Xeons
// measured, 79 vs 173 GFLOP/s per core, but at twice it on Zen 4, 232 vs 116: the bf16 level is worth it where the
// CPU has it without AMX.)
//
// Prefill (many query rows per KV head): "rows in lanes". Scores are computed transposed, S^T[key][row], so the
// lanes of a vector are kLanes query rows; the online softmax is then lane-wise (no horizontal reductions) and the
// causal mask is a per-lane threshold. Q^T and O^T live in [D][rows] tiles, K and V in [keys][D] fp32 tiles whose
// elements are broadcast. Micro-tiles (keys or dims x row vectors) are sized to the register file: 8 x 3 (24
// accumulators of 32 zmm, broadcasts folded into the FMA) on AVX-512, 4 x 3 or 4 x 2 on the 16-register levels,
// where a broadcast needs a register of its own (kQkKeys, kRowVecs, kPvDims below). Decode's kernels are in
// attention_decode.h.
//
// Included inside namespace mplus::MPLUS_ISA after vec.h.

// Llama RoPE of one fp32 row in place: [a, b] -> [a cos - b sin, b cos + a sin] on the two halves.
inline void rope_inplace(float* x, const float* cos, const float* sin, int64_t d) {
  const int64_t h = d / 2;
  for (int64_t i = 0; i < h; ++i) {
    const float a = x[i], b = x[i + h];
    x[i] = a * cos[i] - b * sin[i];
    x[i + h] = b * cos[i] + a * sin[i];
  }
}

// ================================================= prefill ===========================================================
// Micro-tile of Q K^T: kQkKeys keys x RV row vectors; of P V: kPvDims dims x RV row vectors (RV <= kRowVecs).
#if MPLUS_ISA_LEVEL >= 2
constexpr int kQkKeys = 8, kPvDims = 8, kRowVecs = 3;
#else
constexpr int kQkKeys = 4, kPvDims = 4, kRowVecs = 3;
#endif
static_assert(kRowVecs * (kQkKeys + 1) + 1 <= kVectorRegisters + 1, "Q K^T micro-tile exceeds the register file");

// Cache lines of the next key block, fetched a few at a time from inside the micro-kernels: a burst of hundreds of
// prefetches would queue behind the core's few line-fill buffers and stall it.
struct Prefetcher {
  const char* const* line = nullptr;
  int n = 0, next = 0, per_step = 0;
  void step() {
    for (const int e = next + per_step < n ? next + per_step : n; next < e; ++next) prefetch_line(line[next]);
  }
  void finish() {
    for (; next < n; ++next) prefetch_line(line[next]);
  }
};

// Tiles (fp32): K, V [nb][d] (row stride d); Q^T, O^T [d][ld] (the row group starts at column 0 of the pointer);
// S [nb][RV*kLanes] scores, then probabilities. RV = vectors of kLanes query rows in the row group.

// S[j][r] = sum_k K[j][k] * Q^T[k][r]  (Q^T already holds softmax_scale * log2(e))
template <int RV>
inline void qk_tile(const float* K, const float* QT, int64_t ld, int64_t d, int nb, float* S, Prefetcher& pf) {
  for (int j0 = 0; j0 < nb; j0 += kQkKeys) {
    pf.step();
    vf acc[kQkKeys][RV] = {};
    const float* k = K + j0 * d;
    for (int64_t i = 0; i < d; ++i) {
      vf q[RV];
      for (int c = 0; c < RV; ++c) q[c] = load(QT + i * ld + c * kLanes);
      for (int jj = 0; jj < kQkKeys; ++jj) {
        const float kk = k[jj * d + i];
        for (int c = 0; c < RV; ++c) acc[jj][c] += kk * q[c];
      }
    }
    for (int jj = 0; jj < kQkKeys; ++jj)
      for (int c = 0; c < RV; ++c) store(S + (j0 + jj) * RV * kLanes + c * kLanes, acc[jj][c]);
  }
}

// Online softmax over the nb keys of S, lane-wise per query row; m (running max, log2 units) and l (running sum) are
// [RV*kLanes] arrays of the row group. Leaves 2^(S - m_new) in S and the rescale factor of the old state in alpha.
template <int RV>
inline void softmax_tile(float* S, int nb, float* m, float* l, vf* alpha) {
  for (int c = 0; c < RV; ++c) {
    const vf m_old = load(m + c * kLanes);
    vf mx = m_old;
    for (int j = 0; j < nb; ++j) mx = vmax(mx, load(S + j * RV * kLanes + c * kLanes));
    const vf m_use = mx == splat(kNegInf) ? vf{} : mx;  // a row with no visible key yet: keep 0s, avoid inf - inf
    vf sum = {};
    for (int j = 0; j < nb; ++j) {
      float* s = S + j * RV * kLanes + c * kLanes;
      const vf p = exp2v(load(s) - m_use);
      store(s, p);
      sum += p;
    }
    alpha[c] = exp2v(m_old - m_use);
    store(l + c * kLanes, load(l + c * kLanes) * alpha[c] + sum);
    store(m + c * kLanes, mx);
  }
}

// O^T[k][r] += sum_j V[j][k] * P[j][r]  (the caller rescales O^T first when the running max moved)
template <int RV>
inline void pv_tile(const float* V, const float* P, int nb, float* OT, int64_t ld, int64_t d, Prefetcher& pf) {
  for (int64_t k0 = 0; k0 < d; k0 += kPvDims) {
    pf.step();
    vf acc[kPvDims][RV];
    for (int kk = 0; kk < kPvDims; ++kk)
      for (int c = 0; c < RV; ++c) acc[kk][c] = load(OT + (k0 + kk) * ld + c * kLanes);
    for (int j = 0; j < nb; ++j) {
      vf p[RV];
      for (int c = 0; c < RV; ++c) p[c] = load(P + j * RV * kLanes + c * kLanes);
      const float* v = V + j * d + k0;
      for (int kk = 0; kk < kPvDims; ++kk)
        for (int c = 0; c < RV; ++c) acc[kk][c] += v[kk] * p[c];
    }
    for (int kk = 0; kk < kPvDims; ++kk)
      for (int c = 0; c < RV; ++c) store(OT + (k0 + kk) * ld + c * kLanes, acc[kk][c]);
  }
}

// O^T[k][r] *= alpha[r], skipped when no row's max moved (the common case once the first blocks are seen).
template <int RV>
inline void rescale_tile(const vf* alpha, float* OT, int64_t ld, int64_t d) {
  bool ones = true;
  for (int c = 0; c < RV; ++c)
    for (int i = 0; i < kLanes; ++i) ones = ones && alpha[c][i] == 1.f;
  if (ones) return;
  for (int64_t k = 0; k < d; ++k)
    for (int c = 0; c < RV; ++c) store(OT + k * ld + c * kLanes, alpha[c] * load(OT + k * ld + c * kLanes));
}
