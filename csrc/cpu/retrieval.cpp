// Retriever scoring + top-K on the CPU (DESIGN.md §2.3, SPEC.md §3.3, §5.2 step 3, §9 Q4/Q5/P2): the op's argument
// checks, the scoring by the kernels of the active ISA level (retrieval_impl.h, isa.h) and the selection.
//
// score(s) = mean_t sigmoid(q_t . k_s) for queries Q [T, ds] and keys [S1, ds] (+ optional keys2 [S2, ds], whose
// indices continue after S1); returns the top min(k, S1 + S2) keys, indices ascending, with their fp32 scores.
//
// 1. Scores (retrieval_impl.h). The [T, S] matrix is never built: queries are packed once into fp32 blocks of query
//    lanes, and a register-tiled micro-kernel (MR keys x NV query vectors, sized per ISA level to its register file)
//    computes dot products with fp32 FMAs, a vectorised sigmoid and per-key lane sums in a fixed order, so the result
//    does not depend on the thread count and identical keys get bit-identical scores. Extra memory: the [S] fp32
//    score buffer, the packed queries (T·ds fp32) and per-thread buffers of a few tens of KiB.
//    bf16 inputs: at the avx512_bf16 level, the micro-kernel multiplies bf16 pairs with `vdpbf16ps` (the queries
//    packed as pairs of dims per 32-bit lane, the keys used as they are, fp32 sums): on a Zen 4 core the instruction
//    does twice the flops of `vfmadd231ps` (measured at T 2048, S 153,600, ds 256, 2 threads: 384 vs 206 GFLOP/s,
//    the same top-K, scores within 1.2e-7). On the AVX-512 + AMX Xeon this was first tuned on it retired at a quarter
//    of the FMA's rate, half the flops (72 vs 141 GFLOP/s per core with the same tiling), so the amx level (Intel's
//    cores) widens bf16 to fp32 (exact) and runs the fp32 FMA kernel, as every level below avx512_bf16 does.
//    Tile shapes per level (retrieval_impl.h has the measurements): AVX-512 NV 1 x MR 24 for T <= 16 and
//    NV 2 x MR 14 otherwise (of 32 zmm); AVX2 and the SSE2 baseline (16 registers) NV 1 x MR 12 for T <= one vector,
//    NV 2 x MR 6 otherwise.
// 2. Selection, O(S): scores are mapped to order-preserving u32 codes; a two-pass radix select (16 + 16 bits)
//    finds the K0-th largest code tau, and one ascending sweep emits every index with code > tau plus the lowest
//    indices with code == tau, so the output is already sorted by index and ties at the boundary go to the lower
//    index. No sort and no [S]-sized index array.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <optional>
#include <tuple>
#include <vector>

#include "isa.h"
#include "retrieval_problem.h"

namespace mplus {

#define MPLUS_DECLARE_RETRIEVAL(level)           \
  namespace level {                              \
  void retrieval_scores(const retr::Problem& P); \
  }
MPLUS_DECLARE_RETRIEVAL(baseline)
MPLUS_DECLARE_RETRIEVAL(avx2)
MPLUS_DECLARE_RETRIEVAL(avx512)
MPLUS_DECLARE_RETRIEVAL(avx512_bf16)
#undef MPLUS_DECLARE_RETRIEVAL

namespace {

using at::Tensor;

const IsaTable<void (*)(const retr::Problem&)> kRetrieval = MPLUS_ISA_TABLE_BF16(retrieval_scores);

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

// What the kernel assumes of a key range: a CPU [S, ds] matrix of the queries' dtype (rows are read as ds elements
// of that dtype, `stride(0)` apart; a non-unit stride along ds is copied below). It has no index inputs.
void check_keys(const char* name, const Tensor& keys, const Tensor& queries) {
  TORCH_CHECK_TYPE(keys.defined(), "retrieve_topk: ", name, " must be a tensor, got None");
  TORCH_CHECK_VALUE(keys.device().is_cpu(), "retrieve_topk: ", name, " must be a CPU tensor, got ", keys.device());
  TORCH_CHECK_VALUE(keys.dim() == 2 && keys.size(1) == queries.size(1), "retrieve_topk: ", name, " must be [S, ds=",
                    queries.size(1), "] like queries ", queries.sizes(), ", got ", keys.sizes());
  TORCH_CHECK_TYPE(keys.scalar_type() == queries.scalar_type(), "retrieve_topk: ", name, " has dtype ",
                   keys.scalar_type(), ", queries have ", queries.scalar_type(), "; they must match");
}

std::tuple<Tensor, Tensor> retrieve_topk_cpu(const Tensor& queries, const Tensor& keys,
                                             const std::optional<Tensor>& keys2, int64_t k) {
  TORCH_CHECK_TYPE(queries.defined(), "retrieve_topk: queries must be a tensor, got None");
  TORCH_CHECK_VALUE(queries.device().is_cpu(), "retrieve_topk: queries must be a CPU tensor, got ",
                    queries.device());
  TORCH_CHECK_VALUE(queries.dim() == 2 && queries.size(0) >= 1, "retrieve_topk: queries must be [T >= 1, ds], got ",
                    queries.sizes());
  const at::ScalarType dtype = queries.scalar_type();
  TORCH_CHECK_TYPE(dtype == at::kBFloat16 || dtype == at::kHalf || dtype == at::kFloat,
                   "retrieve_topk: queries must be bfloat16, float16 or float32, got ", dtype);
  TORCH_CHECK_VALUE(k >= 0, "retrieve_topk: k must be >= 0, got ", k);
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

  Tensor scores = at::empty({total}, f32);
  retr::Problem P;
  P.queries = q.data_ptr();
  P.q_stride = q.stride(0);
  P.dtype = dtype;
  P.T = q.size(0);
  P.ds = q.size(1);
  if (s1 > 0) P.ranges[P.num_ranges++] = {k1.data_ptr(), s1, k1.stride(0), 0};
  if (s2 > 0) P.ranges[P.num_ranges++] = {k2.data_ptr(), s2, k2.stride(0), s1};
  P.scores = scores.data_ptr<float>();
  kRetrieval.active()(P);
  select_topk(scores.data_ptr<float>(), total, k0, indices.data_ptr<int64_t>(), top_scores.data_ptr<float>());
  return {indices, top_scores};
}

}  // namespace

TORCH_LIBRARY_IMPL(mplus, CPU, m) { m.impl("retrieve_topk", &retrieve_topk_cpu); }

}  // namespace mplus
