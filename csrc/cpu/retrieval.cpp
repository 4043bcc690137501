// Retriever scoring + top-K on the CPU (DESIGN.md §2.3, SPEC.md §3.3, §5.2 step 3, §9 Q4/Q5/P2).
//
// score(s) = mean_t sigmoid(q_t . k_s) for queries Q [T, ds] and keys [S1, ds] (+ optional keys2 [S2, ds], whose
// indices continue after S1); returns the top min(k, S1 + S2) keys, indices ascending, with their fp32 scores.
//
// 1. Scores. The [T, S] matrix is never built. Queries are converted to fp32 and packed once into blocks of 16·NV
//    query lanes, [ds][16·NV]. Threads take units of 4·MR keys from an atomic counter (dynamic scheduling, so a
//    busy neighbour on one core does not stall the other) and convert the unit's keys to fp32 into a small local
//    buffer (any row stride). The micro-kernel holds an MR keys × 16·NV queries tile of dot products in zmm
//    registers (`vfmadd231ps`, key element broadcast from L1, query vectors streamed from L2), then applies a
//    vectorised sigmoid and adds the tile into one fp32 vector of partial sums per key and query vector. Each key's
//    sum runs over the query blocks in the same order whatever its position or thread, so the result does not
//    depend on the thread count and identical keys get bit-identical scores. Extra memory: the [S] fp32 score
//    buffer, the packed queries (T·ds fp32) and per-thread buffers of ~60 KiB.
//    bf16 inputs are widened to fp32 (exact) and use the same fp32 FMA kernel: on this Xeon `vdpbf16ps` retires at
//    about a quarter of the rate of `vfmadd231ps`, i.e. half the flops per cycle (measured: 72 vs 141 GFLOP/s per
//    core with the same tiling), so the bf16 dot-product instruction would be the slower choice.
// 2. Selection, O(S): scores are mapped to order-preserving u32 codes; a two-pass radix select (16 + 16 bits)
//    finds the K0-th largest code tau, and one ascending sweep emits every index with code > tau plus the lowest
//    indices with code == tau, so the output is already sorted by index and ties at the boundary go to the lower
//    index. No sort and no [S]-sized index array.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#if defined(__AVX512F__)
#include <immintrin.h>
// GCC 12's AVX-512 headers trip -Wuninitialized / -Wmaybe-uninitialized on their own _mm512_undefined_*()
// placeholders once inlined at -O3; the warnings are about the headers, not this file.
#pragma GCC diagnostic ignored "-Wuninitialized"
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#define MPLUS_RETRIEVAL_AVX512 1
#else
#define MPLUS_RETRIEVAL_AVX512 0
#endif

#include <algorithm>
#include <array>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <optional>
#include <tuple>
#include <utility>
#include <vector>

