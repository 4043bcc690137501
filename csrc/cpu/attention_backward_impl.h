// The backward of memory attention on the CPU, ISA-generic (csrc/cpu/attention_backward.cpp checks the arguments
// and builds the BackwardProblem; the files in isa/ compile this once per ISA level inside namespace
// mplus::<level>, see isa.h). FlashAttention-2 recompute from the saved LSE, in fp32:
//   p = exp(scale·q·k − lse), dV += pᵀ·dO, dP = dO·Vᵀ, dS = p ∘ (dP − Δ + dlse), dK += scale·dSᵀ·Q, dQ += scale·dS·K
//
// One pass, GEMM-style. A task owns (batch, KV head, split): a fixed run of consecutive blocks of kKeyBlock keys of
// [memory ; valid chunk keys]. The R = G·Tq query rows of the KV head's G query heads (row r = query t·G + head g),
// copied into dense task-local rows (at most kMaxRows of them per pass over the blocks), stream past each key block
// in chunks of kRowChunk rows:
//   S = Q·Kᵀ and dP = dO·Vᵀ  a micro-tile of kScoreRows rows × kScoreVecs vectors of keys at a time, from the block's
//                            keys/values transposed into [D][kKeyBlock] tiles (each S row a broadcast-FMA over D, no
//                            horizontal sums), then p and dS lane-wise into [kRowChunk][kKeyBlock] tiles;
//   dV += Pᵀ·dO, dK += dSᵀ·Q  kAccRows keys × kAccVecs vectors of D in registers while the chunk's rows stream;
//   dQ += dS·K               kAccRows rows × kAccVecs vectors while the block's keys stream, into the task's fp32
//                            [rows][D] accumulator.
// So S and dP are computed once per (query, key), not once for dK/dV and again for dQ (5 matmuls instead of 7).
// Every output has one writer: dK/dV rows belong to the task of their block; dQ is summed over keys in increasing
// order inside each split and the splits' partial dQ are added in split order at the end. The number of splits
// depends on the shapes only (enough tasks for the threads of a big machine when B·Hkv is small, never shorter than
// kMinSplitBlocks blocks, at most kMaxSplits), so the reduction order, hence every bit of the result, is independent
// of the thread count. Extra memory: (splits − 1) fp32 copies of dq, and per thread the scratch of one task (Q, dO, dQ
// of at most kMaxRows rows, and the tiles of one key block: ~1.6 MB at D = 128).
// Keys outside [kv_start, kv_len) are never read (a static cache may hold garbage there).
// At the bf16 levels (avx512_bf16, amx), bf16 inputs run the same tasks and splits on bf16 matrix products instead
// (attention_backward_bf16.h); fp32 and fp16 inputs this kernel.
//
// Library headers come from prelude.h (included before the ISA region); this file includes only kernel sources.

