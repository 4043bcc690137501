// Retriever scores for training on the CPU, ISA-generic (csrc/cpu/retriever_scores.cpp checks the arguments and builds
// the Problem; the files in isa/ compile this once per ISA level inside namespace mplus::<level>, see isa.h).
//
// w[l, n] = (1/T) sum_t s(q_t . k_n), s = sigmoid, and its backward with s' = s(1 - s):
//   dq_t = (1/T) sum_n g_n s'(q_t . k_n) k_n,   dk_n = (g_n/T) sum_t s'(q_t . k_n) q_t.
// All in fp32 (bf16 / fp16 inputs are widened exactly; at the avx512_bf16 level the dot products of bf16 inputs run
// on vdpbf16ps instead: exact products, fp32 sums, see Bf16Dots), and the [L, T, N] matrix never exists: every task
// recomputes the dot products of its tile. Three kinds of task, each writing outputs no other task writes (no atomics):
//  * forward, one task per (layer, block of kBlock keys): the block is packed transposed, [ds][kBlock], and every
//    query meets it in a register tile of kDotMR queries x kBlock keys (`dot_tile`); the sigmoids are summed per key
//    in ascending query order.
//  * pass (a), dk, one task per (layer, key block): the queries are visited in chunks of kChunk rows; a chunk's
//    s'(q_t . k_n) go to a small buffer D [kChunk][kBlock] (`dot_tile` again), then dk_block += D^T . Q_chunk
//    (`product_tile`, kProdMR keys x kProdNV vectors along ds); g_n / T scales each key's row at the end.
//  * pass (b), dq, one task per (layer, block of kBlock queries): the transpose of pass (a): the queries are packed,
//    the keys visited in chunks, D^T [kChunk][kBlock] holds g_n s'(q_t . k_n), dq_block += D . K_chunk, 1/T at the end.
// Every sum runs in an order fixed by the shapes alone (queries or keys ascending), so the results do not depend on
// the thread count or the scheduling: two runs give the same bits (at a given ISA level). Both passes recompute the
// dot products, so the backward costs four [T, N, ds] products where a materialised one costs three; in exchange its
// extra memory is the fp32 copies of the inputs (none for fp32 inputs whose ds is a multiple of the vector width)
// and a few tens of KiB per thread.
//
// Library headers come from prelude.h (included before the ISA region); this file includes only kernel sources.

