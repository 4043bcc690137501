// The arguments of one retrieval-scoring call as the kernels see them (csrc/cpu/retrieval.cpp builds it after every
// check; the ISA variants in retrieval_impl.h read it). Plain data, compiled for the baseline.
#pragma once

#include <c10/core/ScalarType.h>

#include <cstdint>

namespace mplus::retr {

// One range of keys: `rows` rows of ds elements of the queries' dtype (unit stride along ds), `stride` elements
// apart; their scores go to scores[offset + row].
struct KeyRange {
  const void* data = nullptr;
  int64_t rows = 0;
  int64_t stride = 0;
  int64_t offset = 0;
};

constexpr int kMaxRanges = 2;  // keys and keys2

struct Problem {
  const void* queries = nullptr;  // [T, ds], rows `q_stride` elements apart, unit stride along ds
  int64_t q_stride = 0;
  c10::ScalarType dtype = c10::ScalarType::Float;  // of the queries and of every key range
  int64_t T = 0;                                   // >= 1
  int64_t ds = 0;                                  // >= 0
  KeyRange ranges[kMaxRanges];                     // the first `num_ranges` are used, each with rows >= 1
  int num_ranges = 0;
  float* scores = nullptr;  // [sum of the ranges' rows]: score(s) = mean_t sigmoid(q_t . k_s)
};

}  // namespace mplus::retr