namespace mplus {
namespace {

using at::Tensor;

constexpr int64_t kUnitBlocks = 4;          // key blocks per work unit handed to a thread
constexpr int64_t kChunkBytes = 256 << 10;  // packed queries visited per pass over a unit (stays in L2)

// One range of keys: rows of `ds` elements, `stride` elements apart, global indices offset + [0, rows).
struct KeyRange {
  const void* data;
  int64_t rows;
  int64_t stride;
  int64_t offset;
};

// Order-preserving map float -> u32: a > b (as floats, -0 < +0, NaN above +inf or below -inf by sign)
// iff code(a) > code(b). Lets the selection compare integers only: a strict total order, no NaN surprises.
inline uint32_t order_code(float f) {
  uint32_t u;
  std::memcpy(&u, &f, sizeof(u));
  return (u & 0x80000000u) ? ~u : (u | 0x80000000u);
}

// ---------------------------------------------------------------------------------------------------------------
// Selection: indices of the top k codes, ascending, ties at the boundary to the lower index.
// ---------------------------------------------------------------------------------------------------------------
void select_topk(const float* scores, int64_t n, int64_t k, int64_t* out_idx, float* out_score) {
  if (k <= 0) return;
  if (k >= n) {
    for (int64_t s = 0; s < n; ++s) {
      out_idx[s] = s;
      out_score[s] = scores[s];
    }
    return;
  }
  // Two 16-bit digits, most significant first: find the bucket holding the k-th largest code, then within it.
  std::vector<int64_t> hist(1 << 16);
  uint32_t prefix = 0;
  int64_t remaining = k;  // how many codes >= the threshold are still to be taken in the current bucket
  for (int pass = 0; pass < 2; ++pass) {
    std::fill(hist.begin(), hist.end(), 0);
    if (pass == 0) {
      for (int64_t s = 0; s < n; ++s) ++hist[order_code(scores[s]) >> 16];
    } else {
      for (int64_t s = 0; s < n; ++s) {
        const uint32_t c = order_code(scores[s]);
        if ((c >> 16) == prefix) ++hist[c & 0xFFFFu];
      }
    }
    int64_t above = 0;
    int64_t digit = (1 << 16) - 1;
    for (; digit > 0; --digit) {
      if (above + hist[digit] >= remaining) break;
      above += hist[digit];
    }
    remaining -= above;
    prefix = pass == 0 ? static_cast<uint32_t>(digit) : ((prefix << 16) | static_cast<uint32_t>(digit));
  }
  const uint32_t tau = prefix;
  int64_t take_equal = remaining;  // codes == tau to take, lowest indices first
  int64_t j = 0;
  for (int64_t s = 0; s < n && j < k; ++s) {
    const uint32_t c = order_code(scores[s]);
    if (c > tau || (c == tau && take_equal-- > 0)) {
      out_idx[j] = s;
      out_score[j] = scores[s];
      ++j;
    }
  }
  TORCH_CHECK(j == k, "retrieve_topk: internal error, selected ", j, " of ", k);
}

#if MPLUS_RETRIEVAL_AVX512
// ---------------------------------------------------------------------------------------------------------------
// AVX-512 scoring.
// ---------------------------------------------------------------------------------------------------------------

// sigmoid(x) = 1 / (1 + 2^z), z = -x·log2(e) clamped to ±100 (beyond, sigmoid is 0 or 1 in fp32 and 2^z stays
// finite). 2^z = 2^n · 2^f with n = round(z), f in [-0.5, 0.5], 2^f by the Cephes exp2f polynomial (~2 ulp); the
// reciprocal is rcp14 refined by one Newton step. Absolute error ~1e-7.
inline __m512 sigmoid16(__m512 x) {
  __m512 z = _mm512_mul_ps(x, _mm512_set1_ps(-1.44269504088896341f));
  z = _mm512_min_ps(_mm512_max_ps(z, _mm512_set1_ps(-100.f)), _mm512_set1_ps(100.f));
  const __m512 n = _mm512_roundscale_ps(z, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const __m512 f = _mm512_sub_ps(z, n);
  __m512 p = _mm512_set1_ps(1.535336188319500e-4f);
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.339887440266574e-3f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(9.618437357674640e-3f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(5.550332471162809e-2f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(2.402264791363012e-1f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(6.931472028550421e-1f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.0f));
  const __m512 d = _mm512_add_ps(_mm512_scalef_ps(p, n), _mm512_set1_ps(1.0f));
  const __m512 r = _mm512_rcp14_ps(d);
  return _mm512_mul_ps(r, _mm512_fnmadd_ps(d, r, _mm512_set1_ps(2.0f)));
}

// sums[r·NV + v] += sigmoid(K[r] · Q[:, v-th 16 lanes]) over one query block, masked to the real queries.
// q: [ds][16·NV] packed query block; kb: MR key rows, kstride elements apart.
template <int NV, int MR>
inline void micro_tile(const float* __restrict q, const float* __restrict kb, int64_t kstride, int64_t ds,
                       float* __restrict sums, const __mmask16* lane_mask) {
  __m512 acc[MR][NV];
#pragma GCC unroll 16
  for (int r = 0; r < MR; ++r) {
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) acc[r][v] = _mm512_setzero_ps();
  }
  for (int64_t d = 0; d < ds; ++d) {
    __m512 a[NV];
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) a[v] = _mm512_loadu_ps(q + d * 16 * NV + 16 * v);
#pragma GCC unroll 16
    for (int r = 0; r < MR; ++r) {
      const __m512 b = _mm512_set1_ps(kb[r * kstride + d]);
#pragma GCC unroll 4
      for (int v = 0; v < NV; ++v) acc[r][v] = _mm512_fmadd_ps(a[v], b, acc[r][v]);
    }
  }
#pragma GCC unroll 16
  for (int r = 0; r < MR; ++r) {
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) {
      const __m512 s = _mm512_maskz_mov_ps(lane_mask[v], sigmoid16(acc[r][v]));
      float* dst = sums + (r * NV + v) * 16;
      _mm512_storeu_ps(dst, _mm512_add_ps(_mm512_loadu_ps(dst), s));
    }
  }
}

// Table of micro-tiles for 1..MR keys (the last block of a range may be short).
using TileFn = void (*)(const float*, const float*, int64_t, int64_t, float*, const __mmask16*);
template <int NV, int MR, int... I>
constexpr std::array<TileFn, sizeof...(I)> tile_table(std::integer_sequence<int, I...>) {
  return {&micro_tile<NV, I + 1>...};
}

// One row of ds elements (bf16 / fp16 / fp32) -> fp32. bf16 -> fp32 is exact (a 16-bit shift), fp16 -> fp32 too.
void row_to_float(const void* src, at::ScalarType dtype, int64_t ds, float* dst) {
  if (dtype == at::kFloat) {
    std::memcpy(dst, src, ds * sizeof(float));
    return;
  }
  const auto* s = static_cast<const uint16_t*>(src);
  int64_t i = 0;
  for (; i + 16 <= ds; i += 16) {
    const __m256i h = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(s + i));
    const __m512 f = dtype == at::kBFloat16 ? _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16))
                                            : _mm512_cvtph_ps(h);
    _mm512_storeu_ps(dst + i, f);
  }
  for (; i < ds; ++i) {
    dst[i] = dtype == at::kBFloat16 ? static_cast<float>(c10::BFloat16(s[i], c10::BFloat16::from_bits()))
                                    : static_cast<float>(c10::Half(s[i], c10::Half::from_bits()));
  }
}