namespace mplus {
namespace MPLUS_ISA {
namespace {

using namespace ::mplus::attn;
#include "vec.h"
#include "parallel.h"

// Micro-tiles sized to the register file (32 zmm / 16 ymm, xmm), measured best at the benchmark's shape (D 128) on an
// AVX-512 + AMX Xeon core: S/dP kScoreRows × kScoreVecs accumulators plus the kScoreVecs key vectors and the broadcast
// element; C += AᵀB kAccRows × kAccVecs accumulators plus kAccVecs row vectors and the broadcast.
#if MPLUS_ISA_LEVEL >= 2
constexpr int kScoreRows = 8, kScoreVecs = 3;
constexpr int kAccRows = 6, kAccVecs = 4;
constexpr int kKeyBlock = 96;  // keys per block (the P / dS tiles' row length)
#else
constexpr int kScoreRows = 6, kScoreVecs = 2;
constexpr int kAccRows = 6, kAccVecs = 2;
constexpr int kKeyBlock = 64;
#endif
static_assert(kScoreRows * kScoreVecs + kScoreVecs + 1 <= kVectorRegisters, "S micro-tile exceeds the register file");
static_assert(kAccRows * kAccVecs + kAccVecs + 1 <= kVectorRegisters,
              "accumulation micro-tile exceeds the register file");

constexpr int kScoreKeys = kScoreVecs * kLanes;  // keys per S micro-tile
constexpr int64_t kRowChunk = 64;                // query rows per P / dS tile
constexpr int64_t kMaxRows = 1024;               // query rows per pass of a task over its key blocks
constexpr int64_t kMinSplitBlocks = 16;          // a split has at least this many key blocks ...
constexpr int64_t kTargetTasks = 32;             // ... and there are splits enough for this many tasks ...
constexpr int64_t kMaxSplits = 8;                // ... but at most this many (each holds a dQ the size of dq)
constexpr float kLog2e = 1.4426950408889634f;
static_assert(kKeyBlock % kScoreKeys == 0, "key block must be a whole number of S micro-tiles");

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// f(std::integral_constant<int, n>{}) for a run-time n in [1, N]: the micro-kernels' tails at compile-time sizes.
template <int N, typename F>
inline void with_count(int n, const F& f) {
  if constexpr (N > 1) {
    if (n < N) return with_count<N - 1>(n, f);
  }
  f(std::integral_constant<int, N>{});
}

// Transposes the kLanes x kLanes block v (v[i][l] <-> v[l][i]) in log2(kLanes) steps of shuffles: step S swaps bit
// S of the row and lane indices (elements whose row and lane differ in that bit trade places).
template <int S = 1>
inline void transpose(vf* v) {
  if constexpr (S < kLanes) {
    constexpr vi lo = index_vector([](int l) { return (l & S) ? kLanes + l - S : l; });
    constexpr vi hi = index_vector([](int l) { return (l & S) ? kLanes + l : l + S; });
    for (int i = 0; i < kLanes; ++i) {
      if (i & S) continue;
      const vf a = v[i], b = v[i + S];
      v[i] = __builtin_shuffle(a, b, lo);
      v[i + S] = __builtin_shuffle(a, b, hi);
    }
    transpose<2 * S>(v);
  }
}

// acc[r][c] = Σ_{d < D} x[r][d] · T[d][c·kLanes ..]: RR rows against KV vectors of keys of a transposed [D][kKeyBlock]
// tile (T points at the micro-tile's first key). The d order is fixed.
template <int RR, int KV>
inline void score_tile(const float* const* x, const float* T, int64_t D, vf (&acc)[RR][KV]) {
  const float* xr[RR];
  for (int r = 0; r < RR; ++r) xr[r] = x[r];
  for (int r = 0; r < RR; ++r)
    for (int c = 0; c < KV; ++c) acc[r][c] = vf{};
  for (int64_t d = 0; d < D; ++d) {
    vf k[KV];
    for (int c = 0; c < KV; ++c) k[c] = load(T + d * kKeyBlock + c * kLanes);
    for (int r = 0; r < RR; ++r) {
      const float xv = xr[r][d];  // a scalar: broadcast straight from memory (splat() would first add a 0)
      for (int c = 0; c < KV; ++c) acc[r][c] += xv * k[c];
    }
  }
}

// C[m][v] += Σ_{k < K} A(k, m) · B[k][v] for MR rows m of C (row stride ldc) and NV vectors v: A is a P or dS tile
// ([rows][kKeyBlock]); kRowsOfA: A(k, m) = A[m][k] (dQ += dS·K, m a query row, k a key), else A(k, m) = A[k][m]
// (dV += Pᵀ·dO, dK += dSᵀ·Q, m a key, k a query row). B[k] + off is row k's first vector. The k order is fixed.
template <int MR, int NV, bool kRowsOfA>
inline void acc_tile(float* C, int64_t ldc, const float* A, const float* const* B, int64_t off, int64_t K) {
  constexpr int64_t am = kRowsOfA ? kKeyBlock : 1, ak = kRowsOfA ? 1 : kKeyBlock;
  vf acc[MR][NV];
  for (int m = 0; m < MR; ++m)
    for (int v = 0; v < NV; ++v) acc[m][v] = load(C + m * ldc + v * kLanes);
  for (int64_t k = 0; k < K; ++k) {
    const float* b = B[k] + off;
    vf bv[NV];
    for (int v = 0; v < NV; ++v) bv[v] = load(b + v * kLanes);
    const float* a = A + k * ak;
    for (int m = 0; m < MR; ++m) {
      const float av = a[m * am];
      for (int v = 0; v < NV; ++v) acc[m][v] += av * bv[v];
    }
  }
  for (int m = 0; m < MR; ++m)
    for (int v = 0; v < NV; ++v) store(C + m * ldc + v * kLanes, acc[m][v]);
}

// The key blocks of a task's (batch row, KV head): [memory ; valid chunk keys of the row] in blocks of kKeyBlock, the
// memory's first; and the cache lines of a block's K and V rows (fp32 rows of D), prefetched a few at a time while the
// block before it is processed: the rows are read once per task, from L3 or memory. The walk of both the fp32 and the
// bf16 tasks.
class KeyBlockWalk {
 public:
  explicit KeyBlockWalk(const BackwardProblem& P) : P_(P), nmem_(ceil_div(P.M, kKeyBlock)) {}

