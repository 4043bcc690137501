// The memory-attention backward on bf16 matrix products (the avx512_bf16 and amx levels, bf16 inputs). Included by
// attention_backward_impl.h inside namespace mplus::<level>, after bf16_gemm.h (gemm_bf16: vdpbf16ps, or ATen's
// brgemm at amx). The amx level could not run on the Zen 4 this was written on (no AMX tiles): it is this code with
// brgemm products, checked there only through oneDNN's avx512_core_bf16 kernels (the avx512_bf16 level built with
// brgemm in place of the micro-kernel, once: every backward test passed), as the prefill's was (bf16_gemm.h).
//
// The tasks are BackwardTask's (batch, KV head, split of key blocks; one pass per kMaxRows query rows; the same
// splits, hence bits independent of the thread count), in the transposed layout "keys in M": per block of kKeyBlock
// keys, per chunk of kRows query rows (row r = query t·G + head g),
//   Sᵀ[keys][rows]  = K·Qᵀ      gemm over the head dim (padded to dp); rotated memory keys [hi | lo]·[Q ; Q]
//   dPᵀ[keys][rows] = V·dOᵀ     gemm over the head dim
//   p, dS lane-wise along rows, in fp32: p = 2^(c·s − lse₂) (the row's lse a vector load), masks by a per-row key
//                               limit, dS = scale·p·(dP + dlse − Δ); Pᵀ and dSᵀ rounded to bf16
//   dV[keys][D] += Pᵀ·dO        gemm over the chunk's rows, into the block's fp32 dV (kept across chunks)
//   dK[keys][D] += dSᵀ·Q        likewise
//   dQᵀ[D][rows] += Kᵀ·dSᵀ      gemm over the block's keys, into the pass's fp32 dQᵀ (transposed back at the end)
// The transposed layout makes the softmax lane-wise over rows (a row's lse, Δ and key limit are one vector each) and
// the dV/dK products' A operands (Pᵀ, dSᵀ) plain row-major tiles; Q and dO are packed once per pass into the three
// operand layouts the products read (bf16_gemm.h's VNNI: pairs of dims for Sᵀ/dPᵀ, pairs of rows for dV/dK), K and V
// once per block (rows, and Kᵀ), dSᵀ once more per chunk as pairs of keys (B of dQᵀ). Every sum runs in an order
// fixed by the shapes (keys ascending within a split, rows ascending within a block, splits added in order).
//
// Precision (the fp32 kernel's recurrence; attention_backward_impl.h). Q, dO, K, V are bf16 numbers (the inputs'
// dtype), so their products are exact and summed in fp32, as the fp32 kernel does after widening; p and dS are
// computed in fp32 from the fp32 Sᵀ, dPᵀ. New roundings, each measured alone by an fp64 emulation of this recurrence
// (max |change| of a gradient before its bf16 output rounding, relative to the gradient's max |value|; one bf16
// rounding of the output is 2⁻⁹ = 2.0e-3 relative) at three shapes (B, Tq, Tk, Hq, Hkv, D, M): the bf16 case of
// tests/test_attention_backward_cpu.py (2, 6, 9, 8, 2, 64, 7), (1, 129, 129, 8, 1, 128, 200) and
// (1, 256, 256, 8, 2, 128, 1000):
// * a rotated memory key is no bf16 number. Rounding it in Sᵀ changes p = exp(S − lse) systematically per key,
//   against the LSE the forward saved: Σp − 1 reaches 1.7e-3 and dq, dmem_k, dmem_v change by 1.3-4.6e-3, growing
//   with the shape (2.3x the output's rounding at the third). So Sᵀ runs [hi | lo]·[Q ; Q] with hi = bf16(k),
//   lo = bf16(k − hi) (16 significant bits), as the forward prefill does: changes 2.4-6.7e-6, Σp − 1 below 1e-6;
// * Pᵀ and dSᵀ are rounded to bf16 as operands of dV, dK, dQ (torch's CPU flash attention backward does the same):
//   1.4-2.8e-3 (P: dv, dmem_v) and 1.5-2.2e-3 (dS: dq, dk, dmem_k), one output rounding's size, not growing;
// * Kᵀ of dQ += dS·K is bf16(k) for rotated keys (hi only): 1.7-2.7e-3 on dq, the size of dS's rounding in the same
//   product, where [hi | lo] would cost 1/6 more products. All together: dq 2.0-3.4e-3, the others 1.4-2.8e-3.
// Against the fp64 truth (max |error| of the bf16 gradients, the same three kinds of shapes at seed 3, Zen 4), the fp32
// kernel errs by 0.0019-0.0077 and this one by 0.0023-0.0090 (1.1-1.9x), autograd through the reference in bf16 by
// 0.0044-0.0165: the tests' bound (twice that, plus 1e-3) is met with 2.5x or more to spare.
//
// Cost. Per (query, key): 2·dp (Sᵀ; 4·dp for rotated keys) + 2·dp (dPᵀ) + 3 · 2·dp (dV, dK, dQ) bf16 multiply-adds,
// on vdpbf16ps (32 products an instruction, twice the fp32 FMA's 16): memory keys cost 12·dp products where the fp32
// kernel's cost 10·dp at half the rate, so at most ~1.7x its speed. Measured (benchmarks/bench_attention_backward.py's
// bf16 inputs: B 1, Tq = Tk = 256, M 2,561 rotated, 32 / 8 heads, D 128, causal; the op alone, medians of 7 runs
// interleaved with avx512's in one process) on a 2-core AMD EPYC Zen 4 VM (AVX-512 + AVX512_BF16, no AMX), shared:
// 1 thread 316 ms (avx512, fp32 kernel) -> 215 ms (avx512_bf16), 2 threads 159 -> 108 ms: 1.47x (1.47-1.54x over
// runs). Timed by section on one core (rdtsc, at 223 ms, before the transposed packing of Q, dO and dQ): the
// products 85% (Sᵀ 26%, dPᵀ 14%, dV, dK, dQᵀ 15% each: ~195 GFLOP/s, bf16_gemm.h's micro-kernel peaks at 222), the
// softmax/dS 4%, packing Q and dO 4%, K and V 2%: the kernel is bound by its products. The brgemm build above ran
// 194 ms (one unpaired run of 3, within this machine's noise of the 207 ms run before it); bf16_gemm.h says why
// this level keeps its own micro-kernel.

