// Memory attention on the CPU, ISA-generic drivers (csrc/cpu/attention.cpp checks the arguments and builds the
// Problem; the files in isa/ compile this once per ISA level inside namespace mplus::<level>, see isa.h).
//
// A chunk of Tq queries attends to [memory (M keys, fully visible, keys rotated here from a position table) ;
// chunk (Tk keys, bottom-right causal)] with native GQA. With a static KV cache, batch row b uses only the chunk keys
// [kv_start[b], kv_len[b]) and its causality is aligned to that row's end: query t sees chunk key j iff
// kv_start[b] <= j < kv_len[b] and (causal) j <= t + kv_len[b] - Tq. Keys outside the range are never read (a static
// cache may hold garbage there). The G = Hq / Hkv query heads of a KV head are processed together, so each K/V row is
// read, converted and rotated once per block of queries, never repeated per head, and no mask tensor exists.
// Flash-style online softmax in fp32 (base 2: Q is pre-scaled by softmax_scale * log2 e).
//
// * prefill: one task per (batch, KV head, block of ~384 query rows = G x queries); the block keeps Q^T, O^T, max and
//   sum in a task-local workspace (L2-resident) while 32-key blocks of K/V stream through fp32 tiles (converted,
//   memory keys rotated, the next block prefetched). Causality is exploited per row group: invisible key blocks
//   are skipped, fully visible ones run unmasked. At the bf16 levels, bf16 inputs run the same tasks on bf16 matrix
//   products instead (attention_prefill_bf16.h).
// * decode (G x Tq <= 8 rows, D in {64, 128, 256}): split-KV (attention_decode.h). One task per (batch, key range);
//   inside it every KV head is processed per 64-key block, each K/V byte is read once; each batch row cuts its own
//   keys (memory + valid chunk keys) into the splits. Each split keeps (max, sum, out) per row; the last split of a
//   batch to finish merges them through the LSEs, in split order.
// Tasks are handed out dynamically (parallel_tasks): the CPUs this runs on are shared with other jobs.
//
// Library headers come from prelude.h (included before the ISA region); this file includes only kernel sources.

namespace mplus {
namespace MPLUS_ISA {
namespace {

using namespace ::mplus::attn;
#include "vec.h"
#include "parallel.h"
#include "attention_kernels.h"

constexpr float kLog2e = 1.4426950408889634f;
constexpr float kLn2 = 0.6931471805599453f;
constexpr int kKeyBlock = 32;                             // prefill keys per tile
constexpr int64_t kTargetRows = 384;                      // prefill query rows per task (G x queries)
static_assert(kKeyBlock % kQkKeys == 0, "tile sizes must divide the blocks");

int64_t round_up(int64_t x, int64_t m) { return (x + m - 1) / m * m; }

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

// Keys j0 .. j0+n-1 of a segment: the memory (rotated by pos when given; jc0 = -1) or the chunk (jc0 = j0, chunk
// blocks start at the row's first valid key, so only the tail of the last one needs a key-bound mask).
struct KeyBlock {
  const View *k = nullptr, *v = nullptr;
  const int32_t* pos = nullptr;
  int64_t j0 = 0, n = 0, jc0 = -1;
};

// A prefill task's walk over its keys, `size` keys a block: the memory's nmem blocks, then the batch row's valid
// chunk keys [jbegin, kv_end), cut to [jbegin, jend), those that at least the task's last query (t0 + nt - 1) sees.
// The fp32 tasks and the bf16 ones walk alike, with their own block sizes.
struct PrefillWalk {
  PrefillWalk(const Problem& P, int64_t b, int64_t t0, int64_t nt, int64_t size)
      : P(P),
        size(size),
        kv_end(P.chunk_end(b)),
        jbegin(P.chunk_begin(b)),
        jend(P.causal ? std::clamp<int64_t>(t0 + nt + kv_end - P.Tq, 0, kv_end) : kv_end),
        nmem((P.M + size - 1) / size),
        nblocks(nmem + (std::max<int64_t>(jend - jbegin, 0) + size - 1) / size) {}

