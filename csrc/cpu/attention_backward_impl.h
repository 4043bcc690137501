// The backward of memory attention on the CPU, ISA-generic (csrc/cpu/attention_backward.cpp checks the arguments
// and builds the BackwardProblem; the files in isa/ compile this once per ISA level inside namespace
// mplus::<level>, see isa.h). FlashAttention-2 recompute from the saved LSE, in fp32:
//   p = exp(scale·q·k − lse), dV += pᵀ·dO, dP = dO·Vᵀ, dS = p ∘ (dP − Δ + dlse), dK += scale·dSᵀ·Q, dQ += scale·dS·K
// Two passes, each writing disjoint outputs, so no atomics and a reduction order fixed by the shapes alone (the
// results do not depend on the thread count):
//  (a) one task per (batch, KV head, block of kKeyBlock keys of [memory ; valid chunk keys]): every query of the G
//      query heads sharing the KV head is replayed against the block, accumulating its keys' dK and dV;
//  (b) one task per (batch, query head, block of kQueryBlock queries): dQ = scale · Σ_j dS_j k_j, dS recomputed,
//      key blocks outer and queries inner so that a block of K/V rows is reused by all the task's queries.
// Keys outside [kv_start, kv_len) are never read (a static cache may hold garbage there).
//
// Library headers come from prelude.h (included before the ISA region); this file includes only kernel sources.