// All scores, with NV vectors (16·NV queries) by MR keys per micro-tile.
template <int NV, int MR>
void score_all(const Tensor& queries, const std::vector<KeyRange>& ranges, float* scores) {
  const at::ScalarType dtype = queries.scalar_type();
  const int64_t T = queries.size(0);
  const int64_t ds = queries.size(1);
  const int64_t elem_size = static_cast<int64_t>(queries.element_size());
  constexpr int64_t kLanes = 16 * NV;
  const int64_t n_tblocks = (T + kLanes - 1) / kLanes;

  // Queries packed once, fp32 [n_tblocks][ds][16·NV]: lane l of block b is query b·16·NV + l (zero beyond T).
  Tensor packed = at::empty({n_tblocks * ds * kLanes}, queries.options().dtype(at::kFloat));
  float* qp = packed.data_ptr<float>();
  const char* q_base = static_cast<const char*>(queries.data_ptr());
  at::parallel_for(0, n_tblocks, 1, [&](int64_t b0, int64_t b1) {
    std::vector<float> row(static_cast<size_t>(ds));
    for (int64_t b = b0; b < b1; ++b) {
      float* blk = qp + b * ds * kLanes;
      for (int64_t l = 0; l < kLanes; ++l) {
        const int64_t t = b * kLanes + l;
        if (t < T) {
          row_to_float(q_base + t * queries.stride(0) * elem_size, dtype, ds, row.data());
        } else {
          std::fill(row.begin(), row.end(), 0.f);
        }
        for (int64_t d = 0; d < ds; ++d) blk[d * kLanes + l] = row[d];
      }
    }
  });
  // Lanes of padded queries (beyond T, last block only) are masked out of the sums.
  __mmask16 full_mask[NV], last_mask[NV];
  for (int v = 0; v < NV; ++v) {
    full_mask[v] = 0xFFFF;
    const int64_t real = std::clamp<int64_t>(T - (n_tblocks - 1) * kLanes - 16 * v, 0, 16);
    last_mask[v] = static_cast<__mmask16>((uint32_t{1} << real) - 1);
  }
  // ds = 0 is allowed (every q·k = 0, score 0.5): guard the division.
  const int64_t chunk_tblocks = std::max<int64_t>(1, kChunkBytes / std::max<int64_t>(1, ds * kLanes * 4));

  constexpr int64_t kUnitKeys = kUnitBlocks * MR;
  std::vector<int64_t> unit_start(ranges.size() + 1, 0);
  for (size_t r = 0; r < ranges.size(); ++r) {
    unit_start[r + 1] = unit_start[r] + (ranges[r].rows + kUnitKeys - 1) / kUnitKeys;
  }
  const int64_t n_units = unit_start.back();
  static constexpr auto tiles = tile_table<NV, MR>(std::make_integer_sequence<int, MR>{});
  const float t_count = static_cast<float>(T);

  std::atomic<int64_t> next_unit{0};
  const int64_t n_workers = std::min<int64_t>(at::get_num_threads(), std::max<int64_t>(n_units, 1));
  at::parallel_for(0, n_workers, 1, [&](int64_t, int64_t) {
    std::vector<float> keybuf(static_cast<size_t>(kUnitKeys * ds));
    std::vector<float> sums(static_cast<size_t>(kUnitKeys * kLanes));
    for (int64_t u = next_unit.fetch_add(1); u < n_units; u = next_unit.fetch_add(1)) {
      const size_t r = std::upper_bound(unit_start.begin(), unit_start.end(), u) - unit_start.begin() - 1;
      const KeyRange& range = ranges[r];
      const int64_t first = (u - unit_start[r]) * kUnitKeys;
      const int64_t count = std::min(kUnitKeys, range.rows - first);
      const char* k_base = static_cast<const char*>(range.data);
      for (int64_t i = 0; i < count; ++i) {
        row_to_float(k_base + (first + i) * range.stride * elem_size, dtype, ds, keybuf.data() + i * ds);
      }
      std::fill(sums.begin(), sums.end(), 0.f);
      // Query chunks outermost so a chunk (~256 KiB) stays in L2 while every key block of the unit visits it.
      for (int64_t c0 = 0; c0 < n_tblocks; c0 += chunk_tblocks) {
        const int64_t c1 = std::min(n_tblocks, c0 + chunk_tblocks);
        for (int64_t k0 = 0; k0 < count; k0 += MR) {
          const TileFn tile = tiles[std::min<int64_t>(MR, count - k0) - 1];
          for (int64_t b = c0; b < c1; ++b) {
            tile(qp + b * ds * kLanes, keybuf.data() + k0 * ds, ds, ds, sums.data() + k0 * kLanes,
                 b == n_tblocks - 1 ? last_mask : full_mask);
          }
        }
      }
      float* out = scores + range.offset + first;
      for (int64_t i = 0; i < count; ++i) {
        // The 16·NV lane sums of a key, left to right: the same order for every key.
        const float* lanes = sums.data() + i * kLanes;
        float total = 0.f;
        for (int64_t l = 0; l < kLanes; ++l) total += lanes[l];
        out[i] = total / t_count;
      }
    }
  });
}