  // Block i < nblocks.
  KeyBlock block(int64_t i) const {
    if (i < nmem) {
      const int64_t j0 = i * size;
      return {&P.mk, &P.mv, P.pos, j0, std::min<int64_t>(size, P.M - j0), -1};
    }
    const int64_t j0 = jbegin + (i - nmem) * size;
    return {&P.k, &P.v, nullptr, j0, std::min<int64_t>(size, jend - j0), j0};
  }

  const Problem& P;
  const int64_t size, kv_end, jbegin, jend, nmem, nblocks;
};

template <typename T>
class PrefillTask {
 public:
  // Scratch floats needed for blocks of up to `rows` query rows.
  static int64_t scratch_size(int64_t rows, int64_t d) {
    const int64_t rp = round_up(rows, kLanes), dp = round_up(d, 8);
    return 2 * dp * leading_dim(rp) + 2 * kKeyBlock * dp + kKeyBlock * kRowVecs * kLanes + 3 * rp + dp;
  }

  // Row stride of Q^T and O^T: an odd number of cache lines, so that walking down a column (the d loop of the
  // micro-kernels) visits every L1 set; 384 rows (24 lines) would map a column onto 24 of the 64 sets.
  static int64_t leading_dim(int64_t rp) {
    const int64_t lines = round_up(rp, 16) / 16;
    return (lines % 2 ? lines : lines + 1) * 16;
  }

  PrefillTask(const Problem& P, float* ws, int64_t b, int64_t h, int64_t t0, int64_t nt)
      : P_(P), b_(b), h_(h), t0_(t0), nt_(nt), rows_(P.G * nt), rp_(round_up(rows_, kLanes)),
        ld_(leading_dim(rp_)), dp_(round_up(P.D, 8)), walk_(P, b, t0, nt, kKeyBlock) {
    QT_ = ws;
    OT_ = QT_ + dp_ * ld_;
    K_ = OT_ + dp_ * ld_;
    V_ = K_ + kKeyBlock * dp_;
    S_ = V_ + kKeyBlock * dp_;
    m_ = S_ + kKeyBlock * kRowVecs * kLanes;
    l_ = m_ + rp_;
    thr_ = l_ + rp_;
    tmp_ = thr_ + rp_;
  }

  void run() {
    const int64_t D = P_.D, G = P_.G;
    // Q^T (scaled), O^T = 0, m = -inf, l = 0, thr[row] = last visible chunk key of the row's query.
    std::fill(QT_, QT_ + 2 * dp_ * ld_, 0.f);
    for (int64_t r = 0; r < rp_; ++r) {
      m_[r] = kNegInf;
      l_[r] = 0.f;
      thr_[r] = r < rows_ ? static_cast<float>(t0_ + r / G + walk_.kv_end - P_.Tq) : 0.f;
    }
    for (int64_t r = 0; r < rows_; ++r) {
      load_row(P_.q.row<T>(b_, t0_ + r / G, h_ * G + r % G), tmp_, D);
      for (int64_t i = 0; i < D; ++i) QT_[i * ld_ + r] = tmp_[i] * P_.scale2;
    }
    for (int64_t i = 0; i < walk_.nblocks; ++i) {
      const KeyBlock blk = block(i);
      pack(*blk.k, blk, blk.pos, K_);
      pack(*blk.v, blk, nullptr, V_);
      key_block(blk, i + 1 < walk_.nblocks ? block(i + 1) : KeyBlock{});
    }
    for (int64_t r = 0; r < rows_; ++r) {
      float* acc = tmp_;  // O^T column r, then finish_row normalises it in place
      for (int64_t i = 0; i < D; ++i) acc[i] = OT_[i * ld_ + r];
      finish_row<T>(P_, b_, t0_ + r / G, h_ * G + r % G, acc, m_[r], l_[r], acc);
    }
  }