  void start(int64_t b, int64_t h) {
    b_ = b;
    h_ = h;
  }

  // Whether block i is one of the memory's (they come first).
  bool memory(int64_t i) const { return i < nmem_; }

  // Keys [j0, j0 + n) of block i, in the memory or the chunk.
  void keys(int64_t i, int64_t& j0, int64_t& n) const {
    const bool mem = i < nmem_;
    j0 = mem ? i * kKeyBlock : P_.chunk_begin(b_) + (i - nmem_) * kKeyBlock;
    n = std::min<int64_t>(kKeyBlock, (mem ? P_.M : P_.chunk_end(b_)) - j0);
  }

  // Lists the lines of block i's K and V rows (none for i < 0) for prefetch_some.
  void list_lines(int64_t i) {
    lines_.clear();
    next_line_ = 0;
    if (i < 0) return;
    int64_t j0, n;
    keys(i, j0, n);
    const bool mem = i < nmem_;
    const Rows &K = mem ? P_.mk : P_.k, &V = mem ? P_.mv : P_.v;
    for (int64_t j = j0; j < j0 + n; ++j) {
      const char *k = reinterpret_cast<const char*>(K.row(b_, j, h_)),
                 *v = reinterpret_cast<const char*>(V.row(b_, j, h_));
      for (int64_t off = 0; off < P_.D * static_cast<int64_t>(sizeof(float)); off += 64) {
        lines_.push_back(k + off);
        lines_.push_back(v + off);
      }
    }
  }

  int64_t lines() const { return static_cast<int64_t>(lines_.size()); }

  void prefetch_some(int64_t count) {
    for (const int64_t e = std::min<int64_t>(next_line_ + count, lines()); next_line_ < e; ++next_line_)
      prefetch_line(lines_[next_line_]);
  }

 private:
  const BackwardProblem& P_;
  const int64_t nmem_;
  int64_t b_ = 0, h_ = 0;
  std::vector<const char*> lines_;
  int64_t next_line_ = 0;
};

// One task: the key blocks [block_begin, block_end) of (batch b, KV head h), against every query row of the head.
class BackwardTask {
 public:
  // Scratch floats of a task of problem P.
  static int64_t scratch_size(const BackwardProblem& P) {
    const int64_t R = std::min(P.G * P.Tq, kMaxRows), dp = padded(P.D);
    return 3 * R * dp + 2 * P.D * kKeyBlock + 3 * kKeyBlock * dp + 2 * kRowChunk * kKeyBlock + 2 * R;
  }

