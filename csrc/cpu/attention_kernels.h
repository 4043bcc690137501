// Inner kernels of the CPU memory attention (csrc/cpu/attention.cpp drives them).
//
// Everything computes in fp32 on 16-lane vectors written with GCC vector extensions: with -march=native on an AVX-512
// machine each `vf` is one zmm register and `acc += x * v` is one vfmadd (with an embedded broadcast when x is a
// scalar in memory); on other ISAs the compiler splits the same code into AVX2/SSE halves, so the file stays portable
// (only the dtype conversions and the prefetch have AVX-512 / x86 forms, with generic fallbacks). On this project's
// CPU (AVX-512 with avx512_bf16 and avx512_fp16, no AMX) fp32 FMA is the fastest exact-enough path: vdpbf16ps
// measures at half the FLOP rate of vfmadd231ps (79 vs 173 GFLOP/s per core), and fp16 FMAs accumulate in fp16.
//
// Two shapes of work, two layouts:
// * prefill (many query rows per KV head): "rows in lanes". Scores are computed transposed, S^T[key][row], so the
//   16 lanes of a vector are 16 query rows; the online softmax is then lane-wise (no horizontal reductions) and the
//   causal mask is a per-lane threshold. Q^T and O^T live in [D][rows] tiles, K and V in [keys][D] fp32 tiles whose
//   elements are broadcast. Micro-tiles: 8 keys x 48 rows for Q K^T and 8 dims x 48 rows for P V (24 accumulators).
// * decode (a few rows): "dims in lanes". A key row is loaded (and converted, and rotated) into registers once and
//   dotted with every query row of its KV head; 16 keys' partial sums are folded into one score vector by a
//   transpose-reduction tree.
#pragma once

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#if defined(__AVX512F__)
#include <immintrin.h>
#endif

#include <cstdint>
#include <cstring>
#include <limits>

namespace mplus::attn {

typedef float vf __attribute__((vector_size(64)));
typedef int32_t vi __attribute__((vector_size(64)));
typedef uint32_t vu __attribute__((vector_size(64)));
typedef uint16_t vu16 __attribute__((vector_size(32)));
typedef _Float16 vh __attribute__((vector_size(32)));
constexpr int kLanes = 16;
constexpr float kNegInf = -std::numeric_limits<float>::infinity();

// Prefetch into L2 (prefetcht1): the lines are consumed a block later, after the compute in between has cycled L1,
// and measured faster than prefetcht0 (fewer stalls on the line-fill buffers). Written as asm because GCC 12 drops
// __builtin_prefetch from loops it proves otherwise free of side effects (the decode loop lost all of them).
inline void prefetch_line(const void* p) {
#if defined(__x86_64__)
  asm volatile("prefetcht1 %0" : : "m"(*static_cast<const char*>(p)));
#else
  __builtin_prefetch(p, 0, 2);
#endif
}

inline vf splat(float x) { return vf{} + x; }
inline vf load(const float* p) {
  vf v;
  std::memcpy(&v, p, sizeof v);
  return v;
}
inline void store(float* p, vf v) { std::memcpy(p, &v, sizeof v); }
inline vf vmax(vf a, vf b) { return a > b ? a : b; }

// --- 16 elements of an input dtype <-> 16 fp32 lanes -------------------------------------------------------------
inline vf load_cvt(const float* p) { return load(p); }
// GCC lowers the generic conversions poorly (a 32-byte widening becomes 2 halves; fp16 -> fp32 is even scalarised),
// so AVX-512 gets its one-instruction forms.
inline vf load_cvt(const c10::BFloat16* p) {  // bf16 is the top half of an fp32
#if defined(__AVX512F__)
  const __m512i w = _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
  return _mm512_castsi512_ps(_mm512_slli_epi32(w, 16));
#else
  vu16 h;
  std::memcpy(&h, p, sizeof h);
  return reinterpret_cast<vf>(__builtin_convertvector(h, vu) << 16);
#endif
}
inline vf load_cvt(const c10::Half* p) {
#if defined(__AVX512F__)
  return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
#else
  vh h;
  std::memcpy(&h, p, sizeof h);
  return __builtin_convertvector(h, vf);
#endif
}
inline void store_cvt(float* p, vf v) { store(p, v); }
inline void store_cvt(c10::Half* p, vf v) {
  const vh h = __builtin_convertvector(v, vh);
  std::memcpy(p, &h, sizeof h);
}
inline void store_cvt(c10::BFloat16* p, vf v) {  // round to nearest even, NaN stays NaN (c10::BFloat16's rule)
  const vu u = reinterpret_cast<vu>(v);
  vu r = (u + 0x7FFFu + ((u >> 16) & 1u)) >> 16;
  r = (v != v) ? vu{} + 0x7FC0u : r;
  const vu16 h = __builtin_convertvector(r, vu16);
  std::memcpy(p, &h, sizeof h);
}

// A row of n elements converted to fp32 (n need not be a multiple of 16).
template <typename T>
inline void load_row(const T* src, float* dst, int64_t n) {
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes) store(dst + i, load_cvt(src + i));
  for (; i < n; ++i) dst[i] = static_cast<float>(src[i]);
}
template <typename T>
inline void store_row(T* dst, const float* src, int64_t n) {
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes) store_cvt(dst + i, load(src + i));
  for (; i < n; ++i) dst[i] = static_cast<T>(src[i]);
}

