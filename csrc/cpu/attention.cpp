// Memory attention and the exact merge of partial attentions on the CPU (DESIGN.md §2.1, SPEC.md §3.1, P8/P9/P15).
//
// A chunk of Tq queries attends to [memory (M keys, fully visible, keys rotated here from a position table) ;
// chunk (Tk keys, bottom-right causal)] with native GQA. With a static KV cache, batch row b uses only the chunk keys
// [kv_start[b], kv_len[b]) (read here, inside the kernel, from the CPU tensors, after a range check) and its
// causality is aligned to that row's end: query t sees chunk key j iff kv_start[b] <= j < kv_len[b] and (causal)
// j <= t + kv_len[b] - Tq. Keys outside the range are never read (a static cache may hold garbage there). The
// G = Hq / Hkv query heads of a KV head are processed together, so each K/V row is read, converted and rotated once
// per block of queries, never repeated per head, and no mask tensor exists. Flash-style online softmax in fp32
// (base 2: Q is pre-scaled by softmax_scale * log2 e).
//
// * prefill: one task per (batch, KV head, block of ~384 query rows = G x queries); the block keeps Q^T, O^T, max and
//   sum in a task-local workspace (L2-resident) while 32-key blocks of K/V stream through fp32 tiles (converted,
//   memory keys rotated, the next block prefetched). Causality is exploited per 48-row group: invisible key blocks
//   are skipped, fully visible ones run unmasked.
// * decode (G x Tq <= 8 rows, D in {64, 128, 256}): split-KV. One task per (batch, key range); inside it every KV
//   head is processed per 64-key block (the rope rows of a key are loaded once for all heads), each K/V byte is read
//   once; each batch row cuts its own keys (memory + valid chunk keys) into the splits. Each split keeps (max, sum,
//   out) per row; the last split of a batch to finish merges them through the LSEs.
// Tasks are handed out dynamically (parallel_tasks): the CPUs this runs on are shared with other jobs.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <memory>
#include <new>
#include <optional>
#include <tuple>
#include <vector>

#include "attention_kernels.h"

namespace mplus {
namespace {

using at::Tensor;
using namespace attn;

constexpr float kLog2e = 1.4426950408889634f;
constexpr float kLn2 = 0.6931471805599453f;
constexpr int kKeyBlock = 32;                      // prefill keys per tile
constexpr int kRowGroup = 3 * kLanes;              // prefill query rows per micro-tile
constexpr int64_t kTargetRows = 8 * kRowGroup;     // prefill query rows per task (G x queries)
constexpr int kDecodeBlock = 64;                   // decode keys per softmax step

int64_t round_up(int64_t x, int64_t m) { return (x + m - 1) / m * m; }

// A [B, T, H, D] operand with a contiguous last dim; strides in elements.
struct View {
  const void* data = nullptr;
  int64_t sb = 0, st = 0, sh = 0;
  template <typename T>
  const T* row(int64_t b, int64_t t, int64_t h) const {
    return static_cast<const T*>(data) + b * sb + t * st + h * sh;
  }
};

View view_of(const Tensor& t) { return {t.data_ptr(), t.stride(0), t.stride(1), t.stride(2)}; }

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

// 64-byte aligned fp32 scratch owned by one task (freed when the task ends).
struct Scratch {
  explicit Scratch(int64_t n) : p(static_cast<float*>(::operator new[](n * sizeof(float), std::align_val_t{64}))) {}
  ~Scratch() { ::operator delete[](p, std::align_val_t{64}); }
  Scratch(const Scratch&) = delete;
  Scratch& operator=(const Scratch&) = delete;
  float* p;
};

// Runs body(task) for every task in [0, n) on the intra-op threads, handing tasks out one at a time: the machines
// this runs on are shared, and a static split of the range would wait for its most preempted thread.
template <typename F>
void parallel_tasks(int64_t n, const F& body) {
  std::atomic<int64_t> next{0};
  at::parallel_for(0, std::min<int64_t>(n, at::get_num_threads()), 1, [&](int64_t, int64_t) {
    for (int64_t task = next++; task < n; task = next++) body(task);
  });
}

// Writes one finished query row: out = acc / l, lse = ln(l) + m ln 2; a row that saw no key gets 0 and -inf.
template <typename T>
void finish_row(const Problem& P, int64_t b, int64_t t, int64_t hq, const float* acc, float m, float l, float* tmp) {
  T* dst = static_cast<T*>(P.out) + ((b * P.Tq + t) * P.Hq + hq) * P.D;
  const bool empty = !(l > 0.f);
  const float inv = empty ? 0.f : 1.f / l;
  for (int64_t i = 0; i < P.D; ++i) tmp[i] = acc[i] * inv;
  store_row(dst, tmp, P.D);
  P.lse[(b * P.Hq + hq) * P.Tq + t] = empty ? kNegInf : (m + std::log2(l)) * kLn2;
}

// ---------------------------------------------------------------------------------------------------------------------
// prefill
// ---------------------------------------------------------------------------------------------------------------------

template <typename T>
class PrefillTask {
 public:
  // Scratch floats needed for blocks of up to `rows` query rows.
  static int64_t scratch_size(int64_t rows, int64_t d) {
    const int64_t rp = round_up(rows, kLanes), dp = round_up(d, 8);
    return 2 * dp * leading_dim(rp) + 2 * kKeyBlock * dp + kKeyBlock * kRowGroup + 3 * rp + dp;
  }