void score_keys(const Tensor& queries, const std::vector<KeyRange>& ranges, float* scores) {
  // Micro-tile: MR keys × 16·NV queries. MR·NV accumulators + NV query vectors + 1 broadcast fit the 32 zmm
  // registers. One vector of query lanes when T is small (less padding), two otherwise.
  if (queries.size(0) <= 16) {
    score_all<1, 24>(queries, ranges, scores);
  } else {
    score_all<2, 14>(queries, ranges, scores);
  }
}

#else  // portable fallback (no AVX-512 BF16 at build time): same results up to rounding, much slower.

template <class T>
float load_elem(const void* base, int64_t i) {
  return static_cast<float>(static_cast<const T*>(base)[i]);
}

void score_keys(const Tensor& queries, const std::vector<KeyRange>& ranges, float* scores) {
  const int64_t T = queries.size(0), ds = queries.size(1);
  const Tensor qf = queries.to(at::kFloat).contiguous();
  const float* q = qf.data_ptr<float>();
  const at::ScalarType dtype = queries.scalar_type();
  for (const KeyRange& range : ranges) {
    at::parallel_for(0, range.rows, 64, [&](int64_t s0, int64_t s1) {
      std::vector<float> key(static_cast<size_t>(ds));
      for (int64_t s = s0; s < s1; ++s) {
        for (int64_t d = 0; d < ds; ++d) {
          const int64_t i = s * range.stride + d;
          key[d] = dtype == at::kFloat      ? load_elem<float>(range.data, i)
                   : dtype == at::kBFloat16 ? load_elem<c10::BFloat16>(range.data, i)
                                            : load_elem<c10::Half>(range.data, i);
        }
        float sum = 0.f;
        for (int64_t t = 0; t < T; ++t) {
          float dot = 0.f;
          for (int64_t d = 0; d < ds; ++d) dot += q[t * ds + d] * key[d];
          sum += 1.f / (1.f + std::exp(-dot));
        }
        scores[range.offset + s] = sum / static_cast<float>(T);
      }
    });
  }
}
#endif