  explicit BackwardTask(const BackwardProblem& P)
      : P_(P), ws_(scratch_size(P)), R_(P.G * P.Tq), D_(P.D), dp_(padded(P.D)), nv_(dp_ / kLanes),
        walk_(P), qrow_(std::min(R_, kMaxRows)), orow_(qrow_.size()),
        krow_(kKeyBlock), lim_(kRowChunk) {
    const int64_t rows = std::min(R_, kMaxRows);
    dq_ = ws_.p;
    qpack_ = dq_ + rows * dp_;
    opack_ = qpack_ + rows * dp_;
    KT_ = opack_ + rows * dp_;
    VT_ = KT_ + D_ * kKeyBlock;
    Kr_ = VT_ + D_ * kKeyBlock;
    dk_ = Kr_ + kKeyBlock * dp_;
    dv_ = dk_ + kKeyBlock * dp_;
    Pt_ = dv_ + kKeyBlock * dp_;
    dSt_ = Pt_ + kRowChunk * kKeyBlock;
    lse2_ = dSt_ + kRowChunk * kKeyBlock;
    cf_ = lse2_ + rows;
  }

  // Blocks of batch row b: the memory's, then those of its valid chunk keys.
  static int64_t blocks(const BackwardProblem& P, int64_t b) {
    return ceil_div(P.M, kKeyBlock) + ceil_div(P.chunk_end(b) - P.chunk_begin(b), kKeyBlock);
  }

  // dK, dV of the blocks [block_begin, block_end) of (b, h) into the outputs; these blocks' dQ of the head's queries
  // ([B, Tq, Hq, D] layout, every row of the head written) into dq_out. The rows go past the blocks kMaxRows at a
  // time (the scratch of a task stays bounded), the dK/dV of a block carried between passes in the outputs: every
  // sum still runs over the rows (dK, dV) or the keys (dQ) in increasing order, into one accumulator, whatever the
  // number of passes.
  void run(int64_t b, int64_t h, int64_t block_begin, int64_t block_end, float* dq_out) {
    b_ = b;
    h_ = h;
    walk_.start(b, h);
    for (int64_t rb = 0; rb < R_; rb += kMaxRows) {
      rb_ = rb;
      re_ = std::min(R_, rb + kMaxRows);
      start_rows();
      for (int64_t i = block_begin; i < block_end; ++i) {
        walk_.list_lines(i + 1 < block_end ? i + 1 : -1);
        key_block(i);
      }
      for (int64_t r = rb_; r < re_; ++r) {
        const int64_t t = r / P_.G, hq = h_ * P_.G + r % P_.G;
        std::copy_n(dq_ + (r - rb_) * dp_, D_, dq_out + ((b_ * P_.Tq + t) * P_.Hq + hq) * D_);
      }
    }
  }

 private:
  static int64_t padded(int64_t d) { return ceil_div(d, kLanes) * kLanes; }

  // The pass's rows [rb_, re_) of Q and dO copied into dense, zero-padded [rows][dp] buffers (in the [B, T, H, D]
  // inputs, the rows of a chunk are Hq·D floats apart and fall into a few L1 sets; the padding keeps every vector
  // load inside its row), their constants, and dQ = 0. Local row r - rb_ holds task row r.
  void start_rows() {
    const float log2e = kLog2e;
    for (int64_t r = rb_; r < re_; ++r) {
      const int64_t t = r / P_.G, hq = h_ * P_.G + r % P_.G, l = r - rb_;
      const int64_t i = (b_ * P_.Hq + hq) * P_.Tq + t;
      lse2_[l] = P_.lse[i] * log2e;  // +inf (a query that saw nothing) gives p = 0
      cf_[l] = P_.coef[i];
      float *qp = qpack_ + l * dp_, *op = opack_ + l * dp_;
      std::copy_n(P_.q.row(b_, t, hq), D_, qp);
      std::copy_n(P_.dout.row(b_, t, hq), D_, op);
      std::fill(qp + D_, qp + dp_, 0.f);
      std::fill(op + D_, op + dp_, 0.f);
      qrow_[l] = qp;
      orow_[l] = op;
    }
    std::fill(dq_, dq_ + (re_ - rb_) * dp_, 0.f);
  }