  // Row stride of Q^T and O^T: an odd number of cache lines, so that walking down a column (the d loop of the
  // micro-kernels) visits every L1 set; 384 rows (24 lines) would map a column onto 24 of the 64 sets.
  static int64_t leading_dim(int64_t rp) { return rp / kLanes % 2 ? rp : rp + kLanes; }

  PrefillTask(const Problem& P, float* ws, int64_t b, int64_t h, int64_t t0, int64_t nt)
      : P_(P), b_(b), h_(h), t0_(t0), nt_(nt), rows_(P.G * nt), rp_(round_up(rows_, kLanes)),
        ld_(leading_dim(rp_)), dp_(round_up(P.D, 8)) {
    QT_ = ws;
    OT_ = QT_ + dp_ * ld_;
    K_ = OT_ + dp_ * ld_;
    V_ = K_ + kKeyBlock * dp_;
    S_ = V_ + kKeyBlock * dp_;
    m_ = S_ + kKeyBlock * kRowGroup;
    l_ = m_ + rp_;
    thr_ = l_ + rp_;
    tmp_ = thr_ + rp_;
    // This row's valid chunk keys [jbegin_, kv_len), cut to those that at least the block's last query sees.
    kv_end_ = P.chunk_end(b);
    jbegin_ = P.chunk_begin(b);
    jend_ = P.causal ? std::clamp<int64_t>(t0 + nt + kv_end_ - P.Tq, 0, kv_end_) : kv_end_;
    nmem_ = (P.M + kKeyBlock - 1) / kKeyBlock;
    nblocks_ = nmem_ + (std::max<int64_t>(jend_ - jbegin_, 0) + kKeyBlock - 1) / kKeyBlock;
  }

  void run() {
    const int64_t D = P_.D, G = P_.G;
    // Q^T (scaled), O^T = 0, m = -inf, l = 0, thr[row] = last visible chunk key of the row's query.
    std::fill(QT_, QT_ + 2 * dp_ * ld_, 0.f);
    for (int64_t r = 0; r < rp_; ++r) {
      m_[r] = kNegInf;
      l_[r] = 0.f;
      thr_[r] = r < rows_ ? static_cast<float>(t0_ + r / G + kv_end_ - P_.Tq) : 0.f;
    }
    for (int64_t r = 0; r < rows_; ++r) {
      load_row(P_.q.row<T>(b_, t0_ + r / G, h_ * G + r % G), tmp_, D);
      for (int64_t i = 0; i < D; ++i) QT_[i * ld_ + r] = tmp_[i] * P_.scale2;
    }
    for (int64_t i = 0; i < nblocks_; ++i) {
      const KeyBlock blk = block(i);
      pack(*blk.k, blk, blk.pos, K_);
      pack(*blk.v, blk, nullptr, V_);
      key_block(blk, i + 1 < nblocks_ ? block(i + 1) : KeyBlock{});
    }
    for (int64_t r = 0; r < rows_; ++r) {
      float* acc = tmp_;  // O^T column r, then finish_row normalises it in place
      for (int64_t i = 0; i < D; ++i) acc[i] = OT_[i * ld_ + r];
      finish_row<T>(P_, b_, t0_ + r / G, h_ * G + r % G, acc, m_[r], l_[r], acc);
    }
  }

 private:
  // Keys j0 .. j0+n-1 of a segment: the memory (rotated by pos when given; jc0 = -1) or the chunk (jc0 = j0, chunk
  // blocks start at the row's first valid key, so only the tail of the last one needs a key-bound mask).
  struct KeyBlock {
    const View *k = nullptr, *v = nullptr;
    const int32_t* pos = nullptr;
    int64_t j0 = 0, n = 0, jc0 = -1;
  };

  KeyBlock block(int64_t i) const {
    if (i < nmem_) {
      const int64_t j0 = i * kKeyBlock;
      return {&P_.mk, &P_.mv, P_.pos, j0, std::min<int64_t>(kKeyBlock, P_.M - j0), -1};
    }
    const int64_t j0 = jbegin_ + (i - nmem_) * kKeyBlock;
    return {&P_.k, &P_.v, nullptr, j0, std::min<int64_t>(kKeyBlock, jend_ - j0), j0};
  }

  // The block's rows of one tensor into a [kKeyBlock][dp] fp32 tile (rotated when pos is given), zero-padded.
  void pack(const View& src, const KeyBlock& blk, const int32_t* pos, float* tile) const {
    const int64_t D = P_.D;
    for (int64_t j = 0; j < blk.n; ++j) {
      float* dst = tile + j * dp_;
      load_row(src.row<T>(b_, blk.j0 + j, h_), dst, D);
      std::fill(dst + D, dst + dp_, 0.f);
      if (pos != nullptr) {
        const int64_t p = pos[blk.j0 + j] * P_.rope_ld;
        rope_inplace(dst, P_.cos + p, P_.sin + p, D);
      }
    }
    std::fill(tile + blk.n * dp_, tile + kKeyBlock * dp_, 0.f);
  }

