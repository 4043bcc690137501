// Inner kernels of the CPU memory attention (attention_impl.h drives them), ISA-generic: written on vec.h's `vf`
// (kLanes fp32 lanes, one register of the level) and compiled once per ISA level (isa.h). Everything computes in
// fp32: on the AVX-512 CPUs measured, vdpbf16ps runs at half the FLOP rate of vfmadd231ps (79 vs 173 GFLOP/s per
// core) and fp16 FMAs accumulate in fp16.
//
// Two shapes of work, two layouts:
// * prefill (many query rows per KV head): "rows in lanes". Scores are computed transposed, S^T[key][row], so the
//   lanes of a vector are kLanes query rows; the online softmax is then lane-wise (no horizontal reductions) and the
//   causal mask is a per-lane threshold. Q^T and O^T live in [D][rows] tiles, K and V in [keys][D] fp32 tiles whose
//   elements are broadcast. Micro-tiles (keys or dims x row vectors) are sized to the register file: 8 x 3 (24
//   accumulators of 32 zmm, broadcasts folded into the FMA) on AVX-512, 4 x 3 or 4 x 2 on the 16-register levels,
//   where a broadcast needs a register of its own (kQkKeys, kRowVecs, kPvDims below).
// * decode (a few rows): "dims in lanes". A key row is loaded (and converted, and rotated) a pair of vectors at a
//   time and dotted with up to 4 query rows of its KV head; kLanes keys' partial sums are folded into one score vector
//   by a transpose-reduction tree.
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

// ================================================= decode ============================================================
// NV = D / kLanes vectors per row. q [R][D] fp32 (scaled), R <= kMaxDecodeRows, processed 4 rows at a time.
constexpr int kMaxDecodeRows = 8;
constexpr int kDecodeRowChunk = 4;
// Dims (in vectors) per pass of the P V accumulators: RC x kPvChunk accumulators + kPvChunk value vectors.
constexpr int kPvChunk = MPLUS_ISA_LEVEL >= 2 ? 4 : 2;

// Scores of one key for RC query rows: part[r] (kLanes partial sums each). A key row that fits in half the register
// file (NV <= 8) is loaded, converted and rotated into registers once and dotted with each row (two accumulators per
// row for two FMA chains); a longer one (D 128 on the 16-register levels) is read a pair of vectors (dims i and
// i + D/2, what RoPE mixes) at a time and dotted with every row, two accumulators per row.
template <typename T, int NV, int RC>
inline void decode_key_rows(const T* key, const float* cos, const float* sin, const float* q, vf* part) {
  constexpr int H = NV / 2;
  if constexpr (NV <= 8) {
    vf k[NV];
    for (int i = 0; i < NV; ++i) k[i] = load_cvt(key + i * kLanes);
    if (cos != nullptr) {
      for (int i = 0; i < H; ++i) {
        const vf a = k[i], b = k[i + H];
        const vf c = load(cos + i * kLanes), sn = load(sin + i * kLanes);
        k[i] = a * c - b * sn;
        k[i + H] = b * c + a * sn;
      }
    }
    for (int r = 0; r < RC; ++r) {
      const float* qr = q + r * NV * kLanes;
      vf a0 = load(qr) * k[0], a1 = load(qr + kLanes) * k[1];
      for (int i = 2; i < NV; i += 2) {
        a0 += load(qr + i * kLanes) * k[i];
        a1 += load(qr + (i + 1) * kLanes) * k[i + 1];
      }
      part[r] = a0 + a1;
    }
  } else {
    vf lo[RC] = {}, hi[RC] = {};
    for (int i = 0; i < H; ++i) {
      vf a = load_cvt(key + i * kLanes), b = load_cvt(key + (i + H) * kLanes);
      if (cos != nullptr) {
        const vf c = load(cos + i * kLanes), sn = load(sin + i * kLanes);
        const vf ra = a * c - b * sn;
        b = b * c + a * sn;
        a = ra;
      }
      for (int r = 0; r < RC; ++r) {
        lo[r] += load(q + r * NV * kLanes + i * kLanes) * a;
        hi[r] += load(q + r * NV * kLanes + (i + H) * kLanes) * b;
      }
    }
    for (int r = 0; r < RC; ++r) part[r] = lo[r] + hi[r];
  }
}

// Scores of up to kLanes keys for RC query rows (part[r][jj]); per_key(jj) runs before key jj is read.
template <typename T, int NV, int RC, typename F>
inline void decode_scores_rows(const T* const* key, const float* const* cos, const float* const* sin, const float* q,
                               vf (*part)[kLanes], F&& per_key) {
  for (int jj = 0; jj < kLanes; ++jj) {
    per_key(jj);
    vf col[RC];
    if (key[jj] == nullptr) {
      for (int r = 0; r < RC; ++r) col[r] = vf{};
    } else {
      decode_key_rows<T, NV, RC>(key[jj], cos[jj], sin[jj], q, col);
    }
    for (int r = 0; r < RC; ++r) part[r][jj] = col[r];
  }
}

