// The arguments of one memory-attention backward call as the kernels see them (csrc/cpu/attention_backward.cpp
// builds it after every check; attention_backward_impl.h reads it). Plain data, compiled for the baseline.
#pragma once

#include <cstdint>

namespace mplus::attn {

// An fp32 [B, T, H, D] array with a dense last dim; strides in elements.
struct Rows {
  const float* data = nullptr;
  int64_t sb = 0, st = 0, sh = 0;
  const float* row(int64_t b, int64_t t, int64_t h) const { return data + b * sb + t * st + h * sh; }
};

struct BackwardProblem {
  int64_t B, Tq, Tk, M, Hq, Hkv, G, D;
  Rows q, k, v, mk, dout;  // mk: the memory keys, rotated
  Rows mv;
  const float* lse;         // [B, Hq, Tq] contiguous, +inf for queries that saw no key (p = 0 everywhere)
  const float* coef;        // [B, Hq, Tq] contiguous: dlse − Δ, Δ = rowsum(dO ∘ O)
  float scale;              // softmax_scale
  bool causal;
  const int32_t* kv_len;    // [B] end of each row's valid chunk keys (nullptr: Tk), range-checked
  const int32_t* kv_start;  // [B] first valid chunk key of each row (nullptr: 0), range-checked
  // fp32 outputs, contiguous: dq [B, Tq, Hq, D]; dk, dv [B, Tk, Hkv, D] zeroed by the caller (rows outside the
  // valid range stay 0); dmk_rot (the gradient of the rotated memory keys), dmv [B, M, Hkv, D]
  float *dq, *dk, *dv, *dmk_rot, *dmv;
  // The inputs were bf16 (every operand above but a rotated memory key is a bf16 number in fp32): the bf16 levels
  // run their bf16 kernel. mk_rotated: mk holds the memory keys rotated by RoPE (fp32 numbers, no longer bf16 ones).
  bool bf16 = false, mk_rotated = false;

  int64_t chunk_end(int64_t b) const { return kv_len != nullptr ? kv_len[b] : Tk; }
  int64_t chunk_begin(int64_t b) const { return kv_start != nullptr ? kv_start[b] : 0; }
  // One past the last chunk key query t of row b sees.
  int64_t visible_end(int64_t b, int64_t t) const {
    const int64_t end = chunk_end(b);
    return causal ? (t + end - Tq + 1 < 0 ? 0 : (t + end - Tq + 1 > end ? end : t + end - Tq + 1)) : end;
  }
};

}  // namespace mplus::attn