  // The cache lines of a block's K, V and rope rows, for the Prefetcher.
  void list_lines(const KeyBlock& blk) {
    lines_.clear();
    const int64_t row_bytes = P_.D * static_cast<int64_t>(sizeof(T));
    for (int64_t j = blk.j0; j < blk.j0 + blk.n; ++j) {
      const char* kr = reinterpret_cast<const char*>(blk.k->template row<T>(b_, j, h_));
      const char* vr = reinterpret_cast<const char*>(blk.v->template row<T>(b_, j, h_));
      for (int64_t off = 0; off < row_bytes; off += 64) {
        lines_.push_back(kr + off);
        lines_.push_back(vr + off);
      }
      if (blk.pos != nullptr) {
        for (int64_t off = 0; off < P_.D / 2; off += 16) {
          lines_.push_back(reinterpret_cast<const char*>(P_.cos + blk.pos[j] * P_.rope_ld + off));
          lines_.push_back(reinterpret_cast<const char*>(P_.sin + blk.pos[j] * P_.rope_ld + off));
        }
      }
    }
  }

  void key_block(const KeyBlock& blk, const KeyBlock& next) {
    // Row groups of 3 vectors (48 rows); a remainder is split into groups of 2 rather than leaving a group of 1, whose
    // micro-tile is load-bound (1 vector load + 8 broadcasts per 8 FMAs).
    const int64_t nvec = rp_ / kLanes;
    const int64_t twos = nvec < 3 ? 0 : nvec % 3 == 1 ? 2 : nvec % 3 == 2 ? 1 : 0;
    const int64_t groups = nvec < 3 ? 1 : (nvec - 2 * twos) / 3 + twos;
    const int64_t n = blk.n, jc0 = P_.causal ? blk.jc0 : -1;
    list_lines(next);
    const int steps = static_cast<int>(groups * (kKeyBlock / 8 + dp_ / 8));  // qk_tile and pv_tile steps
    Prefetcher pf{lines_.data(), static_cast<int>(lines_.size()), 0,
                  static_cast<int>((lines_.size() + steps - 1) / steps)};
    for (int64_t g = 0, r0 = 0, rv = 0; g < groups; ++g, r0 += rv * kLanes) {
      rv = nvec < 3 ? nvec : g >= groups - twos ? 2 : 3;
      bool masked = n < kKeyBlock;
      if (jc0 >= 0) {
        const int64_t last_row = std::min<int64_t>(r0 + rv * kLanes, rows_) - 1;
        const int64_t off = t0_ + kv_end_ - P_.Tq;  // query t0 + i sees chunk key j iff j <= i + off
        if (jc0 > last_row / P_.G + off) continue;
        masked = masked || jc0 + n - 1 > r0 / P_.G + off;
      }
      switch (rv) {
        case 3: group<3>(r0, n, masked, jc0, pf); break;
        case 2: group<2>(r0, n, masked, jc0, pf); break;
        default: group<1>(r0, n, masked, jc0, pf); break;
      }
    }
    pf.finish();
  }

  // One row group against the packed tile: S = Q K^T, mask (tail keys; causal when causal_from >= 0), online
  // softmax, O = alpha O + P V.
  template <int RV>
  void group(int64_t r0, int64_t n, bool masked, int64_t causal_from, Prefetcher& pf) {
    qk_tile<RV>(K_, QT_ + r0, ld_, dp_, kKeyBlock, S_, pf);
    if (masked) {
      for (int j = 0; j < kKeyBlock; ++j) {
        for (int c = 0; c < RV; ++c) {
          float* s = S_ + j * RV * kLanes + c * kLanes;
          vi hide = vi{} - (j >= n ? 1 : 0);
          if (causal_from >= 0) hide |= splat(static_cast<float>(causal_from + j)) > load(thr_ + r0 + c * kLanes);
          store(s, hide ? splat(kNegInf) : load(s));
        }
      }
    }
    vf alpha[RV];
    softmax_tile<RV>(S_, kKeyBlock, m_ + r0, l_ + r0, alpha);
    rescale_tile<RV>(alpha, OT_ + r0, ld_, dp_);
    pv_tile<RV>(V_, S_, kKeyBlock, OT_ + r0, ld_, dp_, pf);
  }