namespace mplus {
namespace MPLUS_ISA {
namespace {

using ::mplus::rsc::Input;
using ::mplus::rsc::Problem;
#include "vec.h"
#if MPLUS_ISA_LEVEL == 3
#include "bf16_pairs.h"
#endif

// Tile shapes of the level. dot_tile: kDotMR rows x kDotNV vectors of accumulators, + kDotNV loaded vectors + one
// broadcast (+ one product on the baseline, which has no FMA): the retrieval kernel's measured shapes
// (retrieval_impl.h). product_tile: kProdMR rows x kProdNV vectors, + kProdNV loaded vectors + one broadcast (+ one
// product). At L 2, T 512, N 2048, ds 256 fp32 on a 2-core AVX-512 Xeon (measured fp32 peak ~407 GFLOP/s): forward
// 375 GFLOP/s, backward 367 (of its four products), torch's fp32 bmm of the same Q.K^T 416; AVX2 231 / 211,
// baseline 71 / 70.
#if MPLUS_ISA_LEVEL >= 2
constexpr int kDotMR = 14, kProdMR = 8, kProdNV = 2;  // 28 + 2 + 1, 16 + 2 + 1 of 32 zmm
#elif MPLUS_ISA_LEVEL == 1
constexpr int kDotMR = 6, kProdMR = 4, kProdNV = 3;  // 12 + 2 + 1, 12 + 3 + 1 of 16 ymm
#else
constexpr int kDotMR = 6, kProdMR = 4, kProdNV = 2;  // 12 + 2 + 1 + 1, 8 + 2 + 1 + 1 of 16 xmm
#endif
constexpr int kDotNV = 2;
constexpr int64_t kBlock = kDotNV * kLanes;  // keys per forward / pass-(a) task, queries per pass-(b) task
constexpr int64_t kChunk = 8 * kDotMR;       // rows of D per product step (D: 14-28 KiB, in L1 / L2)
static_assert(kDotMR * kDotNV + kDotNV + 1 + (MPLUS_ISA_LEVEL == 0) <= kVectorRegisters &&
                  kProdMR * kProdNV + kProdNV + 1 + (MPLUS_ISA_LEVEL == 0) <= kVectorRegisters,
              "a micro-tile must fit the register file");
static_assert(kBlock % kProdMR == 0, "product tiles must cover a block exactly");

// e = exp(-x) = 2^z, z = -x log2(e) clamped to [-100, 100] (beyond, s is 0 or 1 in fp32 and 2^z stays normal), by
// vec.h's exp2_in_range (~2 ulp). NaN stays NaN.
inline vf exp_neg(vf x) {
  vf z = x * -1.44269504088896341f;
  return exp2_in_range(min_x86(splat(100.f), max_x86(splat(-100.f), z)));
}
inline vf sigmoid(vf x) { return 1.f / (exp_neg(x) + 1.f); }
// s'(x) = s(x) s(-x) = e / (1 + e)^2, computed as (e s) s: accurate in both tails (1 - s would cancel for x >> 0).
inline vf sigmoid_grad(vf x) {
  const vf e = exp_neg(x);
  const vf s = 1.f / (e + 1.f);
  return (e * s) * s;
}

// f(Count<n>{}) for a run-time n in [1, MAX]: one instantiation per tile size (tails of rows or vectors).
template <int N>
struct Count {
  static constexpr int value = N;
};
template <int MAX, typename F>
inline void with_count(int64_t n, const F& f) {
  if constexpr (MAX > 1) {
    if (n < MAX) {
      with_count<MAX - 1>(n, f);
      return;
    }
  }
  f(Count<MAX>{});
}

// acc[r][v] = sum_{d < ds} a[r * lda + d] * b[d * kBlock + v * kLanes .. + kLanes): MR rows of a row-major fp32
// matrix (lda floats apart) against a packed block [ds][kBlock]; then epi(acc). d ascending for every element.
template <int MR, typename Epi>
inline void dot_tile(const float* __restrict a, int64_t lda, const float* __restrict b, int64_t ds, const Epi& epi) {
  vf acc[MR][kDotNV];
#pragma GCC unroll 16
  for (int r = 0; r < MR; ++r) {
#pragma GCC unroll 4
    for (int v = 0; v < kDotNV; ++v) acc[r][v] = vf{};
  }
  for (int64_t d = 0; d < ds; ++d) {
    vf bv[kDotNV];
#pragma GCC unroll 4
    for (int v = 0; v < kDotNV; ++v) bv[v] = load(b + d * kBlock + v * kLanes);
#pragma GCC unroll 16
    for (int r = 0; r < MR; ++r) {
      const float x = a[r * lda + d];  // vector * scalar: a broadcast GCC can fold into the FMA
#pragma GCC unroll 4
      for (int v = 0; v < kDotNV; ++v) acc[r][v] += bv[v] * x;
    }
  }
  epi(acc);
}

#if MPLUS_ISA_LEVEL == 3
// dot_tile for bf16 operands on vdpbf16ps (bf16_pairs.h): a holds MR rows of `depth` pairs (lda elements apart), b a
// packed block [depth][kBlock] of pairs.
template <int MR, typename Epi>
inline void dot_tile_bf16(const float* __restrict a, int64_t lda, const float* __restrict b, int64_t depth,
                          const Epi& epi) {
  vf acc[MR][kDotNV];
  dot_pairs<MR, kDotNV>(b, kBlock, a, lda, depth, acc);
  epi(acc);
}
#endif

// c[r * ldc + v * kLanes ..] += sum_{k < K} a[k * AK + r] * b[k * ldb + v * kLanes ..] for r < kProdMR, v < NV: a
// register tile of C (kProdMR rows of NV vectors) over K rank-1 updates, a read from a buffer whose rows are AK floats
// apart (D or D^T), b from row-major fp32 rows (Q or K, ldb floats apart). k ascending for every element.
template <int NV, int64_t AK>
inline void product_tile(const float* __restrict a, const float* __restrict b, int64_t ldb, int64_t K,
                         float* __restrict c, int64_t ldc) {
  vf acc[kProdMR][NV];
#pragma GCC unroll 8
  for (int r = 0; r < kProdMR; ++r) {
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) acc[r][v] = load(c + r * ldc + v * kLanes);
  }
  for (int64_t k = 0; k < K; ++k) {
    vf bv[NV];
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) bv[v] = load(b + k * ldb + v * kLanes);
#pragma GCC unroll 8
    for (int r = 0; r < kProdMR; ++r) {
      const float x = a[k * AK + r];
#pragma GCC unroll 4
      for (int v = 0; v < NV; ++v) acc[r][v] += bv[v] * x;
    }
  }
#pragma GCC unroll 8
  for (int r = 0; r < kProdMR; ++r) {
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) store(c + r * ldc + v * kLanes, acc[r][v]);
  }
}