// Llama RoPE of one fp32 row in place: [a, b] -> [a cos - b sin, b cos + a sin] on the two halves.
inline void rope_inplace(float* x, const float* cos, const float* sin, int64_t d) {
  const int64_t h = d / 2;
  for (int64_t i = 0; i < h; ++i) {
    const float a = x[i], b = x[i + h];
    x[i] = a * cos[i] - b * sin[i];
    x[i + h] = b * cos[i] + a * sin[i];
  }
}

// 2^x for x <= 0 (softmax arguments), relative error ~1e-7: x = n + f with f in [-1/2, 1/2], 2^f by Cephes' exp2f
// polynomial, 2^n added to the exponent bits. x < -125 (including -inf, masked keys) gives exactly 0.
inline vf exp2v(vf x) {
  const vi tiny = x < splat(-125.f);
  x = tiny ? splat(-125.f) : x;
  const vf magic = splat(12582912.f);  // 1.5 * 2^23: adding it rounds to an integer kept in the low mantissa bits
  const vf t = x + magic;
  const vf f = x - (t - magic);
  vf p = splat(1.535336188319500e-4f);
  p = p * f + 1.339887440266574e-3f;
  p = p * f + 9.618437357674640e-3f;
  p = p * f + 5.550332471162809e-2f;
  p = p * f + 2.402264791363012e-1f;
  p = p * f + 6.931472028550421e-1f;
  p = p * f + 1.0f;
  const vi e = (reinterpret_cast<vi>(t) - reinterpret_cast<vi>(magic)) << 23;
  return tiny ? vf{} : reinterpret_cast<vf>(reinterpret_cast<vi>(p) + e);
}

// Horizontal max / sum by halving (4 shuffle steps instead of 15 scalar ones).
inline float hmax(vf v) {
  v = vmax(v, __builtin_shuffle(v, vi{8, 9, 10, 11, 12, 13, 14, 15, 0, 1, 2, 3, 4, 5, 6, 7}));
  v = vmax(v, __builtin_shuffle(v, vi{4, 5, 6, 7, 0, 1, 2, 3, 12, 13, 14, 15, 8, 9, 10, 11}));
  v = vmax(v, __builtin_shuffle(v, vi{2, 3, 0, 1, 6, 7, 4, 5, 10, 11, 8, 9, 14, 15, 12, 13}));
  v = vmax(v, __builtin_shuffle(v, vi{1, 0, 3, 2, 5, 4, 7, 6, 9, 8, 11, 10, 13, 12, 15, 14}));
  return v[0];
}
inline float hsum(vf v) {
  v += __builtin_shuffle(v, vi{8, 9, 10, 11, 12, 13, 14, 15, 0, 1, 2, 3, 4, 5, 6, 7});
  v += __builtin_shuffle(v, vi{4, 5, 6, 7, 0, 1, 2, 3, 12, 13, 14, 15, 8, 9, 10, 11});
  v += __builtin_shuffle(v, vi{2, 3, 0, 1, 6, 7, 4, 5, 10, 11, 8, 9, 14, 15, 12, 13});
  v += __builtin_shuffle(v, vi{1, 0, 3, 2, 5, 4, 7, 6, 9, 8, 11, 10, 13, 12, 15, 14});
  return v[0];
}