  // K and V of keys [j0, j0 + n) into the transposed tiles KT, VT (zero columns up to the last S micro-tile) and K
  // into dense zero-padded rows Kr (for dQ += dS·K), as Q and dO.
  void pack(const Rows& K, const Rows& V, int64_t j0, int64_t n) {
    const int64_t cols = ceil_div(n, kScoreKeys) * kScoreKeys, dv = D_ / kLanes * kLanes;
    const float *kp[kKeyBlock], *vp[kKeyBlock];
    for (int64_t j = 0; j < n; ++j) {
      kp[j] = K.row(b_, j0 + j, h_);
      vp[j] = V.row(b_, j0 + j, h_);
      float* kr = Kr_ + j * dp_;
      std::copy_n(kp[j], D_, kr);
      std::fill(kr + D_, kr + dp_, 0.f);
      krow_[j] = kr;
    }
    // kLanes x kLanes blocks transposed in registers; the dims past the last whole vector one at a time
    for (int64_t jg = 0; jg < cols; jg += kLanes) {
      for (int64_t d0 = 0; d0 < dv; d0 += kLanes) {
        for (const auto& [src, dst] : {std::pair{kp, KT_}, std::pair{vp, VT_}}) {
          vf x[kLanes];
          for (int jj = 0; jj < kLanes; ++jj) x[jj] = jg + jj < n ? load(src[jg + jj] + d0) : vf{};
          transpose(x);
          for (int dd = 0; dd < kLanes; ++dd) store(dst + (d0 + dd) * kKeyBlock + jg, x[dd]);
        }
      }
      for (int64_t d = dv; d < D_; ++d) {
        for (int64_t j = jg; j < jg + kLanes; ++j) {
          KT_[d * kKeyBlock + j] = j < n ? kp[j][d] : 0.f;
          VT_[d * kKeyBlock + j] = j < n ? vp[j][d] : 0.f;
        }
      }
    }
  }