// ---------------------------------------------------------------------------------------------------------------
// Operands: fp32 rows, packed blocks, outputs
// ---------------------------------------------------------------------------------------------------------------
int64_t element_size(c10::ScalarType dtype) { return dtype == c10::ScalarType::Float ? 4 : 2; }

const void* input_row(const Input& in, c10::ScalarType dtype, int64_t l, int64_t r) {
  return static_cast<const char*>(in.data) + (l * in.layer + r * in.row) * element_size(dtype);
}

// n fp32 values -> `dtype` at element `index` of `base` (round to nearest even).
void store_out(void* base, c10::ScalarType dtype, int64_t index, const float* src, int64_t n) {
  if (dtype == c10::ScalarType::Float) {
    store_row(static_cast<float*>(base) + index, src, n);
  } else if (dtype == c10::ScalarType::BFloat16) {
    store_row(static_cast<c10::BFloat16*>(base) + index, src, n);
  } else {
    store_row(static_cast<c10::Half*>(base) + index, src, n);
  }
}

// An [L, rows, ds] input as fp32 rows: the input itself when it is fp32 (and, when `whole_vectors`, ds is a multiple
// of kLanes, so rows can be read a vector at a time), else a copy [L, rows, dsp] zero-padded to dsp = ds rounded up
// to kLanes, made in parallel.
struct Rows32 {
  const float* data = nullptr;
  int64_t layer = 0, row = 0;
  std::unique_ptr<Scratch> copy;
  const float* at(int64_t l, int64_t r) const { return data + l * layer + r * row; }
};

Rows32 as_fp32(const Input& in, c10::ScalarType dtype, int64_t L, int64_t rows, int64_t ds, bool whole_vectors) {
  Rows32 out;
  if (dtype == c10::ScalarType::Float && (!whole_vectors || ds % kLanes == 0)) {
    out.data = static_cast<const float*>(in.data);
    out.layer = in.layer;
    out.row = in.row;
    return out;
  }
  const int64_t dsp = (ds + kLanes - 1) / kLanes * kLanes;
  out.copy = std::make_unique<Scratch>(L * rows * dsp);
  float* dst = out.copy->p;
  at::parallel_for(0, L * rows, 64, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      float* y = dst + i * dsp;
      row_to_float(input_row(in, dtype, i / rows, i % rows), dtype, ds, y);
      std::fill(y + ds, y + dsp, 0.f);
    }
  });
  out.data = dst;
  out.layer = rows * dsp;
  out.row = dsp;
  return out;
}

// The operands of the dot products: `depth` 32-bit elements per row. Fp32Dots: fp32 values (every dtype, every
// level; bf16 and fp16 widened exactly). Bf16Dots (avx512_bf16 level, bf16 inputs): pairs of bf16 as they are, the
// last one zero-padded for an odd ds; vdpbf16ps does twice the flops of the fp32 FMAs on a Zen 4 core (retrieval.cpp
// has the measurements, and why the amx level keeps the FMAs).
struct Fp32Dots {
  static int64_t depth(int64_t ds) { return ds; }
  static void row(const void* src, c10::ScalarType dtype, int64_t ds, float* dst) { row_to_float(src, dtype, ds, dst); }
  // The [L, n, ds] input as rows of Ops's elements (the input itself where it can be read as it is).
  static Rows32 rows(const Input& in, c10::ScalarType dtype, int64_t L, int64_t n, int64_t ds) {
    return as_fp32(in, dtype, L, n, ds, /*whole_vectors=*/false);
  }
  template <int MR, typename Epi>
  static void tile(const float* a, int64_t lda, const float* b, int64_t depth, const Epi& epi) {
    dot_tile<MR>(a, lda, b, depth, epi);
  }
};