// out[i] = sum of the lanes of x[i], i < 16: a tree of 15 shuffle-add pairs (unpcklps/unpcklpd/shuff32x4 on x86)
// instead of 16 separate horizontal sums.
inline vf transpose_reduce16(const vf* x) {
  const vi lo32 = {0, 16, 1, 17, 4, 20, 5, 21, 8, 24, 9, 25, 12, 28, 13, 29};
  const vi hi32 = {2, 18, 3, 19, 6, 22, 7, 23, 10, 26, 11, 27, 14, 30, 15, 31};
  const vi lo64 = {0, 1, 16, 17, 4, 5, 20, 21, 8, 9, 24, 25, 12, 13, 28, 29};
  const vi hi64 = {2, 3, 18, 19, 6, 7, 22, 23, 10, 11, 26, 27, 14, 15, 30, 31};
  const vi even128 = {0, 1, 2, 3, 8, 9, 10, 11, 16, 17, 18, 19, 24, 25, 26, 27};
  const vi odd128 = {4, 5, 6, 7, 12, 13, 14, 15, 20, 21, 22, 23, 28, 29, 30, 31};
  vf a[8], b[4], c[2];
  for (int i = 0; i < 8; ++i)  // each 128-bit lane: 2 partials of x[2i], 2 of x[2i+1]
    a[i] = __builtin_shuffle(x[2 * i], x[2 * i + 1], lo32) + __builtin_shuffle(x[2 * i], x[2 * i + 1], hi32);
  for (int i = 0; i < 4; ++i)  // each 128-bit lane: one partial of x[4i .. 4i+3]
    b[i] = __builtin_shuffle(a[2 * i], a[2 * i + 1], lo64) + __builtin_shuffle(a[2 * i], a[2 * i + 1], hi64);
  for (int i = 0; i < 2; ++i)
    c[i] = __builtin_shuffle(b[2 * i], b[2 * i + 1], even128) + __builtin_shuffle(b[2 * i], b[2 * i + 1], odd128);
  return __builtin_shuffle(c[0], c[1], even128) + __builtin_shuffle(c[0], c[1], odd128);
}

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

// ================================================= prefill ===========================================================
// Tiles (fp32): K, V [nb][d] (row stride d); Q^T, O^T [d][ld] (the row group starts at column 0 of the pointer);
// S [nb][RV*16] scores, then probabilities. RV = vectors of 16 query rows in the row group (1..3).

// S[j][r] = sum_k K[j][k] * Q^T[k][r]  (Q^T already holds softmax_scale * log2(e))
template <int RV>
inline void qk_tile(const float* K, const float* QT, int64_t ld, int64_t d, int nb, float* S, Prefetcher& pf) {
  for (int j0 = 0; j0 < nb; j0 += 8) {
    pf.step();
    vf acc[8][RV] = {};
    const float* k = K + j0 * d;
    for (int64_t i = 0; i < d; ++i) {
      vf q[RV];
      for (int c = 0; c < RV; ++c) q[c] = load(QT + i * ld + c * kLanes);
      for (int jj = 0; jj < 8; ++jj) {
        const float kk = k[jj * d + i];
        for (int c = 0; c < RV; ++c) acc[jj][c] += kk * q[c];
      }
    }
    for (int jj = 0; jj < 8; ++jj)
      for (int c = 0; c < RV; ++c) store(S + (j0 + jj) * RV * kLanes + c * kLanes, acc[jj][c]);
  }
}

