// The arguments of one retriever-scores call (forward or backward) as the kernels see them
// (csrc/cpu/retriever_scores.cpp builds it after every check; retriever_scores_impl.h reads it). Plain data, compiled
// for the baseline.
#pragma once

#include <c10/core/ScalarType.h>

#include <cstdint>

namespace mplus::rsc {

// An [L, rows, ds] input of the problem's dtype: unit stride along ds, layer and row strides in elements.
struct Input {
  const void* data = nullptr;
  int64_t layer = 0;
  int64_t row = 0;
};

struct Problem {
  c10::ScalarType dtype = c10::ScalarType::Float;  // of queries and keys: Float, BFloat16 or Half
  int64_t L = 0, T = 0, N = 0, ds = 0;             // T >= 1, N >= 1, ds >= 1 (the caller handles empty cases)
  Input q, k;                                      // queries [L, T, ds], keys [L, N, ds]
  // forward: w [L, N] fp32, contiguous: w[l, n] = mean_t sigmoid(q[l, t] . k[l, n])
  float* w = nullptr;
  // backward: grad [L, N] fp32, contiguous (the upstream gradient of w); dq [L, T, ds] and dk [L, N, ds], contiguous,
  // of `dtype`: dq_t = (1/T) sum_n g_n s'(q_t . k_n) k_n, dk_n = (g_n/T) sum_t s'(q_t . k_n) q_t, s' = s(1 - s)
  const float* grad = nullptr;
  void* dq = nullptr;
  void* dk = nullptr;
};

}  // namespace mplus::rsc