#if MPLUS_ISA_LEVEL == 3
struct Bf16Dots {
  static int64_t depth(int64_t ds) { return pairs_depth(ds); }
  static void row(const void* src, c10::ScalarType, int64_t ds, float* dst) { copy_pairs(src, ds, dst); }
  // A copy of the input as rows of pairs, [L, n, depth], made in parallel.
  static Rows32 rows(const Input& in, c10::ScalarType dtype, int64_t L, int64_t n, int64_t ds) {
    Rows32 out;
    const int64_t depth = pairs_depth(ds);
    out.copy = std::make_unique<Scratch>(L * n * depth);
    float* dst = out.copy->p;
    at::parallel_for(0, L * n, 64, [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i) row(input_row(in, dtype, i / n, i % n), dtype, ds, dst + i * depth);
    });
    out.data = dst;
    out.layer = n * depth;
    out.row = depth;
    return out;
  }
  template <int MR, typename Epi>
  static void tile(const float* a, int64_t lda, const float* b, int64_t depth, const Epi& epi) {
    dot_tile_bf16<MR>(a, lda, b, depth, epi);
  }
};
#endif

// The rows the dot products of a backward pass read: its fp32 rows `f32` themselves (a view), or Ops's own copy.
template <typename Ops>
Rows32 dot_rows(const Input& in, c10::ScalarType dtype, int64_t L, int64_t n, int64_t ds, const Rows32& f32) {
  if constexpr (std::is_same_v<Ops, Fp32Dots>) {
    return Rows32{f32.data, f32.layer, f32.row, nullptr};
  } else {
    return Ops::rows(in, dtype, L, n, ds);
  }
}

// dst [depth][kBlock]: dst[d * kBlock + j] = row (first + j) of layer l of `in` as Ops's elements, for j < count; 0
// for j >= count. `tmp`: ds floats.
template <typename Ops>
void pack_block(const Input& in, c10::ScalarType dtype, int64_t l, int64_t first, int64_t count, int64_t ds,
                float* dst, float* tmp) {
  const int64_t depth = Ops::depth(ds);
  for (int64_t j = 0; j < count; ++j) {
    Ops::row(input_row(in, dtype, l, first + j), dtype, ds, tmp);
    for (int64_t d = 0; d < depth; ++d) dst[d * kBlock + j] = tmp[d];
  }
  for (int64_t d = 0; d < depth; ++d) std::fill(dst + d * kBlock + count, dst + (d + 1) * kBlock, 0.f);
}

// acc[0 .. rows) x [0, nvec) vectors += A . B over K rows of B, as product tiles: `a` (AK floats per k) holds the
// tiles' rows contiguously, B rows are ldb floats apart, acc rows ldc floats apart.
template <int64_t AK>
void product(const float* a, int64_t rows, const float* b, int64_t ldb, int64_t K, int64_t nvec, float* acc,
             int64_t ldc) {
  for (int64_t r0 = 0; r0 < rows; r0 += kProdMR) {
    for (int64_t v0 = 0; v0 < nvec; v0 += kProdNV) {
      with_count<kProdNV>(std::min<int64_t>(kProdNV, nvec - v0), [&](auto nv) {
        product_tile<decltype(nv)::value, AK>(a + r0, b + v0 * kLanes, ldb, K, acc + r0 * ldc + v0 * kLanes, ldc);
      });
    }
  }
}