  void key_block(int64_t i) {
    const bool mem = walk_.memory(i);
    const int64_t kv_end = P_.chunk_end(b_);
    int64_t j0, n;
    walk_.keys(i, j0, n);
    pack(mem ? P_.mk : P_.k, mem ? P_.mv : P_.v, j0, n);
    // dK, dV so far: 0 on the first pass over the rows, else what the previous passes left in the outputs
    float* dk_out = mem ? P_.dmk_rot + (b_ * P_.M + j0) * P_.Hkv * D_ : P_.dk + (b_ * P_.Tk + j0) * P_.Hkv * D_;
    float* dv_out = mem ? P_.dmv + (b_ * P_.M + j0) * P_.Hkv * D_ : P_.dv + (b_ * P_.Tk + j0) * P_.Hkv * D_;
    if (rb_ == 0) {
      std::fill(dk_, dk_ + n * dp_, 0.f);
      std::fill(dv_, dv_ + n * dp_, 0.f);
    } else {
      for (int64_t j = 0; j < n; ++j) {
        std::copy_n(dk_out + (j * P_.Hkv + h_) * D_, D_, dk_ + j * dp_);
        std::copy_n(dv_out + (j * P_.Hkv + h_) * D_, D_, dv_ + j * dp_);
      }
    }
    const int nsub = static_cast<int>(ceil_div(n, kScoreKeys));
    // causal chunk keys: query t sees key j iff j < visible_end(t), so the rows before t_min · G see none of the block
    const bool masked = !mem && P_.causal;
    const int64_t t_min = masked ? std::clamp<int64_t>(j0 + P_.Tq - kv_end, 0, P_.Tq) : 0;
    const int64_t first = std::max(rb_, t_min * P_.G) - rb_, rows = re_ - rb_;  // local rows
    const int64_t per_chunk =
        ceil_div(walk_.lines(), std::max<int64_t>(ceil_div(rows - first, kRowChunk), 1));
    for (int64_t r0 = first; r0 < rows; r0 += kRowChunk) {
      walk_.prefetch_some(per_chunk);
      const int64_t nr = std::min(kRowChunk, rows - r0);
      for (int64_t r = 0; r < nr; ++r)
        lim_[r] = masked ? static_cast<int>(std::clamp<int64_t>(P_.visible_end(b_, (rb_ + r0 + r) / P_.G) - j0, 0, n))
                         : static_cast<int>(n);
      for (int64_t s0 = 0; s0 < nr; s0 += kScoreRows) {
        const int rr = static_cast<int>(std::min<int64_t>(kScoreRows, nr - s0));
        with_count<kScoreRows>(rr, [&](auto RR) { score_rows<decltype(RR)::value>(r0 + s0, s0, nsub); });
      }
      accumulate<false>(dv_, n, Pt_, orow_.data() + r0, nr);        // dV += Pᵀ·dO
      accumulate<false>(dk_, n, dSt_, qrow_.data() + r0, nr);       // dK += dSᵀ·Q
      accumulate<true>(dq_ + r0 * dp_, nr, dSt_, krow_.data(), n);  // dQ += dS·K
    }
    walk_.prefetch_some(walk_.lines());
    for (int64_t j = 0; j < n; ++j) {
      std::copy_n(dk_ + j * dp_, D_, dk_out + (j * P_.Hkv + h_) * D_);
      std::copy_n(dv_ + j * dp_, D_, dv_out + (j * P_.Hkv + h_) * D_);
    }
  }

  // p and dS of the RR local rows [r0, r0 + RR) (tile rows [pr, pr + RR)) against the block's keys, nsub S
  // micro-tiles of them; lanes at or past a row's key limit get p = dS = 0.
  template <int RR>
  void score_rows(int64_t r0, int64_t pr, int nsub) {
    constexpr vi lane = index_vector([](int i) { return i; });
    const vf c = splat(P_.scale * kLog2e), sc = splat(P_.scale);
    for (int st = 0; st < nsub; ++st) {
      const int c0 = st * kScoreKeys;
      vf s[RR][kScoreVecs];
      // base 2: exp(scale·s − lse) = 2^(scale·log2e·s − log2e·lse)
      score_tile<RR, kScoreVecs>(qrow_.data() + r0, KT_ + c0, D_, s);
      for (int r = 0; r < RR; ++r) {
        const vf shift = splat(lse2_[r0 + r]);
        const vi lim = vi{} + (lim_[pr + r] - c0);
        float* p = Pt_ + (pr + r) * kKeyBlock + c0;
        for (int v = 0; v < kScoreVecs; ++v) {
          const vf pv = exp2v(s[r][v] * c - shift);
          store(p + v * kLanes, lane + v * kLanes < lim ? pv : vf{});
        }
      }
      score_tile<RR, kScoreVecs>(orow_.data() + r0, VT_ + c0, D_, s);  // dP = dO·Vᵀ
      for (int r = 0; r < RR; ++r) {
        const vf cf = splat(cf_[r0 + r]);
        const float* p = Pt_ + (pr + r) * kKeyBlock + c0;
        float* ds = dSt_ + (pr + r) * kKeyBlock + c0;
        for (int v = 0; v < kScoreVecs; ++v) store(ds + v * kLanes, sc * load(p + v * kLanes) * (s[r][v] + cf));
      }
    }
  }

