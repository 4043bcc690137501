// The arguments of one memory-attention call as the kernels see them (csrc/cpu/attention.cpp builds it after every
// check; the ISA variants in attention_impl.h read it). Plain data, compiled for the baseline.
#pragma once

#include <c10/core/ScalarType.h>

#include <cstdint>

namespace mplus::attn {

// A [B, T, H, D] operand with a contiguous last dim; strides in elements.
struct View {
  const void* data = nullptr;
  int64_t sb = 0, st = 0, sh = 0;
  template <typename T>
  const T* row(int64_t b, int64_t t, int64_t h) const {
    return static_cast<const T*>(data) + b * sb + t * st + h * sh;
  }
};

struct Problem {
  int64_t B, Tq, Tk, M, Hq, Hkv, G, D;
  View q, k, v, mk, mv;
  const int32_t* pos;  // [M] rows of cos/sin, or nullptr: memory keys used as given
  const float *cos, *sin;
  int64_t rope_ld;
  float scale2;  // softmax_scale * log2(e)
  bool causal;
  void* out;   // [B, Tq, Hq, D] contiguous, q's dtype
  float* lse;  // [B, Hq, Tq]
  const int32_t* kv_len = nullptr;    // [B] end of each row's valid chunk keys (nullptr: Tk), range-checked
  const int32_t* kv_start = nullptr;  // [B] first valid chunk key of each row (nullptr: 0), range-checked

  int64_t chunk_end(int64_t b) const { return kv_len != nullptr ? kv_len[b] : Tk; }
  int64_t chunk_begin(int64_t b) const { return kv_start != nullptr ? kv_start[b] : 0; }
};

// merge_attention_states: out = wa * a + wb * b per row, from the two LSEs (strided [B, H, T] fp32).
struct MergeProblem {
  int64_t B, T, H, D;
  const char *a, *b;        // [B, T, H, D] rows dense, strides below in elements
  int64_t sa[3], sb[3];     // strides of a and b over (B, T, H)
  c10::ScalarType ta, tb;   // their dtypes (may differ)
  const float *la, *lb;     // LSEs
  int64_t sla[3], slb[3];   // their strides over (B, H, T)
  char* out;                // [B, T, H, D] contiguous, a's dtype
  float* lse;               // [B, H, T] contiguous
};

// rotate_keys: out[b, n, h] = the row k[b, n, h] rotated by the RoPE rows cos/sin[pos[n]] (fp32 products, each
// rounded, rounded once more to k's dtype).
struct RotateProblem {
  int64_t B, N, H, D;
  View k;                // [B, N, H, D], rows dense
  c10::ScalarType type;  // k's dtype (and out's)
  const int32_t* pos;    // [N], range-checked
  const float *cos, *sin;  // [P, D/2] contiguous
  void* out;             // [B, N, H, D] contiguous
};

}  // namespace mplus::attn