  const Problem& P_;
  // rp_: rows padded to whole vectors, ld_: their row stride in Q^T/O^T, dp_: head dim padded to the PV tile (8)
  const int64_t b_, h_, t0_, nt_, rows_, rp_, ld_, dp_;
  // kv_end_, jbegin_: the row's valid chunk keys; jend_: the end of those the block's last query sees
  int64_t kv_end_, jbegin_, jend_, nmem_, nblocks_;
  std::vector<const char*> lines_;
  float *QT_, *OT_, *K_, *V_, *S_, *m_, *l_, *thr_, *tmp_;
};

template <typename T>
void prefill(const Problem& P) {
  // Queries per task: ~kTargetRows rows (fewer when that leaves threads idle), spread evenly over the blocks.
  int64_t nq = std::max<int64_t>(1, kTargetRows / P.G);
  const int64_t threads = at::get_num_threads();
  while (nq > 1 && P.B * P.Hkv * ((P.Tq + nq - 1) / nq) < 2 * threads) nq = (nq + 1) / 2;
  const int64_t nblk = (P.Tq + nq - 1) / nq;
  nq = (P.Tq + nblk - 1) / nblk;
  const int64_t tasks = P.B * P.Hkv * nblk;
  std::atomic<int64_t> next{0};  // as parallel_tasks, with one scratch per thread
  at::parallel_for(0, std::min<int64_t>(tasks, at::get_num_threads()), 1, [&](int64_t, int64_t) {
    Scratch ws(PrefillTask<T>::scratch_size(P.G * nq, P.D));
    for (int64_t task = next++; task < tasks; task = next++) {
      // Last query blocks first: they see the most chunk keys (longest tasks first balances the threads).
      const int64_t qb = nblk - 1 - task % nblk, h = task / nblk % P.Hkv, b = task / nblk / P.Hkv;
      const int64_t t0 = qb * nq;
      PrefillTask<T>(P, ws.p, b, h, t0, std::min(nq, P.Tq - t0)).run();
    }
  });
}

// ---------------------------------------------------------------------------------------------------------------------
// decode (split-KV)
// ---------------------------------------------------------------------------------------------------------------------

// Pointers to the rows j0 .. j0+n-1 of head h in [memory ; chunk from row c0] (nullptr up to kDecodeBlock): key
// j >= M is chunk row c0 + j - M.
template <typename T>
void block_rows(const View& mem, const View& chunk, int64_t M, int64_t c0, int64_t b, int64_t h, int64_t j0, int n,
                const T** out) {
  int jj = 0;
  const int nm = static_cast<int>(std::clamp<int64_t>(M - j0, 0, n));
  if (nm > 0) {
    const T* p = mem.row<T>(b, j0, h);
    for (; jj < nm; ++jj, p += mem.st) out[jj] = p;
  }
  if (jj < n) {
    const T* p = chunk.row<T>(b, c0 + j0 + jj - M, h);
    for (; jj < n; ++jj, p += chunk.st) out[jj] = p;
  }
  for (; jj < kDecodeBlock; ++jj) out[jj] = nullptr;
}

// Keys [k0, k1) of the concatenation [memory ; valid chunk keys of row b] for every KV head of batch b. Results:
// finished rows in P.out/P.lse when `part` is null, else normalised fp32 rows part[h][r][D] and their LSE
// part_lse[h][r].
template <typename T, int NV>
void decode_split(const Problem& P, int64_t b, int64_t k0, int64_t k1, float* part, float* part_lse) {
  constexpr int64_t D = NV * kLanes;
  constexpr int kLines = D * sizeof(T) / 64;  // cache lines per K or V row
  const int64_t G = P.G, H = P.Hkv;
  const int R = static_cast<int>(G * P.Tq);
  Scratch ws(2 * H * R * D + 2 * H * R + D);
  float *q = ws.p, *o = q + H * R * D, *m = o + H * R * D, *l = m + H * R, *tmp = l + H * R;
  for (int64_t h = 0; h < H; ++h) {
    for (int r = 0; r < R; ++r) {
      float* qr = q + (h * R + r) * D;
      load_row(P.q.row<T>(b, r / G, h * G + r % G), qr, D);
      for (int64_t i = 0; i < D; ++i) qr[i] *= P.scale2;
    }
  }
  std::fill(o, o + H * R * D, 0.f);
  std::fill(m, m + H * R, kNegInf);
  std::fill(l, l + H * R, 0.f);

  const T *key[kDecodeBlock], *val[kDecodeBlock], *next_key[kDecodeBlock], *next_val[kDecodeBlock];
  const float *cos[kDecodeBlock], *sin[kDecodeBlock];
  alignas(64) float s[kMaxDecodeRows * kDecodeBlock];
  float alpha[kMaxDecodeRows];
  const int64_t c0 = P.chunk_begin(b), c_end = P.chunk_end(b);  // key j >= M is chunk row c0 + j - M
  for (int64_t j0 = k0; j0 < k1; j0 += kDecodeBlock) {
    const int n = static_cast<int>(std::min<int64_t>(kDecodeBlock, k1 - j0));
    const int n_next = static_cast<int>(std::clamp<int64_t>(k1 - j0 - kDecodeBlock, 0, kDecodeBlock));
    for (int jj = 0; jj < kDecodeBlock; ++jj) {  // rope rows, shared by all heads
      const bool rope = jj < n && j0 + jj < P.M && P.pos != nullptr;
      cos[jj] = rope ? P.cos + P.pos[j0 + jj] * P.rope_ld : nullptr;
      sin[jj] = rope ? P.sin + P.pos[j0 + jj] * P.rope_ld : nullptr;
    }
    // Causal masking is needed only if some chunk key here is beyond the first query's horizon (thr of row 0).
    const bool causal_mask = P.causal && c0 + j0 + n - 1 - P.M > c_end - P.Tq;
    for (int64_t h = 0; h < H; ++h) {
      block_rows(P.mk, P.k, P.M, c0, b, h, j0, n, key);
      block_rows(P.mv, P.v, P.M, c0, b, h, j0, n, val);
      block_rows(P.mk, P.k, P.M, c0, b, h, j0 + kDecodeBlock, n_next, next_key);
      block_rows(P.mv, P.v, P.M, c0, b, h, j0 + kDecodeBlock, n_next, next_val);
      // While this head's block is scored, its next block is prefetched, one K and one V row per key scored (and
      // the rope rows with head 0): per head the rows are strided, which the hardware prefetchers do not follow.
      auto prefetch = [&](int jj) {
        if (jj >= n_next) return;
        for (int i = 0; i < kLines; ++i) {
          prefetch_line(reinterpret_cast<const char*>(next_key[jj]) + 64 * i);
          prefetch_line(reinterpret_cast<const char*>(next_val[jj]) + 64 * i);
        }
        const int64_t j = j0 + kDecodeBlock + jj;
        if (h == 0 && j < P.M && P.pos != nullptr) {
          for (int64_t off = 0; off < D / 2; off += 16) {
            prefetch_line(P.cos + P.pos[j] * P.rope_ld + off);
            prefetch_line(P.sin + P.pos[j] * P.rope_ld + off);
          }
        }
      };
      const float* qh = q + h * R * D;
      for (int g = 0; g < kDecodeBlock; g += 16) {
        auto per_key = [&](int jj) { prefetch(g + jj); };
        if (g < n) {
          decode_scores16<T, NV>(key + g, cos + g, sin + g, qh, R, s + g, kDecodeBlock, per_key);
        } else {
          for (int jj = 0; jj < 16; ++jj) prefetch(g + jj);
        }
      }
      if (n < kDecodeBlock || causal_mask) {
        for (int r = 0; r < R; ++r) {
          const int64_t thr = r / G + c_end - P.Tq;  // last chunk row visible to the row's query
          for (int jj = 0; jj < kDecodeBlock; ++jj) {
            const int64_t j = j0 + jj;
            if (jj >= n || (P.causal && j >= P.M && c0 + j - P.M > thr)) s[r * kDecodeBlock + jj] = kNegInf;
          }
        }
      }
      for (int r = 0; r < R; ++r) {  // online softmax of the row over this block
        float* sr = s + r * kDecodeBlock;
        float* mr = m + h * R + r;
        vf mx = splat(*mr);
        for (int g = 0; g < kDecodeBlock; g += kLanes) mx = vmax(mx, load(sr + g));
        const float m_new = hmax(mx);
        const float m_use = m_new == kNegInf ? 0.f : m_new;
        vf sum = {};
        for (int g = 0; g < kDecodeBlock; g += kLanes) {
          const vf p = exp2v(load(sr + g) - m_use);
          store(sr + g, p);
          sum += p;
        }
        alpha[r] = *mr == kNegInf ? 0.f : std::exp2(*mr - m_use);
        l[h * R + r] = l[h * R + r] * alpha[r] + hsum(sum);
        *mr = m_new;
      }
      decode_pv<T, NV>(val, n, s, kDecodeBlock, alpha, R, o + h * R * D);
    }
  }

  for (int64_t h = 0; h < H; ++h) {
    for (int r = 0; r < R; ++r) {
      const int64_t i = h * R + r;
      if (part == nullptr) {
        finish_row<T>(P, b, r / G, h * G + r % G, o + i * D, m[i], l[i], tmp);
      } else {
        const bool empty = !(l[i] > 0.f);
        for (int64_t d = 0; d < D; ++d) part[i * D + d] = empty ? 0.f : o[i * D + d] / l[i];
        part_lse[i] = empty ? kNegInf : (m[i] + std::log2(l[i])) * kLn2;
      }
    }
  }
}

template <typename T, int NV>
void decode(const Problem& P) {
  const int64_t R = P.G * P.Tq, H = P.Hkv, D = NV * kLanes;
  // Keys of row b: the memory and its valid chunk keys (only those are split; causality hides none of them here,
  // since the last query sees every chunk key below kv_len).
  auto row_keys = [&](int64_t b) { return P.M + P.chunk_end(b) - P.chunk_begin(b); };
  // ~4 splits per thread (handed out dynamically), each at least 512 keys (of the largest row), boundaries on decode
  // blocks; each row spreads its own keys over the splits.
  const int64_t threads = at::get_num_threads();
  int64_t n_max = 0;
  for (int64_t b = 0; b < P.B; ++b) n_max = std::max(n_max, row_keys(b));
  const int64_t splits = std::clamp<int64_t>((4 * threads + P.B - 1) / P.B, 1, std::max<int64_t>(1, n_max / 512));
  if (splits == 1) {
    parallel_tasks(P.B, [&](int64_t b) { decode_split<T, NV>(P, b, 0, row_keys(b), nullptr, nullptr); });
    return;
  }
  std::vector<float> part(P.B * splits * H * R * D), part_lse(P.B * splits * H * R);
  std::unique_ptr<std::atomic<int64_t>[]> done(new std::atomic<int64_t>[P.B]());
  // Exact merge of batch b's splits: lse = log sum_s exp(lse_s), out = sum_s exp(lse_s - lse) out_s.
  auto merge_splits = [&](int64_t b) {
    std::vector<float> acc(D);
    for (int64_t hr = 0; hr < H * R; ++hr) {
      const int64_t h = hr / R, r = hr % R;
      float mx = kNegInf;
      for (int64_t sp = 0; sp < splits; ++sp) mx = std::max(mx, part_lse[(b * splits + sp) * H * R + hr]);
      std::fill(acc.begin(), acc.end(), 0.f);
      float l = 0.f;
      for (int64_t sp = 0; sp < splits && mx != kNegInf; ++sp) {
        const float w = std::exp(part_lse[(b * splits + sp) * H * R + hr] - mx);
        const float* src = part.data() + ((b * splits + sp) * H * R + hr) * D;
        for (int64_t d = 0; d < D; ++d) acc[d] += w * src[d];
        l += w;
      }
      // finish_row wants (m, l) in log2 units with acc unnormalised: m = mx / ln 2.
      finish_row<T>(P, b, r / P.G, h * P.G + r % P.G, acc.data(), mx / kLn2, l, acc.data());
    }
  };
  parallel_tasks(P.B * splits, [&](int64_t task) {
    const int64_t b = task / splits, sp = task % splits, n = row_keys(b);
    const int64_t per = round_up((n + splits - 1) / splits, kDecodeBlock);
    decode_split<T, NV>(P, b, std::min(n, sp * per), std::min(n, (sp + 1) * per), part.data() + task * H * R * D,
                        part_lse.data() + task * H * R);
    if (done[b].fetch_add(1) + 1 == splits) merge_splits(b);  // the last split of b to finish merges (no 2nd pass)
  });
}

// ---------------------------------------------------------------------------------------------------------------------
// ops
// ---------------------------------------------------------------------------------------------------------------------

void check_operand(const char* name, const Tensor& t, const Tensor& q, int64_t B, int64_t H, int64_t D) {
  TORCH_CHECK(t.device().is_cpu() && t.dim() == 4 && t.scalar_type() == q.scalar_type(), "memory_attention: ", name,
              " must be a 4-D CPU tensor of q's dtype ", q.scalar_type(), ", got ", t.scalar_type(), " ", t.sizes());
  TORCH_CHECK(t.size(0) == B && t.size(2) == H && t.size(3) == D, "memory_attention: ", name, " has shape ",
              t.sizes(), ", expected [", B, ", T, ", H, ", ", D, "]");
}

// Kernels read rows through strides but need each row (the last dim) dense; other layouts get a dense copy.
Tensor dense_rows(const Tensor& t) { return t.size(-1) <= 1 || t.stride(-1) == 1 ? t : t.contiguous(); }

std::tuple<Tensor, Tensor> memory_attention_cpu(const Tensor& q_in, const Tensor& k_in, const Tensor& v_in,
                                                const std::optional<Tensor>& mem_k, const std::optional<Tensor>& mem_v,
                                                const std::optional<Tensor>& mem_pos,
                                                const std::optional<Tensor>& rope_cos,
                                                const std::optional<Tensor>& rope_sin, double softmax_scale,
                                                bool causal, const std::optional<Tensor>& kv_len,
                                                const std::optional<Tensor>& kv_start) {
  TORCH_CHECK(q_in.device().is_cpu() && q_in.dim() == 4, "memory_attention: q must be a 4-D CPU tensor, got ",
              q_in.sizes());
  const auto dtype = q_in.scalar_type();
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kBFloat16 || dtype == at::kHalf,
              "memory_attention: dtype must be float32, bfloat16 or float16, got ", dtype);
  const int64_t B = q_in.size(0), Tq = q_in.size(1), Hq = q_in.size(2), D = q_in.size(3);
  const int64_t Hkv = k_in.dim() == 4 ? k_in.size(2) : 0;
  TORCH_CHECK(Hkv > 0 && Hq % Hkv == 0, "memory_attention: Hq=", Hq, " must be a multiple of Hkv=", Hkv);
  TORCH_CHECK(D <= 1024, "memory_attention: head dim ", D, " is above the supported 1024");
  check_operand("q", q_in, q_in, B, Hq, D);
  check_operand("k", k_in, q_in, B, Hkv, D);
  check_operand("v", v_in, q_in, B, Hkv, D);
  TORCH_CHECK(v_in.size(1) == k_in.size(1), "memory_attention: k and v must have the same length");
  TORCH_CHECK(mem_k.has_value() == mem_v.has_value(), "memory_attention: give both mem_k and mem_v or neither");
  const Tensor q = dense_rows(q_in), k = dense_rows(k_in), v = dense_rows(v_in);
  Tensor mk, mv, pos, cos, sin;
  const int64_t M = mem_k.has_value() ? mem_k->size(1) : 0;
  Problem P{B, Tq, k.size(1), M, Hq, Hkv, Hq / Hkv, D, view_of(q), view_of(k), view_of(v), {}, {},
            nullptr, nullptr, nullptr, 0, static_cast<float>(softmax_scale) * kLog2e, causal, nullptr, nullptr};
  if (mem_k.has_value()) {
    check_operand("mem_k", *mem_k, q, B, Hkv, D);
    check_operand("mem_v", *mem_v, q, B, Hkv, D);
    TORCH_CHECK(mem_v->size(1) == M, "memory_attention: mem_k and mem_v must have the same length");
    mk = dense_rows(*mem_k);
    mv = dense_rows(*mem_v);
    P.mk = view_of(mk);
    P.mv = view_of(mv);
  }
  if (mem_pos.has_value() && M > 0) {
    TORCH_CHECK(mem_pos->scalar_type() == at::kInt && mem_pos->dim() == 1 && mem_pos->size(0) == M &&
                    mem_pos->device().is_cpu(),
                "memory_attention: mem_pos must be a CPU int32 [M=", M, "] tensor, got ", mem_pos->scalar_type(), " ",
                mem_pos->sizes());
    TORCH_CHECK(D % 2 == 0, "memory_attention: RoPE (mem_pos given) needs an even head dim, got ", D);
    TORCH_CHECK(rope_cos.has_value() && rope_sin.has_value(), "memory_attention: mem_pos needs rope_cos/rope_sin");
    for (const auto& [name, t] : {std::pair{"rope_cos", &*rope_cos}, std::pair{"rope_sin", &*rope_sin}}) {
      TORCH_CHECK(t->scalar_type() == at::kFloat && t->dim() == 2 && t->size(1) == D / 2 && t->device().is_cpu() &&
                      t->sizes() == rope_cos->sizes(),
                  "memory_attention: ", name, " must be a CPU float32 [P, D/2=", D / 2,
                  "] tensor shaped like rope_cos, got ", t->scalar_type(), " ", t->sizes());
    }
    pos = mem_pos->contiguous();
    cos = rope_cos->contiguous();
    sin = rope_sin->contiguous();
    P.pos = pos.data_ptr<int32_t>();
    const int64_t rows = cos.size(0);
    const bool in_range = std::all_of(P.pos, P.pos + M, [&](int32_t p) { return p >= 0 && p < rows; });
    TORCH_CHECK(in_range, "memory_attention: mem_pos values must lie in [0, ", rows, ")");
    P.cos = cos.data_ptr<float>();
    P.sin = sin.data_ptr<float>();
    P.rope_ld = D / 2;
  }
  // Per-row valid chunk keys: what the kernels index the cache with, so every value is checked here.
  const int64_t Tk = k.size(1);
  Tensor len_t, start_t;
  for (const auto& [name, t, dst] :
       {std::tuple{"kv_len", &kv_len, &len_t}, std::tuple{"kv_start", &kv_start, &start_t}}) {
    if (!t->has_value()) continue;
    const Tensor& x = **t;
    TORCH_CHECK(x.scalar_type() == at::kInt && x.dim() == 1 && x.size(0) == B && x.device().is_cpu(),
                "memory_attention: ", name, " must be a CPU int32 [B=", B, "] tensor, got ", x.scalar_type(), " ",
                x.sizes(), " on ", x.device());
    *dst = x.contiguous();
  }
  if (len_t.defined()) P.kv_len = len_t.data_ptr<int32_t>();
  if (start_t.defined()) P.kv_start = start_t.data_ptr<int32_t>();
  for (int64_t b = 0; b < B; ++b) {
    const int64_t lo = P.chunk_begin(b), hi = P.chunk_end(b);
    TORCH_CHECK(0 <= lo && lo <= hi && hi <= Tk, "memory_attention: batch row ", b,
                " needs 0 <= kv_start <= kv_len <= Tk=", Tk, ", got kv_start=", lo, ", kv_len=", hi);
  }
  Tensor out = at::empty({B, Tq, Hq, D}, q.options());
  Tensor lse = at::empty({B, Hq, Tq}, q.options().dtype(at::kFloat));
  if (out.numel() == 0) return {out, lse};
  P.out = out.data_ptr();
  P.lse = lse.data_ptr<float>();

