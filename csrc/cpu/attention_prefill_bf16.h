// Memory-attention prefill on bf16 matrix products (the avx512_bf16 and amx levels, bf16 inputs). Included by
// attention_impl.h inside namespace mplus::<level>, after bf16_gemm.h (gemm_bf16: vdpbf16ps or ATen's brgemm).
//
// The tasks are PrefillTask's (batch, KV head, a block of G x queries rows; run_prefill), in the transposed layout,
// "rows in M": per block of kKeys keys, per group of kGroup rows,
//   S[rows][keys] = Q . K^T          gemm_bf16 over the head dim (padded to dp), fp32 sums
//   softmax per row, in fp32         scale, masks, running max m and sum l (of the unrounded p), P = bf16(p)
//   O[rows][D] = alpha O + P . V     gemm_bf16 over the block's keys, into the task's fp32 O
// K and V are packed once per block into the operand layout of the products (VNNI, bf16_gemm.h), the next block's
// rows prefetched meanwhile; S and P of a group stay in L1, O and Q in L2.
//
// Precision. Queries, chunk keys and values are bf16 numbers: their products are exact and summed in fp32, as in the
// fp32 kernels after widening. Two roundings are new:
// * a memory key rotated by RoPE (fp32 arithmetic) is no bf16 number, and rounding it moves the LSE by ~1e-3 at the
//   tests' shapes (20x their tolerance). It is split into hi = bf16(k) and lo = bf16(k - hi) (16 significant bits,
//   relative error ~2^-17), and Q.K^T runs over 2 dp columns, [q | q] against [hi ; lo]: twice the products of a
//   bf16 key (the cost of the fp32 kernels' FMAs) for those keys only;
// * P is rounded to bf16 for P.V (as torch's CPU flash attention does); l sums the unrounded p, so the LSE is the
//   fp32 kernels' and each term of out moves by at most one bf16 rounding of its p.
// Every sum runs in an order fixed by the shapes (keys ascending per task), so the bits do not depend on the threads.
// Memory keys thus cost 3 units of products (Q.K^T twice, P.V once) where the fp32 kernels' cost 2 at half the rate:
// at most 1.33x their speed. Measured on one Zen 4 core, M+ layer shapes (M 12,801, Tq 256 or 2048, 32 / 8 heads,
// D 128): 1.17-1.21x the fp32 kernels, the products at 222 / 190 GFLOP/s (Q.K^T / P.V, bf16_gemm.h), the rest softmax
// (~13%) and packing (~5%).

class PrefillBf16Task {
 public:
  static constexpr int kKeys = 64;       // keys per block: N of Q.K^T, K of P.V
  static constexpr int64_t kGroup = 48;  // rows per group (S: 24 KiB, P: 12 KiB)

  // Scratch floats for blocks of up to `rows` query rows (every buffer 64-byte aligned).
  static int64_t scratch_size(int64_t rows, int64_t d) {
    const int64_t dp = round_up(d, kGemmK);
    return round_up(rows * dp, 16)                   // Q2 [rows][2 dp] bf16
           + round_up(rows * dp, 16)                 // O [rows][dp] fp32
           + kGroup * kKeys + kGroup * kKeys / 2     // S fp32, P bf16
           + dp * kKeys + dp * kKeys / 2             // KB [2 dp][kKeys], VB [kKeys][dp] bf16
           + 3 * round_up(rows, 16) + 2 * dp + 16;   // m, l, thr; a fp32 row and a bf16 [2 dp] row
  }

  PrefillBf16Task(const Problem& P, float* ws, int64_t b, int64_t h, int64_t t0, int64_t nt)
      : P_(P), b_(b), h_(h), t0_(t0), rows_(P.G * nt), dp_(round_up(P.D, kGemmK)), walk_(P, b, t0, nt, kKeys) {
    float* p = ws;
    auto take = [&p](int64_t floats) { float* r = p; p += round_up(floats, 16); return r; };
    Q2_ = reinterpret_cast<bf16_t*>(take(rows_ * dp_));
    O_ = take(rows_ * dp_);
    S_ = take(kGroup * kKeys);
    P16_ = reinterpret_cast<bf16_t*>(take(kGroup * kKeys / 2));
    KB_ = reinterpret_cast<bf16_t*>(take(dp_ * kKeys));
    VB_ = reinterpret_cast<bf16_t*>(take(dp_ * kKeys / 2));
    m_ = take(rows_);
    l_ = take(rows_);
    thr_ = take(rows_);
    tmp_ = take(dp_);
    row16_ = reinterpret_cast<bf16_t*>(take(dp_));
  }