// Scores of up to kLanes keys for the R query rows: s[r * lds + jj]. key[jj] == nullptr marks a missing key (score 0,
// the caller masks it); cos[jj] != nullptr rotates key jj (a memory key stored before RoPE). per_key(jj) runs once
// per key (the caller's prefetches, spread over the loop).
template <typename T, int NV, typename F>
inline void decode_scores(const T* const* key, const float* const* cos, const float* const* sin, const float* q,
                          int R, float* s, int64_t lds, F&& per_key) {
  static_assert(NV % 2 == 0, "decode needs an even number of vectors per row");
  vf part[kMaxDecodeRows][kLanes];
  auto none = [](int) {};
  for (int r0 = 0; r0 < R; r0 += kDecodeRowChunk) {
    const float* qr = q + r0 * NV * kLanes;
    vf (*pr)[kLanes] = part + r0;
    const bool first = r0 == 0;
    switch (R - r0 >= 4 ? 4 : R - r0) {
      case 4: first ? decode_scores_rows<T, NV, 4>(key, cos, sin, qr, pr, per_key)
                    : decode_scores_rows<T, NV, 4>(key, cos, sin, qr, pr, none); break;
      case 3: first ? decode_scores_rows<T, NV, 3>(key, cos, sin, qr, pr, per_key)
                    : decode_scores_rows<T, NV, 3>(key, cos, sin, qr, pr, none); break;
      case 2: first ? decode_scores_rows<T, NV, 2>(key, cos, sin, qr, pr, per_key)
                    : decode_scores_rows<T, NV, 2>(key, cos, sin, qr, pr, none); break;
      default: first ? decode_scores_rows<T, NV, 1>(key, cos, sin, qr, pr, per_key)
                     : decode_scores_rows<T, NV, 1>(key, cos, sin, qr, pr, none); break;
    }
  }
  for (int r = 0; r < R; ++r) store(s + r * lds, transpose_reduce(part[r]));  // (overwrites part[r])
}

// o[r][:] = alpha[r] * o[r][:] + sum_{j < n} p[r * ldp + j] * V_j for RC rows; dims in chunks of kPvChunk vectors so
// that the RC x kPvChunk accumulators stay in registers while the n value rows stream through.
template <typename T, int NV, int RC>
inline void decode_pv_rows(const T* const* val, int n, const float* p, int64_t ldp, const float* alpha, float* o) {
  static_assert(NV % kPvChunk == 0, "head dim must be a multiple of kPvChunk vectors");
  for (int i0 = 0; i0 < NV; i0 += kPvChunk) {
    vf acc[RC][kPvChunk];
    for (int r = 0; r < RC; ++r)
      for (int i = 0; i < kPvChunk; ++i) acc[r][i] = alpha[r] * load(o + r * NV * kLanes + (i0 + i) * kLanes);
    for (int j = 0; j < n; ++j) {
      vf v[kPvChunk];
      for (int i = 0; i < kPvChunk; ++i) v[i] = load_cvt(val[j] + (i0 + i) * kLanes);
      for (int r = 0; r < RC; ++r) {
        const float pr = p[r * ldp + j];
        for (int i = 0; i < kPvChunk; ++i) acc[r][i] += pr * v[i];
      }
    }
    for (int r = 0; r < RC; ++r)
      for (int i = 0; i < kPvChunk; ++i) store(o + r * NV * kLanes + (i0 + i) * kLanes, acc[r][i]);
  }
}

template <typename T, int NV>
inline void decode_pv(const T* const* val, int n, const float* p, int64_t ldp, const float* alpha, int R, float* o) {
  for (int r0 = 0; r0 < R; r0 += kDecodeRowChunk) {
    const float* pr = p + r0 * ldp;
    float* orow = o + r0 * NV * kLanes;
    switch (R - r0 >= 4 ? 4 : R - r0) {
      case 4: decode_pv_rows<T, NV, 4>(val, n, pr, ldp, alpha + r0, orow); break;
      case 3: decode_pv_rows<T, NV, 3>(val, n, pr, ldp, alpha + r0, orow); break;
      case 2: decode_pv_rows<T, NV, 2>(val, n, pr, ldp, alpha + r0, orow); break;
      default: decode_pv_rows<T, NV, 1>(val, n, pr, ldp, alpha + r0, orow); break;
    }
  }
}