 private:
  KeyBlock block(int64_t i) const { return walk_.block(i); }

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
    // Row groups of at most kRowVecs vectors, as even as possible (7 vectors in groups of 3: 3 + 2 + 2, not
    // 3 + 3 + 1): a group of 1 has a load-bound micro-tile (1 vector load + kQkKeys broadcasts per kQkKeys FMAs).
    const int64_t nvec = rp_ / kLanes;
    const int64_t groups = (nvec + kRowVecs - 1) / kRowVecs, small = groups * ((nvec + groups - 1) / groups) - nvec;
    const int64_t n = blk.n, jc0 = P_.causal ? blk.jc0 : -1;
    list_lines(next);
    const int steps = static_cast<int>(groups * (kKeyBlock / 8 + dp_ / 8));  // qk_tile and pv_tile steps
    Prefetcher pf{lines_.data(), static_cast<int>(lines_.size()), 0,
                  static_cast<int>((lines_.size() + steps - 1) / steps)};
    for (int64_t g = 0, r0 = 0, rv = 0; g < groups; ++g, r0 += rv * kLanes) {
      rv = (nvec + groups - 1) / groups - (g >= groups - small ? 1 : 0);
      bool masked = n < kKeyBlock;
      if (jc0 >= 0) {
        const int64_t last_row = std::min<int64_t>(r0 + rv * kLanes, rows_) - 1;
        const int64_t off = t0_ + walk_.kv_end - P_.Tq;  // query t0 + i sees chunk key j iff j <= i + off
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
  const PrefillWalk walk_;
  std::vector<const char*> lines_;
  float *QT_, *OT_, *K_, *V_, *S_, *m_, *l_, *thr_, *tmp_;
};

// Runs Task (PrefillTask<T>, or PrefillBf16Task at the bf16 levels) over every (batch, KV head, query block).
template <typename Task>
void run_prefill(const Problem& P) {
  // Queries per task: ~kTargetRows rows (fewer when that leaves threads idle), spread evenly over the blocks.
  int64_t nq = std::max<int64_t>(1, kTargetRows / P.G);
  const int64_t threads = at::get_num_threads();
  while (nq > 1 && P.B * P.Hkv * ((P.Tq + nq - 1) / nq) < 2 * threads) nq = (nq + 1) / 2;
  const int64_t nblk = (P.Tq + nq - 1) / nq;
  nq = (P.Tq + nblk - 1) / nblk;
  parallel_tasks(
      P.B * P.Hkv * nblk,
      [&] { return Scratch(Task::scratch_size(P.G * nq, P.D)); },  // one scratch per thread
      [&](Scratch& ws, int64_t task) {
        // Last query blocks first: they see the most chunk keys (longest tasks first balances the threads).
        const int64_t qb = nblk - 1 - task % nblk, h = task / nblk % P.Hkv, b = task / nblk / P.Hkv;
        const int64_t t0 = qb * nq;
        Task(P, ws.p, b, h, t0, std::min(nq, P.Tq - t0)).run();
      });
}

#if MPLUS_ISA_LEVEL >= 3
#include "bf16_gemm.h"
#include "attention_prefill_bf16.h"
#endif

#include "attention_decode.h"

// ---------------------------------------------------------------------------------------------------------------------
// merge of two partial attentions
// ---------------------------------------------------------------------------------------------------------------------

template <typename A, typename B, typename O>
void merge_typed(const MergeProblem& P) {
  at::parallel_for(0, P.B * P.T * P.H, 64, [&](int64_t begin, int64_t end) {
    std::vector<float> a(P.D), bb(P.D);
    for (int64_t i = begin; i < end; ++i) {
      const int64_t b = i / (P.T * P.H), t = i / P.H % P.T, h = i % P.H;
      const float x = P.la[b * P.sla[0] + h * P.sla[1] + t * P.sla[2]];
      const float y = P.lb[b * P.slb[0] + h * P.slb[1] + t * P.slb[2]];
      const float mx = std::max(x, y);
      const float l = mx == kNegInf ? kNegInf : mx + std::log1p(std::exp(std::min(x, y) - mx));
      const float wa = l == kNegInf ? 0.f : std::exp(x - l), wb = l == kNegInf ? 0.f : std::exp(y - l);
      load_row(reinterpret_cast<const A*>(P.a) + b * P.sa[0] + t * P.sa[1] + h * P.sa[2], a.data(), P.D);
      load_row(reinterpret_cast<const B*>(P.b) + b * P.sb[0] + t * P.sb[1] + h * P.sb[2], bb.data(), P.D);
      for (int64_t d = 0; d < P.D; ++d) a[d] = wa * a[d] + wb * bb[d];
      store_row(reinterpret_cast<O*>(P.out) + i * P.D, a.data(), P.D);
      P.lse[(b * P.H + h) * P.T + t] = l;
    }
  });
}

// Calls f(tag) with a value of the C++ type of a float32 / bfloat16 / float16 dtype (the op checked it is one).
template <typename F>
void with_dtype(c10::ScalarType t, F&& f) {
  if (t == c10::ScalarType::Float) f(float{});
  else if (t == c10::ScalarType::BFloat16) f(c10::BFloat16{});
  else f(c10::Half{});
}

}  // namespace

void attention_kernel(const Problem& P, c10::ScalarType dtype) {
  const bool decode_shape = P.G * P.Tq <= kMaxDecodeRows && (P.D == 64 || P.D == 128 || P.D == 256);
  with_dtype(dtype, [&](auto tag) {
    using T = decltype(tag);
#if MPLUS_ISA_LEVEL >= 3
    // bf16 inputs take the bf16 matrix products (attention_prefill_bf16.h); fp32 and fp16 ones the fp32 kernels
    if (!decode_shape && std::is_same_v<T, c10::BFloat16>) return run_prefill<PrefillBf16Task>(P);
#endif
    if (!decode_shape) return run_prefill<PrefillTask<T>>(P);
    if (P.D == 64) return decode<T, 64 / kLanes>(P);
    if (P.D == 128) return decode<T, 128 / kLanes>(P);
    return decode<T, 256 / kLanes>(P);
  });
}

// rotate_keys: one task per ~32 (batch row, key) pairs; each row is read once, widened, rotated (rotate_half's
// convention) and rounded to its dtype. Each product is rounded before the sum: the asm barriers keep the compiler
// from fusing a product into the add (an FMA rounds once, so the bits would depend on the ISA level), which makes
// the result the reference's (rotate_keys_reference: torch's separate products) at every level.
inline void rotate_pair(vf a, vf x, vf cs, vf sn, vf& lo, vf& hi) {
  vf ac = a * cs, xs = x * sn, xc = x * cs, as = a * sn;
  asm("" : "+v"(ac), "+v"(xs), "+v"(xc), "+v"(as));
  lo = ac - xs;
  hi = xc + as;
}

template <typename T>
void rotate_typed(const RotateProblem& P) {
  const int64_t half = P.D / 2, rows = P.B * P.N;
  at::parallel_for(0, rows, 32, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const int64_t b = i / P.N, n = i % P.N;
      const float* c = P.cos + P.pos[n] * half;
      const float* s = P.sin + P.pos[n] * half;
      for (int64_t h = 0; h < P.H; ++h) {
        const T* src = P.k.row<T>(b, n, h);
        T* dst = static_cast<T*>(P.out) + (i * P.H + h) * P.D;
        vf lo, hi;
        int64_t d = 0;
        for (; d + kLanes <= half; d += kLanes) {
          rotate_pair(load_cvt(src + d), load_cvt(src + half + d), load(c + d), load(s + d), lo, hi);
          store_cvt(dst + d, lo);
          store_cvt(dst + half + d, hi);
        }
        if (d < half) {  // the last dims of a head dim that is not a multiple of 2 x kLanes, padded with zeros
          const int64_t m = half - d;
          alignas(64) float t[6][kLanes] = {};
          for (int64_t j = 0; j < m; ++j) {
            t[0][j] = static_cast<float>(src[d + j]);
            t[1][j] = static_cast<float>(src[half + d + j]);
            t[2][j] = c[d + j];
            t[3][j] = s[d + j];
          }
          rotate_pair(load(t[0]), load(t[1]), load(t[2]), load(t[3]), lo, hi);
          store(t[4], lo);
          store(t[5], hi);
          for (int64_t j = 0; j < m; ++j) {
            dst[d + j] = static_cast<T>(t[4][j]);
            dst[half + d + j] = static_cast<T>(t[5][j]);
          }
        }
      }
    }
  });
}

void rotate_kernel(const RotateProblem& P) {
  with_dtype(P.type, [&](auto tag) { rotate_typed<decltype(tag)>(P); });
}

void merge_kernel(const MergeProblem& P) {
  with_dtype(P.ta, [&](auto a) {
    with_dtype(P.tb, [&](auto b) { merge_typed<decltype(a), decltype(b), decltype(a)>(P); });
  });
}

}  // namespace MPLUS_ISA
}  // namespace mplus