// Online softmax over the nb keys of S, lane-wise per query row; m (running max, log2 units) and l (running sum) are
// [RV*16] arrays of the row group. Leaves 2^(S - m_new) in S and the rescale factor of the old state in alpha.
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
  for (int64_t k0 = 0; k0 < d; k0 += 8) {
    pf.step();
    vf acc[8][RV];
    for (int kk = 0; kk < 8; ++kk)
      for (int c = 0; c < RV; ++c) acc[kk][c] = load(OT + (k0 + kk) * ld + c * kLanes);
    for (int j = 0; j < nb; ++j) {
      vf p[RV];
      for (int c = 0; c < RV; ++c) p[c] = load(P + j * RV * kLanes + c * kLanes);
      const float* v = V + j * d + k0;
      for (int kk = 0; kk < 8; ++kk)
        for (int c = 0; c < RV; ++c) acc[kk][c] += v[kk] * p[c];
    }
    for (int kk = 0; kk < 8; ++kk)
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
// NV = D / 16 vectors per row. q [R][D] fp32 (scaled), R <= kMaxDecodeRows.
constexpr int kMaxDecodeRows = 8;

// Scores of up to 16 keys for the R query rows: s[r * lds + jj]. key[jj] == nullptr marks a missing key (score 0,
// the caller masks it); cos[jj] != nullptr rotates key jj (a memory key stored before RoPE).
// per_key(jj) runs once per key (the caller's prefetches, spread over the loop).
template <typename T, int NV, typename F>
inline void decode_scores16(const T* const* key, const float* const* cos, const float* const* sin, const float* q,
                            int R, float* s, int64_t lds, F&& per_key) {
  vf part[kMaxDecodeRows][16];
  for (int jj = 0; jj < 16; ++jj) {
    per_key(jj);
    if (key[jj] == nullptr) {
      for (int r = 0; r < R; ++r) part[r][jj] = vf{};
      continue;
    }
    vf k[NV];
    for (int i = 0; i < NV; ++i) k[i] = load_cvt(key[jj] + i * kLanes);
    if (cos[jj] != nullptr) {
      for (int i = 0; i < NV / 2; ++i) {
        const vf a = k[i], b = k[i + NV / 2];
        const vf c = load(cos[jj] + i * kLanes), sn = load(sin[jj] + i * kLanes);
        k[i] = a * c - b * sn;
        k[i + NV / 2] = b * c + a * sn;
      }
    }
    for (int r = 0; r < R; ++r) {
      const float* qr = q + r * NV * kLanes;
      vf a0 = load(qr) * k[0], a1 = load(qr + kLanes) * k[1];
      for (int i = 2; i < NV; i += 2) {
        a0 += load(qr + i * kLanes) * k[i];
        a1 += load(qr + (i + 1) * kLanes) * k[i + 1];
      }
      part[r][jj] = a0 + a1;
    }
  }
  for (int r = 0; r < R; ++r) store(s + r * lds, transpose_reduce16(part[r]));
}

// o[r][:] = alpha[r] * o[r][:] + sum_{j < n} p[r * ldp + j] * V_j for RC rows; dims in chunks of 4 vectors so that
// the RC x 4 accumulators stay in registers while the n value rows stream through.
template <typename T, int NV, int RC>
inline void decode_pv_rows(const T* const* val, int n, const float* p, int64_t ldp, const float* alpha, float* o) {
  static_assert(NV % 4 == 0, "head dim must be a multiple of 64");
  for (int i0 = 0; i0 < NV; i0 += 4) {
    vf acc[RC][4];
    for (int r = 0; r < RC; ++r)
      for (int i = 0; i < 4; ++i) acc[r][i] = alpha[r] * load(o + r * NV * kLanes + (i0 + i) * kLanes);
    for (int j = 0; j < n; ++j) {
      vf v[4];
      for (int i = 0; i < 4; ++i) v[i] = load_cvt(val[j] + (i0 + i) * kLanes);
      for (int r = 0; r < RC; ++r) {
        const float pr = p[r * ldp + j];
        for (int i = 0; i < 4; ++i) acc[r][i] += pr * v[i];
      }
    }
    for (int r = 0; r < RC; ++r)
      for (int i = 0; i < 4; ++i) store(o + r * NV * kLanes + (i0 + i) * kLanes, acc[r][i]);
  }
}

template <typename T, int NV>
inline void decode_pv(const T* const* val, int n, const float* p, int64_t ldp, const float* alpha, int R, float* o) {
  for (int r0 = 0; r0 < R; r0 += 4) {
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

}  // namespace mplus::attn