class BackwardBf16Task {
 public:
  static constexpr int64_t kRows = 64;  // query rows per chunk: N of Sᵀ, dPᵀ, dQᵀ; K of dV, dK
  static_assert(kKeyBlock % kGemmK == 0, "the keys of a block are K of dQᵀ: a multiple of kGemmK");
  static_assert(kRows % kGemmK == 0 && kLanes == 16, "chunk rows are K of dV/dK and 16-lane vectors");

  static int64_t scratch_size(const BackwardProblem& P) {
    const int64_t rp = ceil_div(std::min(P.G * P.Tq, kMaxRows), kRows) * kRows, dp = ceil_div(P.D, kGemmK) * kGemmK;
    return rp * dp                           // QT2: [Q ; Q]ᵀ per chunk, pairs of dims, bf16 [chunk][dp][kRows][2]
           + rp * dp / 2                     // OT: dOᵀ per chunk, pairs of dims, bf16 [chunk][dp / 2][kRows][2]
           + rp * dp                         // Qv, Ov: Q and dO, pairs of rows, bf16 [rp / 2][dp][2]
           + rp * dp / 2                     // rows16: Q or dO rows in bf16 (the packing's source)
           + rp * dp                         // dQT: dQᵀ per chunk, fp32 [chunk][dp][kRows]
           + 2 * rp                          // lse2, cf
           + kKeyBlock * dp                  // K2 bf16 [keys][2 dp] (hi | lo)
           + kKeyBlock * dp / 2              // V16 bf16 [keys][dp]
           + kKeyBlock * dp / 2              // KT bf16 [dp][keys]
           + 2 * kKeyBlock * dp              // dK, dV fp32 [keys][dp]
           + 2 * kKeyBlock * kRows           // Sᵀ, dPᵀ fp32 [keys][kRows]
           + 3 * kKeyBlock * kRows / 2       // Pᵀ, dSᵀ bf16 [keys][kRows], dSᵀ as pairs of keys
           + dp + 16 * 20;                   // a fp32 row; each buffer's 64-byte alignment
  }