// ---------------------------------------------------------------------------------------------------------------
// The three kinds of task
// ---------------------------------------------------------------------------------------------------------------
template <typename Ops>
void forward(const Problem& P) {
  const int64_t T = P.T, N = P.N, ds = P.ds, depth = Ops::depth(ds);
  const Rows32 q = Ops::rows(P.q, P.dtype, P.L, T, ds);
  const int64_t blocks = (N + kBlock - 1) / kBlock;
  const float t_count = static_cast<float>(T);
  at::parallel_for(0, P.L * blocks, 1, [&](int64_t begin, int64_t end) {
    Scratch kt(depth * kBlock), tmp(ds);
    alignas(64) float sums[kBlock];
    for (int64_t task = begin; task < end; ++task) {
      const int64_t l = task / blocks, n0 = task % blocks * kBlock, count = std::min(kBlock, N - n0);
      pack_block<Ops>(P.k, P.dtype, l, n0, count, ds, kt.p, tmp.p);
      vf sum[kDotNV] = {};
      for (int64_t t0 = 0; t0 < T; t0 += kDotMR) {
        with_count<kDotMR>(std::min<int64_t>(kDotMR, T - t0), [&](auto mr) {
          constexpr int MR = decltype(mr)::value;
          Ops::template tile<MR>(q.at(l, t0), q.row, kt.p, depth, [&](const vf (&acc)[MR][kDotNV]) {
#pragma GCC unroll 16
            for (int r = 0; r < MR; ++r) {
#pragma GCC unroll 4
              for (int v = 0; v < kDotNV; ++v) sum[v] += sigmoid(acc[r][v]);
            }
          });
        });
      }
      for (int v = 0; v < kDotNV; ++v) store(sums + v * kLanes, sum[v]);
      float* w = P.w + l * N + n0;
      for (int64_t j = 0; j < count; ++j) w[j] = sums[j] / t_count;
    }
  });
}

// Pass (a): dk, per (layer, block of kBlock keys).
template <typename Ops>
void key_grads(const Problem& P) {
  const int64_t T = P.T, N = P.N, ds = P.ds, depth = Ops::depth(ds);
  const int64_t nvec = (ds + kLanes - 1) / kLanes, dsp = nvec * kLanes;
  const Rows32 q = as_fp32(P.q, P.dtype, P.L, T, ds, /*whole_vectors=*/true);
  const Rows32 qd = dot_rows<Ops>(P.q, P.dtype, P.L, T, ds, q);
  const int64_t blocks = (N + kBlock - 1) / kBlock;
  const float t_count = static_cast<float>(T);
  at::parallel_for(0, P.L * blocks, 1, [&](int64_t begin, int64_t end) {
    Scratch kt(depth * kBlock), tmp(dsp), dbuf(kChunk * kBlock), acc(kBlock * dsp);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t l = task / blocks, n0 = task % blocks * kBlock, count = std::min(kBlock, N - n0);
      const int64_t rows = (count + kProdMR - 1) / kProdMR * kProdMR;  // product rows: the real keys, whole tiles
      pack_block<Ops>(P.k, P.dtype, l, n0, count, ds, kt.p, tmp.p);
      std::fill(acc.p, acc.p + kBlock * dsp, 0.f);
      for (int64_t t0 = 0; t0 < T; t0 += kChunk) {
        const int64_t tc = std::min(kChunk, T - t0);
        // D[t][n] = s'(q_t . k_n) for the chunk's queries (lanes past the block's keys: never read back)
        for (int64_t r0 = 0; r0 < tc; r0 += kDotMR) {
          with_count<kDotMR>(std::min<int64_t>(kDotMR, tc - r0), [&](auto mr) {
            constexpr int MR = decltype(mr)::value;
            Ops::template tile<MR>(qd.at(l, t0 + r0), qd.row, kt.p, depth, [&](const vf (&a)[MR][kDotNV]) {
#pragma GCC unroll 16
              for (int r = 0; r < MR; ++r) {
#pragma GCC unroll 4
                for (int v = 0; v < kDotNV; ++v) store(dbuf.p + (r0 + r) * kBlock + v * kLanes, sigmoid_grad(a[r][v]));
              }
            });
          });
        }
        // dk_block[n] += sum_t D[t][n] q_t
        product<kBlock>(dbuf.p, rows, q.at(l, t0), q.row, tc, nvec, acc.p, dsp);
      }
      for (int64_t j = 0; j < count; ++j) {
        const float scale = P.grad[l * N + n0 + j] / t_count;
        const float* src = acc.p + j * dsp;
        for (int64_t d = 0; d < ds; ++d) tmp.p[d] = src[d] * scale;
        store_out(P.dk, P.dtype, (l * N + n0 + j) * ds, tmp.p, ds);
      }
    }
  });
}