// What the kernel assumes of a key range: a CPU [S, ds] matrix of the queries' dtype (rows are read as ds elements
// of that dtype, `stride(0)` apart; a non-unit stride along ds is copied below). It has no index inputs.
void check_keys(const char* name, const Tensor& keys, const Tensor& queries) {
  TORCH_CHECK(keys.device().is_cpu(), "retrieve_topk: ", name, " must be a CPU tensor, got ", keys.device());
  TORCH_CHECK(keys.dim() == 2 && keys.size(1) == queries.size(1), "retrieve_topk: ", name, " must be [S, ds=",
              queries.size(1), "] like queries ", queries.sizes(), ", got ", keys.sizes());
  TORCH_CHECK(keys.scalar_type() == queries.scalar_type(), "retrieve_topk: ", name, " has dtype ",
              keys.scalar_type(), ", queries have ", queries.scalar_type(), "; they must match");
}

std::tuple<Tensor, Tensor> retrieve_topk_cpu(const Tensor& queries, const Tensor& keys,
                                             const std::optional<Tensor>& keys2, int64_t k) {
  TORCH_CHECK(queries.device().is_cpu(), "retrieve_topk: queries must be a CPU tensor, got ", queries.device());
  TORCH_CHECK(queries.dim() == 2 && queries.size(0) >= 1, "retrieve_topk: queries must be [T >= 1, ds], got ",
              queries.sizes());
  const at::ScalarType dtype = queries.scalar_type();
  TORCH_CHECK(dtype == at::kBFloat16 || dtype == at::kHalf || dtype == at::kFloat,
              "retrieve_topk: queries must be bfloat16, float16 or float32, got ", dtype);
  TORCH_CHECK(k >= 0, "retrieve_topk: k must be >= 0, got ", k);
  check_keys("keys", keys, queries);
  if (keys2.has_value()) check_keys("keys2", *keys2, queries);

  // Rows must be dense (unit stride along ds); any row stride is fine.
  const Tensor q = queries.stride(1) == 1 || queries.size(1) <= 1 ? queries : queries.contiguous();
  const Tensor k1 = keys.stride(1) == 1 || keys.size(1) <= 1 ? keys : keys.contiguous();
  Tensor k2;
  if (keys2.has_value()) k2 = keys2->stride(1) == 1 || keys2->size(1) <= 1 ? *keys2 : keys2->contiguous();
  const int64_t s1 = k1.size(0);
  const int64_t s2 = k2.defined() ? k2.size(0) : 0;
  const int64_t total = s1 + s2;
  const int64_t k0 = std::min(k, total);

  const auto f32 = queries.options().dtype(at::kFloat);
  Tensor indices = at::empty({k0}, queries.options().dtype(at::kLong));
  Tensor top_scores = at::empty({k0}, f32);
  if (k0 == 0) return {indices, top_scores};

  std::vector<KeyRange> ranges;
  if (s1 > 0) ranges.push_back({k1.data_ptr(), s1, k1.stride(0), 0});
  if (s2 > 0) ranges.push_back({k2.data_ptr(), s2, k2.stride(0), s1});
  Tensor scores = at::empty({total}, f32);
  score_keys(q, ranges, scores.data_ptr<float>());
  select_topk(scores.data_ptr<float>(), total, k0, indices.data_ptr<int64_t>(), top_scores.data_ptr<float>());
  return {indices, top_scores};
}

}  // namespace

TORCH_LIBRARY_IMPL(mplus, CPU, m) { m.impl("retrieve_topk", &retrieve_topk_cpu); }

}  // namespace mplus