  explicit BackwardBf16Task(const BackwardProblem& P)
      : P_(P), ws_(scratch_size(P)), R_(P.G * P.Tq), D_(P.D), dp_(ceil_div(P.D, kGemmK) * kGemmK),
        walk_(P), lim_(kRows) {
    const int64_t rp = ceil_div(std::min(R_, kMaxRows), kRows) * kRows;
    float* p = ws_.p;
    auto take = [&p](int64_t floats) { float* r = p; p += ceil_div(floats, 16) * 16; return r; };
    auto take16 = [&take](int64_t n) { return reinterpret_cast<bf16_t*>(take(ceil_div(n, 2))); };
    QT2_ = take16(2 * dp_ * rp);
    OT_ = take16(dp_ * rp);
    Qv_ = take16(rp * dp_);
    Ov_ = take16(rp * dp_);
    rows16_ = take16(rp * dp_);
    dQT_ = take(dp_ * rp);
    lse2_ = take(rp);
    cf_ = take(rp);
    K2_ = take16(kKeyBlock * 2 * dp_);
    V16_ = take16(kKeyBlock * dp_);
    KT_ = take16(dp_ * kKeyBlock);
    dk_ = take(kKeyBlock * dp_);
    dv_ = take(kKeyBlock * dp_);
    ST_ = take(kKeyBlock * kRows);
    dPT_ = take(kKeyBlock * kRows);
    PT16_ = take16(kKeyBlock * kRows);
    dST16_ = take16(kKeyBlock * kRows);
    dSv_ = take16(kKeyBlock * kRows);
    tmp_ = take(dp_);
  }