  void run() {
    const int64_t D = P_.D, G = P_.G;
    for (int64_t r = 0; r < rows_; ++r) {  // Q2 row r = [q | q], each half zero-padded to dp
      const auto* src = reinterpret_cast<const bf16_t*>(P_.q.row<c10::BFloat16>(b_, t0_ + r / G, h_ * G + r % G));
      bf16_t* dst = Q2_ + r * 2 * dp_;
      for (bf16_t* half : {dst, dst + dp_}) {
        std::copy_n(src, D, half);
        std::fill(half + D, half + dp_, bf16_t{0});
      }
      m_[r] = kNegInf;
      l_[r] = 0.f;
      thr_[r] = static_cast<float>(t0_ + r / G + walk_.kv_end - P_.Tq);
    }
    std::fill(O_, O_ + rows_ * dp_, 0.f);
    for (int64_t i = 0; i < walk_.nblocks; ++i) {
      const KeyBlock blk = block(i);
      pack_keys(blk);
      pack_values(blk);
      list_lines(i + 1 < walk_.nblocks ? block(i + 1) : KeyBlock{});
      key_block(blk);
    }
    gemm_bf16_release();
    for (int64_t r = 0; r < rows_; ++r) {
      float* acc = O_ + r * dp_;  // finish_row normalises it in place
      finish_row<c10::BFloat16>(P_, b_, t0_ + r / G, h_ * G + r % G, acc, m_[r], l_[r], acc);
    }
  }

 private:
  KeyBlock block(int64_t i) const { return walk_.block(i); }

  const bf16_t* key_row(const View& src, int64_t j) const {
    return reinterpret_cast<const bf16_t*>(src.row<c10::BFloat16>(b_, j, h_));
  }

  // K of the block into KB: VNNI [kd / 2][kKeys][2], kd = dp for bf16 keys, 2 dp for rotated ones (hi rows, then lo
  // rows). Key j's pairs of dims land kKeys words apart; keys past n are zero columns.
  void pack_keys(const KeyBlock& blk) {
    const int64_t D = P_.D, words = blk.pos != nullptr ? dp_ : dp_ / 2;
    uint32_t* kb = reinterpret_cast<uint32_t*>(KB_);
    for (int64_t j = 0; j < kKeys; ++j) {
      if (j >= blk.n) {
        for (int64_t i = 0; i < words; ++i) kb[i * kKeys + j] = 0;
        continue;
      }
      const bf16_t* src = key_row(*blk.k, blk.j0 + j);
      if (blk.pos == nullptr) {
        std::copy_n(src, D, row16_);
        std::fill(row16_ + D, row16_ + dp_, bf16_t{0});
      } else {
        load_row(reinterpret_cast<const c10::BFloat16*>(src), tmp_, D);
        std::fill(tmp_ + D, tmp_ + dp_, 0.f);
        const int64_t p = blk.pos[blk.j0 + j] * P_.rope_ld;
        rope_row(tmp_, P_.cos + p, P_.sin + p, D);
        for (int64_t d = 0; d < dp_; d += kLanes) {  // hi = bf16(x), lo = bf16(x - hi)
          const vf x = load(tmp_ + d);
          const __m256i hi = reinterpret_cast<__m256i>(_mm512_cvtneps_pbh(x));
          const vf hi32 = reinterpret_cast<vf>(_mm512_slli_epi32(_mm512_cvtepu16_epi32(hi), 16));
          _mm256_storeu_si256(reinterpret_cast<__m256i*>(row16_ + d), hi);
          store_bf16(row16_ + dp_ + d, x - hi32);
        }
      }
      const uint32_t* w = reinterpret_cast<const uint32_t*>(row16_);
      for (int64_t i = 0; i < words; ++i) kb[i * kKeys + j] = w[i];
    }
  }

  // V of the block into VB: VNNI over keys, [kKeys / 2][dp][2]: the pair (V[2i][d], V[2i + 1][d]) is word i dp + d.
  // Two rows interleaved 32 dims at a time by one vpermt2w each half; masked loads stop at D and at the block's n.
  void pack_values(const KeyBlock& blk) {
    const int64_t D = P_.D;
    const __m512i lo = _mm512_set_epi16(47, 15, 46, 14, 45, 13, 44, 12, 43, 11, 42, 10, 41, 9, 40, 8, 39, 7, 38, 6,
                                        37, 5, 36, 4, 35, 3, 34, 2, 33, 1, 32, 0);
    const __m512i hi = _mm512_add_epi16(lo, _mm512_set1_epi16(16));
    for (int64_t j = 0; j < kKeys; j += 2) {
      const bf16_t* r0 = j < blk.n ? key_row(*blk.v, blk.j0 + j) : nullptr;
      const bf16_t* r1 = j + 1 < blk.n ? key_row(*blk.v, blk.j0 + j + 1) : nullptr;
      bf16_t* dst = VB_ + j * dp_;  // pair j / 2: 2 dp elements
      for (int64_t d = 0; d < dp_; d += 32) {
        const __mmask32 m = D - d >= 32 ? ~__mmask32{0} : D > d ? (__mmask32{1} << (D - d)) - 1 : 0;
        const __m512i a = r0 != nullptr ? _mm512_maskz_loadu_epi16(m, r0 + d) : _mm512_setzero_si512();
        const __m512i c = r1 != nullptr ? _mm512_maskz_loadu_epi16(m, r1 + d) : _mm512_setzero_si512();
        _mm512_storeu_si512(dst + 2 * d, _mm512_permutex2var_epi16(a, lo, c));
        _mm512_storeu_si512(dst + 2 * d + 32, _mm512_permutex2var_epi16(a, hi, c));
      }
    }
  }