  // C[m][:] += Σ_{k < K} A(k, m) · B[k][:] for the m < M rows of C (row stride dp), in kAccRows × kAccVecs tiles.
  template <bool kRowsOfA>
  void accumulate(float* C, int64_t M, const float* A, const float* const* B, int64_t K) {
    for (int64_t v0 = 0; v0 < nv_; v0 += kAccVecs) {
      const int nv = static_cast<int>(std::min<int64_t>(kAccVecs, nv_ - v0));
      for (int64_t m0 = 0; m0 < M; m0 += kAccRows) {
        const int mr = static_cast<int>(std::min<int64_t>(kAccRows, M - m0));
        float* c = C + m0 * dp_ + v0 * kLanes;
        const float* a = A + (kRowsOfA ? m0 * kKeyBlock : m0);
        with_count<kAccRows>(mr, [&](auto MR) {
          with_count<kAccVecs>(nv, [&](auto NV) {
            acc_tile<decltype(MR)::value, decltype(NV)::value, kRowsOfA>(c, dp_, a, B, v0 * kLanes, K);
          });
        });
      }
    }
  }

  const BackwardProblem& P_;
  Scratch ws_;
  const int64_t R_, D_, dp_, nv_;
  int64_t b_ = 0, h_ = 0, rb_ = 0, re_ = 0;  // the task's (batch, KV head), the pass's task rows [rb_, re_)
  KeyBlockWalk walk_;
  std::vector<const float*> qrow_, orow_, krow_;
  std::vector<int> lim_;
  float *dq_, *qpack_, *opack_, *KT_, *VT_, *Kr_, *dk_, *dv_, *Pt_, *dSt_, *lse2_, *cf_;
};

#if MPLUS_ISA_LEVEL >= 3
#include "bf16_gemm.h"
#include "attention_backward_bf16.h"
#endif

// Runs Task (BackwardTask, or BackwardBf16Task at the bf16 levels) over every (batch, KV head, split of the key
// blocks); the splits are fixed by the shapes (never by the thread count), and so is every sum's order.
template <typename Task>
void run_backward(const BackwardProblem& P) {
  const int64_t max_blocks = ceil_div(P.M, kKeyBlock) + ceil_div(P.Tk, kKeyBlock);
  const int64_t heads = P.B * P.Hkv;
  const int64_t want = std::min({ceil_div(max_blocks, kMinSplitBlocks), ceil_div(kTargetTasks, heads), kMaxSplits});
  const int64_t per_split = std::max<int64_t>(1, ceil_div(max_blocks, std::max<int64_t>(want, 1)));
  const int64_t splits = std::max<int64_t>(1, ceil_div(max_blocks, per_split));
  const int64_t dq_size = P.B * P.Tq * P.Hq * P.D;
  Scratch partial((splits - 1) * dq_size);  // dQ of splits 1, 2, ... (split 0 writes dq)
  parallel_tasks(
      heads * splits,
      [&] { return std::make_unique<Task>(P); },
      [&](auto& task, int64_t i) {
        const int64_t s = i / heads, b = i % heads / P.Hkv, h = i % P.Hkv;
        const int64_t n = BackwardTask::blocks(P, b);
        task->run(b, h, std::min(n, s * per_split), std::min(n, (s + 1) * per_split),
                  s == 0 ? P.dq : partial.p + (s - 1) * dq_size);
      });
  if (splits > 1) {
    at::parallel_for(0, dq_size, 1 << 14, [&](int64_t begin, int64_t end) {
      for (int64_t s = 1; s < splits; ++s) {
        const float* src = partial.p + (s - 1) * dq_size;
        for (int64_t i = begin; i < end; ++i) P.dq[i] += src[i];
      }
    });
  }
}

}  // namespace

void attention_backward_kernel(const BackwardProblem& P) {
#if MPLUS_ISA_LEVEL >= 3
  // bf16 inputs take the bf16 matrix products (attention_backward_bf16.h); fp32 and fp16 ones the fp32 kernel
  if (P.bf16) return run_backward<BackwardBf16Task>(P);
#endif
  run_backward<BackwardTask>(P);
}

}  // namespace MPLUS_ISA
}  // namespace mplus