namespace mplus {
namespace MPLUS_ISA {
namespace {

using namespace ::mplus::attn;
#include "vec.h"

constexpr int64_t kKeyBlock = 16;    // keys per pass-(a) task and per pass-(b) step (K, V, dK, dV rows in L1)
constexpr float kLog2e = 1.4426950408889634f;
constexpr int64_t kQueryBlock = 16;  // queries per pass-(b) task

// a·b over n floats: two vector accumulators, then the lanes, then the tail; the order is fixed by n.
inline float dot(const float* a, const float* b, int64_t n) {
  vf s0{}, s1{};
  int64_t i = 0;
  for (; i + 2 * kLanes <= n; i += 2 * kLanes) {
    s0 += load(a + i) * load(b + i);
    s1 += load(a + i + kLanes) * load(b + i + kLanes);
  }
  for (; i + kLanes <= n; i += kLanes) s0 += load(a + i) * load(b + i);
  float s = hsum(s0 + s1);
  for (; i < n; ++i) s += a[i] * b[i];
  return s;
}

// y += a·x over n floats.
inline void axpy(float* y, float a, const float* x, int64_t n) {
  const vf av = splat(a);
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes) store(y + i, load(y + i) + av * load(x + i));
  for (; i < n; ++i) y[i] += a * x[i];
}

// The probabilities of one query against the keys [lo, stop) (stop − lo <= kKeyBlock) and their scaled score
// gradients: p[j − lo] = exp(scale·q·k_j − lse), ds[j − lo] = scale · p · (dO·v_j + dlse − Δ). The exponentials
// run a vector at a time; lanes past stop get p = ds = 0.
template <typename KeyRow, typename ValueRow>
void probabilities(const BackwardProblem& P, const float* q, const float* d_o, float lse, float coef, const KeyRow& key,
                   const ValueRow& value, int64_t lo, int64_t stop, float* p, float* ds) {
  alignas(64) float s[kKeyBlock], dp[kKeyBlock];
  const int64_t D = P.D;
  for (int64_t j = lo; j < stop; ++j) {
    s[j - lo] = dot(q, key(j), D);
    dp[j - lo] = dot(d_o, value(j), D);
  }
  for (int64_t j = stop - lo; j < kKeyBlock; ++j) s[j] = kNegInf, dp[j] = 0.f;
  // base 2: exp(scale·s − lse) = 2^(scale·log2e·s − log2e·lse); lse = +inf (a query that saw nothing) gives 0
  const vf c = splat(P.scale * kLog2e), shift = splat(lse * kLog2e), cf = splat(coef), sc = splat(P.scale);
  for (int64_t i = 0; i < kKeyBlock; i += kLanes) {
    const vf pv = exp2v(load(s + i) * c - shift);
    store(p + i, pv);
    store(ds + i, sc * pv * (load(dp + i) + cf));
  }
}

// Pass (a) for the keys [lo, hi) of one KV head: `key(j)`/`value(j)` give their rows, `end_of(t)` the end of the
// keys query t sees (hi for memory keys); dk/dv [hi − lo, D] fp32 accumulators, zeroed by the caller.
template <typename KeyRow, typename ValueRow, typename EndOf>
void key_block_grads(const BackwardProblem& P, int64_t b, int64_t h, int64_t lo, int64_t hi, const KeyRow& key,
                     const ValueRow& value, const EndOf& end_of, float* dk, float* dv) {
  const int64_t D = P.D;
  alignas(64) float p[kKeyBlock], ds[kKeyBlock];
  for (int64_t gq = 0; gq < P.G; ++gq) {
    const int64_t hq = h * P.G + gq;
    for (int64_t t = 0; t < P.Tq; ++t) {
      const int64_t stop = std::min(hi, end_of(t));
      if (stop <= lo) continue;
      const float* q = P.q.row(b, t, hq);
      const float* d_o = P.dout.row(b, t, hq);
      const int64_t r = (b * P.Hq + hq) * P.Tq + t;
      probabilities(P, q, d_o, P.lse[r], P.coef[r], key, value, lo, stop, p, ds);
      for (int64_t j = lo; j < stop; ++j) {
        axpy(dv + (j - lo) * D, p[j - lo], d_o, D);
        axpy(dk + (j - lo) * D, ds[j - lo], q, D);
      }
    }
  }
}

// Pass (b) for one query and the keys [lo, stop): dq += Σ_j ds_j k_j (ds already scaled).
template <typename KeyRow, typename ValueRow>
void query_grads(const BackwardProblem& P, const float* q, const float* d_o, float lse, float coef, const KeyRow& key,
                 const ValueRow& value, int64_t lo, int64_t stop, float* dq) {
  if (stop <= lo) return;
  alignas(64) float p[kKeyBlock], ds[kKeyBlock];
  probabilities(P, q, d_o, lse, coef, key, value, lo, stop, p, ds);
  for (int64_t j = lo; j < stop; ++j) axpy(dq, ds[j - lo], key(j), P.D);
}

}  // namespace

void attention_backward_kernel(const BackwardProblem& P) {
  const int64_t D = P.D;
  float *dq = P.dq, *dk = P.dk, *dv = P.dv, *dmk_rot = P.dmk_rot, *dmv = P.dmv;
  // ---- pass (a): dK, dV per (b, kv head, key block); memory blocks first, then the valid chunk keys
  const int64_t mem_blocks = (P.M + kKeyBlock - 1) / kKeyBlock;
  const int64_t chunk_blocks = (P.Tk + kKeyBlock - 1) / kKeyBlock;  // over [0, Tk): blocks cut to the valid range
  const int64_t per_head = mem_blocks + chunk_blocks;
  at::parallel_for(0, P.B * P.Hkv * per_head, 1, [&](int64_t begin, int64_t end) {
    Scratch scratch(2 * kKeyBlock * D);
    float* const acc = scratch.p;
    for (int64_t task = begin; task < end; ++task) {
      const int64_t b = task / (P.Hkv * per_head), h = task / per_head % P.Hkv, i = task % per_head;
      float *dk_acc = acc, *dv_acc = acc + kKeyBlock * D;
      if (i < mem_blocks) {
        const int64_t lo = i * kKeyBlock, hi = std::min(P.M, lo + kKeyBlock);
        std::fill(acc, acc + 2 * kKeyBlock * D, 0.f);
        key_block_grads(
            P, b, h, lo, hi, [&](int64_t j) { return P.mk.row(b, j, h); }, [&](int64_t j) { return P.mv.row(b, j, h); },
            [&](int64_t) { return hi; }, dk_acc, dv_acc);
        for (int64_t j = lo; j < hi; ++j) {
          std::copy_n(dk_acc + (j - lo) * D, D, dmk_rot + ((b * P.M + j) * P.Hkv + h) * D);
          std::copy_n(dv_acc + (j - lo) * D, D, dmv + ((b * P.M + j) * P.Hkv + h) * D);
        }
      } else {
        // keys outside [kv_start, kv_len) are never read (a static cache may hold garbage) and get gradient 0
        // (the outputs start zeroed)
        const int64_t lo = std::max((i - mem_blocks) * kKeyBlock, P.chunk_begin(b));
        const int64_t hi = std::min((i - mem_blocks + 1) * kKeyBlock, P.chunk_end(b));
        if (hi <= lo) continue;
        std::fill(acc, acc + 2 * kKeyBlock * D, 0.f);
        key_block_grads(
            P, b, h, lo, hi, [&](int64_t j) { return P.k.row(b, j, h); }, [&](int64_t j) { return P.v.row(b, j, h); },
            [&](int64_t t) { return P.visible_end(b, t); }, dk_acc, dv_acc);
        for (int64_t j = lo; j < hi; ++j) {
          std::copy_n(dk_acc + (j - lo) * D, D, dk + ((b * P.Tk + j) * P.Hkv + h) * D);
          std::copy_n(dv_acc + (j - lo) * D, D, dv + ((b * P.Tk + j) * P.Hkv + h) * D);
        }
      }
    }
  });

  // ---- pass (b): dQ per (b, query head, query block), keys in increasing order for every query
  const int64_t q_blocks = (P.Tq + kQueryBlock - 1) / kQueryBlock;
  at::parallel_for(0, P.B * P.Hq * q_blocks, 1, [&](int64_t begin, int64_t end) {
    Scratch scratch(kQueryBlock * D);
    float* const acc = scratch.p;
    for (int64_t task = begin; task < end; ++task) {
      const int64_t b = task / (P.Hq * q_blocks), hq = task / q_blocks % P.Hq, t0 = task % q_blocks * kQueryBlock;
      const int64_t t1 = std::min(P.Tq, t0 + kQueryBlock), h = hq / P.G;
      std::fill(acc, acc + kQueryBlock * D, 0.f);
      const int64_t jbegin = P.chunk_begin(b);
      // key blocks outer, queries inner: a block of K/V rows is reused by every query of the task
      for (int64_t lo = 0; lo < P.M + P.Tk; lo += kKeyBlock) {
        const int64_t hi = std::min(P.M + P.Tk, lo + kKeyBlock);
        for (int64_t t = t0; t < t1; ++t) {
          const float* q = P.q.row(b, t, hq);
          const float* d_o = P.dout.row(b, t, hq);
          float* dq_t = acc + (t - t0) * D;
          // [lo, hi) in the concatenated [memory ; chunk] key axis, cut to the keys query t sees
          const int64_t r = (b * P.Hq + hq) * P.Tq + t;
          query_grads(
              P, q, d_o, P.lse[r], P.coef[r], [&](int64_t j) { return P.mk.row(b, j, h); },
              [&](int64_t j) { return P.mv.row(b, j, h); }, lo, std::min(hi, P.M), dq_t);
          query_grads(
              P, q, d_o, P.lse[r], P.coef[r], [&](int64_t j) { return P.k.row(b, j, h); },
              [&](int64_t j) { return P.v.row(b, j, h); }, std::max(std::max(lo, P.M) - P.M, jbegin),
              std::min(hi - P.M, P.visible_end(b, t)), dq_t);
        }
      }
      for (int64_t t = t0; t < t1; ++t) std::copy_n(acc + (t - t0) * D, D, dq + ((b * P.Tq + t) * P.Hq + hq) * D);
    }
  });
}

}  // namespace MPLUS_ISA
}  // namespace mplus