  const bool decode_shape = P.G * Tq <= kMaxDecodeRows && (D == 64 || D == 128 || D == 256);
  auto run = [&](auto tag) {
    using T = decltype(tag);
    if (!decode_shape) return prefill<T>(P);
    if (D == 64) return decode<T, 4>(P);
    if (D == 128) return decode<T, 8>(P);
    return decode<T, 16>(P);
  };
  if (dtype == at::kFloat) run(float{});
  else if (dtype == at::kBFloat16) run(c10::BFloat16{});
  else run(c10::Half{});
  return {out, lse};
}

// Type-erased row conversions (dtype -> fp32 and back) for the merge, whose inputs may differ in dtype.
using LoadRow = void (*)(const void*, float*, int64_t);
using StoreRow = void (*)(void*, const float*, int64_t);
LoadRow row_loader(at::ScalarType t) {
  switch (t) {
    case at::kFloat: return [](const void* s, float* d, int64_t n) { load_row(static_cast<const float*>(s), d, n); };
    case at::kBFloat16:
      return [](const void* s, float* d, int64_t n) { load_row(static_cast<const c10::BFloat16*>(s), d, n); };
    case at::kHalf: return [](const void* s, float* d, int64_t n) { load_row(static_cast<const c10::Half*>(s), d, n); };
    default: TORCH_CHECK(false, "merge_attention_states: dtype must be float32, bfloat16 or float16, got ", t);
  }
}
StoreRow row_storer(at::ScalarType t) {
  switch (t) {
    case at::kFloat: return [](void* d, const float* s, int64_t n) { store_row(static_cast<float*>(d), s, n); };
    case at::kBFloat16:
      return [](void* d, const float* s, int64_t n) { store_row(static_cast<c10::BFloat16*>(d), s, n); };
    default: return [](void* d, const float* s, int64_t n) { store_row(static_cast<c10::Half*>(d), s, n); };
  }
}

std::tuple<Tensor, Tensor> merge_attention_states_cpu(const Tensor& out_a_in, const Tensor& lse_a,
                                                      const Tensor& out_b_in, const Tensor& lse_b) {
  TORCH_CHECK(out_a_in.dim() == 4 && out_b_in.sizes() == out_a_in.sizes(), "merge_attention_states: out_a ",
              out_a_in.sizes(), " and out_b ", out_b_in.sizes(), " must be [B, T, H, D] of the same shape");
  const Tensor out_a = dense_rows(out_a_in), out_b = dense_rows(out_b_in);
  const int64_t B = out_a.size(0), T = out_a.size(1), H = out_a.size(2), D = out_a.size(3);
  for (const Tensor* t : {&out_a, &out_b, &lse_a, &lse_b})
    TORCH_CHECK(t->device().is_cpu(), "merge_attention_states: tensors must be on the CPU, got ", t->device());
  for (const Tensor* t : {&lse_a, &lse_b})
    TORCH_CHECK(t->scalar_type() == at::kFloat && t->dim() == 3 && t->size(0) == B && t->size(1) == H &&
                    t->size(2) == T,
                "merge_attention_states: lse must be float32 [B=", B, ", H=", H, ", T=", T, "], got ",
                t->scalar_type(), " ", t->sizes());
  const LoadRow load_a = row_loader(out_a.scalar_type()), load_b = row_loader(out_b.scalar_type());
  const StoreRow store_o = row_storer(out_a.scalar_type());
  Tensor out = at::empty({B, T, H, D}, out_a.options().memory_format(at::MemoryFormat::Contiguous));
  Tensor lse = at::empty({B, H, T}, lse_a.options().memory_format(at::MemoryFormat::Contiguous));
  if (out.numel() == 0 && lse.numel() == 0) return {out, lse};
  const auto* pa = static_cast<const char*>(out_a.data_ptr());
  const auto* pb = static_cast<const char*>(out_b.data_ptr());
  const int64_t ea = out_a.element_size(), eb = out_b.element_size(), eo = out.element_size();
  const float *la = lse_a.data_ptr<float>(), *lb = lse_b.data_ptr<float>();
  float* lo = lse.data_ptr<float>();
  auto* po = static_cast<char*>(out.data_ptr());
  at::parallel_for(0, B * T * H, 64, [&](int64_t begin, int64_t end) {
    std::vector<float> a(D), bb(D);
    for (int64_t i = begin; i < end; ++i) {
      const int64_t b = i / (T * H), t = i / H % T, h = i % H;
      const float x = la[b * lse_a.stride(0) + h * lse_a.stride(1) + t * lse_a.stride(2)];
      const float y = lb[b * lse_b.stride(0) + h * lse_b.stride(1) + t * lse_b.stride(2)];
      const float mx = std::max(x, y);
      const float l = mx == kNegInf ? kNegInf : mx + std::log1p(std::exp(std::min(x, y) - mx));
      const float wa = l == kNegInf ? 0.f : std::exp(x - l), wb = l == kNegInf ? 0.f : std::exp(y - l);
      load_a(pa + (b * out_a.stride(0) + t * out_a.stride(1) + h * out_a.stride(2)) * ea, a.data(), D);
      load_b(pb + (b * out_b.stride(0) + t * out_b.stride(1) + h * out_b.stride(2)) * eb, bb.data(), D);
      for (int64_t d = 0; d < D; ++d) a[d] = wa * a[d] + wb * bb[d];
      store_o(po + i * D * eo, a.data(), D);
      lo[(b * H + h) * T + t] = l;
    }
  });
  return {out, lse};
}

}  // namespace

TORCH_LIBRARY_IMPL(mplus, CPU, m) {
  m.impl("memory_attention", &memory_attention_cpu);
  m.impl("merge_attention_states", &merge_attention_states_cpu);
}

}  // namespace mplus