// Pass (b): dq, per (layer, block of kBlock queries).
template <typename Ops>
void query_grads(const Problem& P) {
  const int64_t T = P.T, N = P.N, ds = P.ds, depth = Ops::depth(ds);
  const int64_t nvec = (ds + kLanes - 1) / kLanes, dsp = nvec * kLanes;
  const Rows32 k = as_fp32(P.k, P.dtype, P.L, N, ds, /*whole_vectors=*/true);
  const Rows32 kd = dot_rows<Ops>(P.k, P.dtype, P.L, N, ds, k);
  const int64_t blocks = (T + kBlock - 1) / kBlock;
  const float t_count = static_cast<float>(T);
  at::parallel_for(0, P.L * blocks, 1, [&](int64_t begin, int64_t end) {
    Scratch qt(depth * kBlock), tmp(dsp), dbuf(kChunk * kBlock), acc(kBlock * dsp);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t l = task / blocks, t0 = task % blocks * kBlock, count = std::min(kBlock, T - t0);
      const int64_t rows = (count + kProdMR - 1) / kProdMR * kProdMR;
      pack_block<Ops>(P.q, P.dtype, l, t0, count, ds, qt.p, tmp.p);
      std::fill(acc.p, acc.p + kBlock * dsp, 0.f);
      const float* g = P.grad + l * N;
      for (int64_t n0 = 0; n0 < N; n0 += kChunk) {
        const int64_t nc = std::min(kChunk, N - n0);
        // D^T[n][t] = g_n s'(k_n . q_t) for the chunk's keys (lanes past the block's queries: never read back)
        for (int64_t r0 = 0; r0 < nc; r0 += kDotMR) {
          with_count<kDotMR>(std::min<int64_t>(kDotMR, nc - r0), [&](auto mr) {
            constexpr int MR = decltype(mr)::value;
            Ops::template tile<MR>(kd.at(l, n0 + r0), kd.row, qt.p, depth, [&](const vf (&a)[MR][kDotNV]) {
#pragma GCC unroll 16
              for (int r = 0; r < MR; ++r) {
                const vf gn = splat(g[n0 + r0 + r]);
#pragma GCC unroll 4
                for (int v = 0; v < kDotNV; ++v) {
                  store(dbuf.p + (r0 + r) * kBlock + v * kLanes, sigmoid_grad(a[r][v]) * gn);
                }
              }
            });
          });
        }
        // dq_block[t] += sum_n D^T[n][t] k_n
        product<kBlock>(dbuf.p, rows, k.at(l, n0), k.row, nc, nvec, acc.p, dsp);
      }
      for (int64_t i = 0; i < count; ++i) {
        const float* src = acc.p + i * dsp;
        for (int64_t d = 0; d < ds; ++d) tmp.p[d] = src[d] / t_count;
        store_out(P.dq, P.dtype, (l * T + t0 + i) * ds, tmp.p, ds);
      }
    }
  });
}

}  // namespace

// bf16 inputs take the vdpbf16ps dot products at the avx512_bf16 level (Bf16Dots), every other case the fp32 ones.
void retriever_scores_forward(const Problem& P) {
#if MPLUS_ISA_LEVEL == 3
  if (P.dtype == c10::ScalarType::BFloat16) return forward<Bf16Dots>(P);
#endif
  forward<Fp32Dots>(P);
}

void retriever_scores_backward(const Problem& P) {
#if MPLUS_ISA_LEVEL == 3
  if (P.dtype == c10::ScalarType::BFloat16) {
    key_grads<Bf16Dots>(P);
    query_grads<Bf16Dots>(P);
    return;
  }
#endif
  key_grads<Fp32Dots>(P);
  query_grads<Fp32Dots>(P);
}

}  // namespace MPLUS_ISA
}  // namespace mplus