  // Llama RoPE of one fp32 row in place, a vector at a time when the half dim allows it.
  static void rope_row(float* x, const float* cos, const float* sin, int64_t d) {
    const int64_t h = d / 2;
    if (h % kLanes != 0) return rope_inplace(x, cos, sin, d);
    for (int64_t i = 0; i < h; i += kLanes) {
      const vf a = load(x + i), b = load(x + i + h), c = load(cos + i), s = load(sin + i);
      store(x + i, a * c - b * s);
      store(x + i + h, b * c + a * s);
    }
  }

  // The cache lines of a block's K, V and rope rows, for the Prefetcher (prefetched while this block computes).
  void list_lines(const KeyBlock& blk) {
    lines_.clear();
    const int64_t row_bytes = P_.D * 2;
    for (int64_t j = blk.j0; j < blk.j0 + blk.n; ++j) {
      const char* kr = reinterpret_cast<const char*>(key_row(*blk.k, j));
      const char* vr = reinterpret_cast<const char*>(key_row(*blk.v, j));
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

  void key_block(const KeyBlock& blk) {
    const int64_t jc0 = P_.causal ? blk.jc0 : -1;
    const int64_t groups = (rows_ + kGroup - 1) / kGroup;
    Prefetcher pf{lines_.data(), static_cast<int>(lines_.size()), 0,
                  static_cast<int>((lines_.size() + rows_ - 1) / std::max<int64_t>(rows_, 1))};
    for (int64_t g = 0; g < groups; ++g) {
      const int64_t r0 = g * kGroup, nr = std::min(kGroup, rows_ - r0);
      bool masked = blk.n < kKeys;
      if (jc0 >= 0) {
        const int64_t off = t0_ + walk_.kv_end - P_.Tq;  // query t0 + i sees chunk key j iff j <= i + off
        if (jc0 > (r0 + nr - 1) / P_.G + off) {
          for (int64_t r = 0; r < nr; ++r) pf.step();
          continue;
        }
        masked = masked || jc0 + blk.n - 1 > r0 / P_.G + off;
      }
      group(blk, r0, nr, masked, jc0, pf);
    }
    pf.finish();
  }

  // One row group against the packed block: S = Q K^T, masks, online softmax (P into P16, O rows rescaled), O += P V.
  void group(const KeyBlock& blk, int64_t r0, int64_t nr, bool masked, int64_t causal_from, Prefetcher& pf) {
    const int kd = static_cast<int>(blk.pos != nullptr ? 2 * dp_ : dp_);
    gemm_bf16(static_cast<int>(nr), kKeys, kd, Q2_ + r0 * 2 * dp_, 2 * dp_, KB_, kKeys, S_, kKeys, false);
    constexpr int nv = kKeys / kLanes;
    constexpr vi idx = index_vector([](int i) { return i; });
    const vf scale = splat(P_.scale2);
    for (int64_t i = 0; i < nr; ++i) {
      pf.step();
      const int64_t r = r0 + i;
      const float* s = S_ + i * kKeys;
      vf x[nv];
      vf mx = splat(m_[r]);
      for (int v = 0; v < nv; ++v) {
        x[v] = load(s + v * kLanes) * scale;
        if (masked) {  // keys past n; chunk keys past the row's causal horizon
          const vi j = idx + v * kLanes;
          vi hide = j >= static_cast<int>(blk.n);
          if (causal_from >= 0) {
            hide |= splat(static_cast<float>(causal_from)) + __builtin_convertvector(j, vf) > thr_[r];
          }
          x[v] = hide ? splat(kNegInf) : x[v];
        }
        mx = vmax(mx, x[v]);
      }
      const float m_new = hmax(mx), m_old = m_[r];
      const float m_use = m_new == kNegInf ? 0.f : m_new;  // a row with no visible key yet: keep 0s
      vf sum = {};
      bf16_t* p16 = P16_ + i * kKeys;
      for (int v = 0; v < nv; ++v) {
        const vf p = exp2v(x[v] - m_use);
        sum += p;
        store_bf16(p16 + v * kLanes, p);
      }
      // 0 for m_old = -inf; 1 (exactly exp2(0)) when the max did not move, the common case, without the libm call
      const float alpha = m_new == m_old ? 1.f : std::exp2(m_old - m_use);
      l_[r] = l_[r] * alpha + hsum(sum);
      m_[r] = m_new;
      if (alpha != 1.f) {
        float* o = O_ + r * dp_;
        for (int64_t d = 0; d < dp_; d += kLanes) store(o + d, load(o + d) * alpha);
      }
    }
    gemm_bf16(static_cast<int>(nr), static_cast<int>(dp_), kKeys, P16_, kKeys, VB_, dp_, O_ + r0 * dp_, dp_, true);
  }

  const Problem& P_;
  const int64_t b_, h_, t0_, rows_, dp_;  // dp_: head dim padded to kGemmK
  const PrefillWalk walk_;
  std::vector<const char*> lines_;
  bf16_t *Q2_, *P16_, *KB_, *VB_, *row16_;
  float *O_, *S_, *m_, *l_, *thr_, *tmp_;
};