  // BackwardTask::run's contract: dK, dV of the blocks [block_begin, block_end) of (b, h) into the outputs, their
  // dQ of every row of the head into dq_out; rows kMaxRows at a time, dK/dV carried between passes in the outputs.
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
      // dQᵀ back to rows, kLanes rows x kLanes dims at a time
      for (int64_t l0 = 0; l0 < re_ - rb_; l0 += kLanes) {
        const float* chunk = dQT_ + l0 / kRows * dp_ * kRows + l0 % kRows;
        for (int64_t d0 = 0; d0 < D_; d0 += kLanes) {
          vf x[kLanes];
          load_transposed(chunk + d0 * kRows, kRows, x);  // x[j]: dims d0 .. of local row l0 + j
          for (int64_t j = 0; j < kLanes && l0 + j < re_ - rb_; ++j) {
            const int64_t r = rb_ + l0 + j, t = r / P_.G, hq = h_ * P_.G + r % P_.G;
            std::memcpy(dq_out + ((b_ * P_.Tq + t) * P_.Hq + hq) * D_ + d0, &x[j],
                        std::min<int64_t>(kLanes, D_ - d0) * sizeof(float));
          }
        }
      }
    }
    gemm_bf16_release();
  }

 private:
  // Rows of a pass padded to kGemmK: the chunks start at multiples of it and are K of dV/dK.
  static int64_t rows_padded(int64_t rows) { return ceil_div(rows, kGemmK) * kGemmK; }

  // The kLanes x kLanes block at src (rows lds floats apart) into x, transposed: x[j] holds column j (bits moved
  // as they are, so it serves 32-bit words of bf16 pairs too).
  static void load_transposed(const float* src, int64_t lds, vf (&x)[kLanes]) {
    for (int i = 0; i < kLanes; ++i) x[i] = load(src + i * lds);
    transpose(x);
  }

  // x (dp floats) into bf16 at dst, rounded to nearest even (exact for the bf16 inputs' values).
  void round_row(const float* x, bf16_t* dst) const {
    for (int64_t d = 0; d < dp_; d += kLanes) store_bf16(dst + d, load(x + d));
  }
  // The D floats at src, zero-padded to dp, in tmp_.
  void load_padded(const float* src) {
    std::copy_n(src, D_, tmp_);
    std::fill(tmp_ + D_, tmp_ + dp_, 0.f);
  }

  // dst[2 i + e] = (e ? r1 : r0)[i] for i < len (a multiple of 32): two bf16 rows as pairs, the VNNI layout of a
  // product whose K runs over them; r1 = nullptr is a zero row. One vpermt2w per 32 output elements.
  static void interleave(const bf16_t* r0, const bf16_t* r1, int64_t len, bf16_t* dst) {
    const __m512i lo = _mm512_set_epi16(47, 15, 46, 14, 45, 13, 44, 12, 43, 11, 42, 10, 41, 9, 40, 8, 39, 7, 38, 6,
                                        37, 5, 36, 4, 35, 3, 34, 2, 33, 1, 32, 0);
    const __m512i hi = _mm512_add_epi16(lo, _mm512_set1_epi16(16));
    for (int64_t i = 0; i < len; i += 32) {
      const __m512i a = r0 != nullptr ? _mm512_loadu_si512(r0 + i) : _mm512_setzero_si512();
      const __m512i c = r1 != nullptr ? _mm512_loadu_si512(r1 + i) : _mm512_setzero_si512();
      _mm512_storeu_si512(dst + 2 * i, _mm512_permutex2var_epi16(a, lo, c));
      _mm512_storeu_si512(dst + 2 * i + 32, _mm512_permutex2var_epi16(a, hi, c));
    }
  }

  // The pass's rows [rb_, re_): their constants, and Q, dO in bf16 in the layouts the products read: QT2 (B of Sᵀ:
  // word (i, r) the dims (2i, 2i + 1) of row r, the dp / 2 words twice, for the [hi | lo] keys), OT (B of dPᵀ), Qv
  // and Ov (B of dK, dV: pairs of rows). The padding rows up to rp_ are zeros, with lse +inf (p = 0). QT2, OT and
  // dQT are stored chunk by chunk (kRows columns a row): with the pass's rows as columns, the products' B rows and C
  // rows would lie 4 KiB apart at 1,024 rows, in the same few L1 sets (the kernel ran 1.12x slower so).
  void start_rows() {
    const int64_t rows = re_ - rb_, words = dp_ / 2;
    rp_ = ceil_div(rows, kRows) * kRows;
    for (int64_t l = 0; l < rp_; ++l) {
      const int64_t r = rb_ + l, t = r / P_.G, hq = h_ * P_.G + r % P_.G;
      const int64_t i = (b_ * P_.Hq + hq) * P_.Tq + t;
      lse2_[l] = l < rows ? P_.lse[i] * kLog2e : std::numeric_limits<float>::infinity();
      cf_[l] = l < rows ? P_.coef[i] : 0.f;
    }
    for (const bool is_q : {true, false}) {
      const Rows& src = is_q ? P_.q : P_.dout;
      for (int64_t l = 0; l < rp_; ++l) {
        bf16_t* row = rows16_ + l * dp_;
        if (l < rows) {
          const int64_t r = rb_ + l;
          load_padded(src.row(b_, r / P_.G, h_ * P_.G + r % P_.G));
          round_row(tmp_, row);
        } else {
          std::fill(row, row + dp_, bf16_t{0});
        }
      }
      // the words of kLanes rows at a time, transposed into their chunk's columns (twice for Q)
      const int64_t copies = is_q ? 2 : 1;
      float* T = reinterpret_cast<float*>(is_q ? QT2_ : OT_);
      for (int64_t l0 = 0; l0 < rp_; l0 += kLanes) {
        float* chunk = T + l0 / kRows * copies * words * kRows + l0 % kRows;
        for (int64_t k0 = 0; k0 < words; k0 += kLanes) {
          vf x[kLanes];
          load_transposed(reinterpret_cast<const float*>(rows16_ + l0 * dp_) + k0, words, x);
          for (int64_t c = 0; c < copies; ++c)
            for (int k = 0; k < kLanes; ++k) store(chunk + (c * words + k0 + k) * kRows, x[k]);
        }
      }
      bf16_t* pairs = is_q ? Qv_ : Ov_;
      for (int64_t l = 0; l < rp_; l += 2) interleave(rows16_ + l * dp_, rows16_ + (l + 1) * dp_, dp_, pairs + l * dp_);
    }
    std::fill(dQT_, dQT_ + dp_ * rp_, 0.f);
  }

  // The block's keys into K2 (rows: bf16(k), and for rotated keys lo = bf16(k − hi) after it) and KT (Kᵀ, bf16(k),
  // zero columns up to the next multiple of kGemmK: K of dQᵀ), values into V16.
  void pack_block(const Rows& K, const Rows& V, int64_t j0, int64_t n, bool split) {
    for (int64_t j = 0; j < n; ++j) {
      load_padded(K.row(b_, j0 + j, h_));
      bf16_t* k2 = K2_ + j * 2 * dp_;
      for (int64_t d = 0; d < dp_; d += kLanes) {
        const vf x = load(tmp_ + d);
        const __m256i hi = reinterpret_cast<__m256i>(_mm512_cvtneps_pbh(x));
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(k2 + d), hi);
        if (split) {
          const vf hi32 = reinterpret_cast<vf>(_mm512_slli_epi32(_mm512_cvtepu16_epi32(hi), 16));
          store_bf16(k2 + dp_ + d, x - hi32);
        }
      }
      for (int64_t d = 0; d < dp_; ++d) KT_[d * kKeyBlock + j] = k2[d];
      load_padded(V.row(b_, j0 + j, h_));
      round_row(tmp_, V16_ + j * dp_);
    }
    for (int64_t d = 0; d < dp_; ++d) std::fill(KT_ + d * kKeyBlock + n, KT_ + (d + 1) * kKeyBlock, bf16_t{0});
  }

  void key_block(int64_t i) {
    const bool mem = walk_.memory(i);
    const int64_t kv_end = P_.chunk_end(b_);
    int64_t j0, n;
    walk_.keys(i, j0, n);
    const bool split = mem && P_.mk_rotated;
    pack_block(mem ? P_.mk : P_.k, mem ? P_.mv : P_.v, j0, n, split);
    float* dk_out = mem ? P_.dmk_rot + (b_ * P_.M + j0) * P_.Hkv * D_ : P_.dk + (b_ * P_.Tk + j0) * P_.Hkv * D_;
    float* dv_out = mem ? P_.dmv + (b_ * P_.M + j0) * P_.Hkv * D_ : P_.dv + (b_ * P_.Tk + j0) * P_.Hkv * D_;
    if (rb_ == 0) {
      std::fill(dk_, dk_ + n * dp_, 0.f);
      std::fill(dv_, dv_ + n * dp_, 0.f);
    } else {
      for (int64_t j = 0; j < n; ++j) {
        load_padded(dk_out + (j * P_.Hkv + h_) * D_);
        std::copy_n(tmp_, dp_, dk_ + j * dp_);
        load_padded(dv_out + (j * P_.Hkv + h_) * D_);
        std::copy_n(tmp_, dp_, dv_ + j * dp_);
      }
    }
    // causal chunk keys: the rows before t_min · G see none of the block; chunks stay on the kRows grid
    const bool masked = !mem && P_.causal;
    const int64_t t_min = masked ? std::clamp<int64_t>(j0 + P_.Tq - kv_end, 0, P_.Tq) : 0;
    const int64_t rows = re_ - rb_, first = (std::max(rb_, t_min * P_.G) - rb_) / kRows * kRows;
    const int64_t per_chunk =
        ceil_div(walk_.lines(), std::max<int64_t>(ceil_div(rows - first, kRows), 1));
    for (int64_t r0 = first; r0 < rows; r0 += kRows) {
      walk_.prefetch_some(per_chunk);
      const int64_t nr = std::min(kRows, rows - r0), cols = rows_padded(nr);
      for (int64_t r = 0; r < cols; ++r)
        lim_[r] = r >= nr   ? 0
                  : masked ? static_cast<int32_t>(
                                 std::clamp<int64_t>(P_.visible_end(b_, (rb_ + r0 + r) / P_.G) - j0, 0, n))
                           : static_cast<int32_t>(n);
      chunk(r0, cols, n, split ? 2 * dp_ : dp_);
    }
    walk_.prefetch_some(walk_.lines());
    for (int64_t j = 0; j < n; ++j) {
      std::copy_n(dk_ + j * dp_, D_, dk_out + (j * P_.Hkv + h_) * D_);
      std::copy_n(dv_ + j * dp_, D_, dv_out + (j * P_.Hkv + h_) * D_);
    }
  }

  // The local rows [r0, r0 + cols) against the packed block of n keys; kd: K of Sᵀ (dp, or 2 dp for [hi | lo]).
  void chunk(int64_t r0, int64_t cols, int64_t n, int64_t kd) {
    const int m = static_cast<int>(n), nc = static_cast<int>(cols), d = static_cast<int>(dp_);
    const int64_t nk = ceil_div(n, kGemmK) * kGemmK;
    const bf16_t *qt = QT2_ + r0 * 2 * dp_, *ot = OT_ + r0 * dp_;  // the chunk's [2 dp][kRows] and [dp][kRows]
    gemm_bf16(m, nc, static_cast<int>(kd), K2_, 2 * dp_, qt, kRows, ST_, kRows, false);  // Sᵀ = K·Qᵀ
    gemm_bf16(m, nc, d, V16_, dp_, ot, kRows, dPT_, kRows, false);                         // dPᵀ = V·dOᵀ
    scores(r0, cols, n, nk);
    gemm_bf16(m, d, nc, PT16_, kRows, Ov_ + r0 * dp_, dp_, dv_, dp_, true);    // dV += Pᵀ·dO
    gemm_bf16(m, d, nc, dST16_, kRows, Qv_ + r0 * dp_, dp_, dk_, dp_, true);   // dK += dSᵀ·Q
    gemm_bf16(d, nc, static_cast<int>(nk), KT_, kKeyBlock, dSv_, kRows, dQT_ + r0 * dp_, kRows, true);  // dQᵀ += Kᵀ·dSᵀ
  }

  // Pᵀ and dSᵀ of the chunk from Sᵀ and dPᵀ, a vector of 16 rows at a time; lanes at or past a row's key limit get
  // p = dS = 0. Then dSᵀ as pairs of keys (zero pairs up to nk keys) for dQᵀ.
  void scores(int64_t r0, int64_t cols, int64_t n, int64_t nk) {
    const vf c = splat(P_.scale * kLog2e), sc = splat(P_.scale);
    for (int64_t j = 0; j < n; ++j) {
      const vi jv = vi{} + static_cast<int32_t>(j);
      for (int64_t v = 0; v < cols; v += kLanes) {
        const int64_t o = j * kRows + v;
        vi lim;
        std::memcpy(&lim, lim_.data() + v, sizeof lim);
        const vf p = exp2v(load(ST_ + o) * c - load(lse2_ + r0 + v));  // base 2: 2^(scale·log2e·s − log2e·lse)
        const vf pm = jv < lim ? p : vf{};
        store_bf16(PT16_ + o, pm);
        store_bf16(dST16_ + o, sc * pm * (load(dPT_ + o) + load(cf_ + r0 + v)));
      }
    }
    for (int64_t j = 0; j < nk; j += 2)
      interleave(j < n ? dST16_ + j * kRows : nullptr, j + 1 < n ? dST16_ + (j + 1) * kRows : nullptr, cols,
                 dSv_ + j * kRows);
  }

  const BackwardProblem& P_;
  Scratch ws_;
  const int64_t R_, D_, dp_;
  int64_t b_ = 0, h_ = 0, rb_ = 0, re_ = 0, rp_ = 0;  // (batch, KV head), the pass's rows [rb_, re_), padded count
  KeyBlockWalk walk_;
  std::vector<int32_t> lim_;
  bf16_t *QT2_, *OT_, *Qv_, *Ov_, *rows16_, *K2_, *V16_, *KT_, *PT16_, *dST16_, *dSv_;
  float *dQT_, *lse2_, *cf_, *dk_, *dv_, *ST_, *dPT_, *tmp_;
};
