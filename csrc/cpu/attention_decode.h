// Memory-attention decode on the CPU (G x Tq <= kMaxDecodeRows query rows per KV head, D in {64, 128, 256}),
// ISA-generic: included by attention_impl.h inside namespace mplus::<level>, after vec.h and parallel.h.
//
// Decode reads every K/V byte once for a handful of FMAs each, so it is meant to run at the memory's read bandwidth;
// what stands in the way is the instruction count per key (conversion, RoPE rotation, Q.K, P.V) and the memory
// stalls. The kernel is built around both:
// * split-KV: one task per (batch row, range of ~kSplitKeys memory keys or of its chunk keys), handed out dynamically;
//   inside a task every KV head is processed per block of kDecodeBlock keys, so each K/V byte is read once, for all G
//   query heads of its KV head, and a block's rows of all heads (a contiguous region of a [B, T, Hkv, D] tensor) are
//   read together;
// * a memory shared by the batch rows (an expand, batch stride 0: a memory state served to a batch) is read once per
//   group of rows, up to kMaxJointRows query rows scored together: at B 4, M 12,801 half the time of a read per row
//   (bench_attention's shared-memory decode), where the rows' scores, not the bytes, set the time;
// * the next block is prefetched while this one computes, in (key, head) order (one sequential stream per tensor for
//   contiguous inputs; the scattered RoPE rows first), a few lines per step of the score loop, every line (the
//   hardware prefetchers do not fill in lines skipped: prefetching every second line doubled the time); a task's first
//   block is requested all at once before it starts;
// * "dims in lanes" for Q.K: a key row is loaded, converted and rotated into registers once and dotted with every
//   query row; kScoreKeys keys at a time (on AVX-512: 4 at D 64, 2 at D 128), so that each query vector loaded from
//   L1 serves several keys. kLanes keys' partial sums are folded into one score vector by a transpose-reduction tree.
//   At the avx512_bf16 level, bf16 keys given rotated (chunk keys; the memory keys of the model's decode steps, which
//   a generation rotates once at its prefill) are dotted on vdpbf16ps as they are stored, twice the keys per pass;
// * P.V on the avx512_bf16 and amx levels (bf16 values): vdpbf16ps on pairs of keys, the pairs of value rows
//   interleaved by one vpermt2w per 16 dims and p rounded to bf16 (as in the bf16 prefill; l keeps the fp32 p): half
//   the multiply instructions of the fp32 FMAs and no widening of V. Elsewhere fp32 FMAs on the widened rows.
// Each split keeps (max, sum, out) per row; the last split of a batch row to finish merges them through their LSEs, in
// split order. The number of splits depends on the shapes only, so the bits do not depend on the thread count.
// Measured on 2 Zen 4 cores (M 12,801, 8 KV heads, G 4, D 128, memory keys rotated from a permuted position table):
// bf16 at 54-63% of the read bandwidth (a 512 MiB sum), fp32 at 56-77% (docs/bench/levels.md; the machine is shared
// and its bandwidth swings by 30% between runs). What holds it there (measured, issue 22):
// * compute and memory do not overlap: per (key, KV head) a core spends ~30 ns computing with the data in L2/L3
//   (bf16 with RoPE: ~100 vector instructions: widening 16, RoPE 16, Q.K 32 FMAs, P.V 16 vdpbf16ps + 8 for the pairs
//   and p, the reductions and softmax ~12) and ~55 ns from DRAM, close to the sum of the two; without RoPE (keys
//   given rotated) bf16 reaches 60-80% (noisy runs);
// * the software prefetches are ~26% of the samples (perf): issued at the rate the loop runs, they wait on the core's
//   miss buffers; fewer (every second line, K or V only, no rope rows) or farther ones (2 blocks), prefetcht0/t2/nta
//   and demand loads were all slower, and without them the loop runs at half the speed (its demand misses stall the
//   compute);
// * the access pattern itself is not the limit: a C loop reading the same rows in this order with these prefetches
//   and no compute moves ~28 GB/s on the 2 cores, as fast as a sequential sum of the same bytes;
// * 2 MiB pages (THP_MEM_ALLOC_ENABLE=1, torch's allocator) took 10-25% off, for the sum as well, in one session and
//   nothing in the next;
// * the RoPE rows of memory slots in position order (identity positions) instead of a permutation: -14% (2.36 vs 2.73
//   ms, one process); keys given rotated (no RoPE): -25%. cos and sin rows side by side (one 512-byte read): 2-3%,
//   within the noise; prefetching the RoPE rows two blocks ahead, or spreading the prefetches over P.V too: no change.
// Reaching 80% needs the compute per key well under the memory time (RoPE off the decode path, or fewer instructions
// per key), not a different prefetch. Since then (next session, same machine kind):
// * RoPE is off the model's decode path (MemoryKV.rotated) and rotated bf16 keys take vdpbf16ps for Q.K: in one
//   process, rotated keys 0.72-0.77 of the in-kernel rotation's time (0.79 before vdpbf16ps); in bench_attention
//   2.25 ms bf16 (69% of a 33.9 GB/s probe) and 4.93 ms fp32 (63%) against 3.02 and 5.20 ms rotating in the kernel;
// * with the keys in L2 (M 128 vs 384, one thread) a (key, KV head) costs ~22 ns bf16 rotated (~66 vector
//   instructions: Q.K 16 vdpbf16ps and 8 loads, the reduction tree ~11, softmax ~5, P.V 16 vdpbf16ps, 4 permutes
//   and 6 loads/broadcasts) and ~34 ns fp32, against ~38 / 75 ns of memory time per core at 80% of the probe: the
//   compute fits, the overlap does not (splits of 2048 or 4096 keys, prefetching two blocks ahead: within the noise;
//   no software prefetch: 30% slower).
// * make bench on that machine kind (2026-12-07/08): keys given rotated 1.94 ms (84% of a 32.1 GB/s probe) against
//   2.79 ms (59%) rotating in the kernel in one run; 3.68 against 3.52 ms in the next (fp32 peak 165), and
//   2.7-3.4 against 3.6-4.1 ms in reruns: on a shared machine the overlap, not the instruction count, sets the time.

constexpr int kDecodeBlock = 64;                       // keys per softmax step
constexpr int64_t kSplitKeys = 1024, kMaxSplits = 64;  // split-KV: keys per split, most splits per row
static_assert(kDecodeBlock % kLanes == 0, "decode blocks are whole vectors of keys");

// NV = D / kLanes vectors per row. q [R][D] fp32 (scaled): R = G x Tq <= kMaxDecodeRows query rows of one batch row,
// or up to kMaxJointRows of several batch rows that share the memory (their memory keys are read once for all).
constexpr int kMaxDecodeRows = 8;
constexpr int kMaxJointRows = 32;
constexpr int kDecodeRowChunk = 4;  // rows per pass of the P.V accumulators (and of the long-row score path)
// Dims (in vectors) per pass of the P.V accumulators: kDecodeRowChunk x kPvChunk accumulators + kPvChunk values.
constexpr int kPvChunk = MPLUS_ISA_LEVEL >= 2 ? 4 : 2;
// Keys scored per pass with their rows in registers (half the register file); 0: the row does not fit, and is read
// a pair of vectors (dims i and i + D/2, what RoPE mixes) at a time instead.
template <int NV>
constexpr int kScoreKeys = NV <= kVectorRegisters / 2 ? kVectorRegisters / 2 / NV : 0;

// part[r][col + c] (kLanes partial sums of q_r . k_c) for KEYS keys and R query rows. The keys are loaded, converted
// and (ROPE: memory keys stored before RoPE, rotated by the rows cos[c], sin[c]) rotated into registers once; each q
// vector is then loaded once for all KEYS keys. key[c] == nullptr: a missing key (scores 0, the caller masks them).
template <typename T, int NV, int KEYS, bool ROPE>
inline void score_keys(const T* const* key, const float* const* cos, const float* const* sin, const float* q, int R,
                       vf (*part)[kLanes], int col) {
  constexpr int H = NV / 2;
  vf k[KEYS][NV];
  for (int c = 0; c < KEYS; ++c) {
    if (key[c] == nullptr) {
      for (int i = 0; i < NV; ++i) k[c][i] = vf{};
      continue;
    }
    for (int i = 0; i < NV; ++i) k[c][i] = load_cvt(key[c] + i * kLanes);
    if constexpr (ROPE) {
      for (int i = 0; i < H; ++i) {
        const vf a = k[c][i], b = k[c][i + H], cs = load(cos[c] + i * kLanes), sn = load(sin[c] + i * kLanes);
        k[c][i] = a * cs - b * sn;
        k[c][i + H] = b * cs + a * sn;
      }
    }
  }
  for (int r = 0; r < R; ++r) {
    const float* qr = q + r * NV * kLanes;
    vf acc[KEYS];
    const vf q0 = load(qr);
    for (int c = 0; c < KEYS; ++c) acc[c] = q0 * k[c][0];
    for (int i = 1; i < NV; ++i) {
      vf qi = load(qr + i * kLanes);
      // one load for the KEYS FMAs (GCC would fold the load into each of them, KEYS loads of the same line)
      if constexpr (KEYS > 1) asm("" : "+v"(qi));
      for (int c = 0; c < KEYS; ++c) acc[c] += qi * k[c][i];
    }
    for (int c = 0; c < KEYS; ++c) part[r][col + c] = acc[c];
  }
}

// The same for one key whose row does not fit the registers (kScoreKeys<NV> == 0), RC <= kDecodeRowChunk rows: read
// a pair of vectors (dims i and i + D/2) at a time, two accumulators per row.
template <typename T, int NV, int RC>
inline void score_long_key(const T* key, const float* cos, const float* sin, const float* q, vf (*part)[kLanes],
                           int col) {
  constexpr int H = NV / 2;
  vf lo[RC] = {}, hi[RC] = {};
  for (int i = 0; i < H; ++i) {
    vf a = key != nullptr ? load_cvt(key + i * kLanes) : vf{};
    vf b = key != nullptr ? load_cvt(key + (i + H) * kLanes) : vf{};
    if (cos != nullptr) {
      const vf c = load(cos + i * kLanes), sn = load(sin + i * kLanes);
      const vf ra = a * c - b * sn;
      b = b * c + a * sn;
      a = ra;
    }
    for (int r = 0; r < RC; ++r) {
      lo[r] += load(q + r * NV * kLanes + i * kLanes) * a;
      hi[r] += load(q + r * NV * kLanes + (i + H) * kLanes) * b;
    }
  }
  for (int r = 0; r < RC; ++r) part[r][col] = lo[r] + hi[r];
}

#if MPLUS_ISA_LEVEL == 3
// Keys already rotated (chunk keys, or memory keys given after RoPE), bf16: part[r][col + c] for KEYS keys on
// vdpbf16ps, each 32-bit lane the products of a pair of dims (exact) added to its fp32 sum: the key rows are read as
// they are (no widening), half the multiply instructions of the fp32 FMAs. q16 holds the R query rows unscaled, in
// bf16 (the input's own bits, so the products are those of the fp32 path); the partial sums are scaled by `scale`
// here, as the fp32 path's prescaled q does. Only the avx512_bf16 level: Intel's cores retire vdpbf16ps at a quarter
// of the FMA's rate (bf16_pairs.h).
template <int NV, int KEYS>
inline void score_keys_bf16(const c10::BFloat16* const* key, const uint16_t* q16, int R, float scale,
                            vf (*part)[kLanes], int col) {
  constexpr int NB = NV / 2;  // vectors of 32 bf16 per row
  __m512bh k[KEYS][NB];
  for (int c = 0; c < KEYS; ++c) {
    for (int i = 0; i < NB; ++i) {
      k[c][i] = key[c] == nullptr ? reinterpret_cast<__m512bh>(_mm512_setzero_si512())
                                  : reinterpret_cast<__m512bh>(_mm512_loadu_si512(key[c] + 32 * i));
    }
  }
  for (int r = 0; r < R; ++r) {
    const uint16_t* qr = q16 + r * NB * 32;
    __m512 acc[KEYS];
    for (int c = 0; c < KEYS; ++c) acc[c] = _mm512_setzero_ps();
    for (int i = 0; i < NB; ++i) {
      __m512i qi = _mm512_loadu_si512(qr + 32 * i);
      if constexpr (KEYS > 1) asm("" : "+v"(qi));  // one load for the KEYS instructions
      for (int c = 0; c < KEYS; ++c) acc[c] = _mm512_dpbf16_ps(acc[c], reinterpret_cast<__m512bh>(qi), k[c][i]);
    }
    for (int c = 0; c < KEYS; ++c) part[r][col + c] = reinterpret_cast<vf>(acc[c]) * scale;
  }
}
#endif

// Scores of up to kLanes keys for the R query rows: s[r * lds + jj]. step() runs once per pass of kScoreKeys keys
// (the caller's prefetches, spread over the loop). q16/scale: the unscaled bf16 rows of score_keys_bf16 (bf16 at the
// avx512_bf16 level only; q holds them scaled, for the other paths).
template <typename T, int NV, typename F>
inline void decode_scores(const T* const* key, const float* const* cos, const float* const* sin, const float* q,
                          const uint16_t* q16, float scale, int R, float* s, int64_t lds, F&& step) {
  static_assert(NV % 2 == 0, "decode needs an even number of vectors per row");
  vf part[kMaxJointRows][kLanes];
  constexpr int KEYS = kScoreKeys<NV>;
  (void)q16;
  (void)scale;
  if constexpr (KEYS > 0) {
    static_assert(kLanes % KEYS == 0, "passes must tile a vector of keys");
    // Rotated or not, per pass: a block mixes both only where the memory ends (a missing key is either)
    for (int jj = 0; jj < kLanes; jj += KEYS) {
#if MPLUS_ISA_LEVEL == 3
      if constexpr (std::is_same_v<T, c10::BFloat16>) {
        constexpr int KEYS16 = 2 * KEYS;  // half the registers per key row: twice the keys per pass
        if (jj % KEYS16 == 0) {
          bool none = true;
          for (int c = 0; c < KEYS16; ++c) none = none && cos[jj + c] == nullptr;
          if (none) {
            step();
            step();
            score_keys_bf16<NV, KEYS16>(key + jj, q16, R, scale, part, jj);
            jj += KEYS;  // (and the loop's += KEYS)
            continue;
          }
        }
      }
#endif
      step();
      bool all = true, none = true;
      for (int c = 0; c < KEYS; ++c) {
        all = all && (cos[jj + c] != nullptr || key[jj + c] == nullptr);
        none = none && cos[jj + c] == nullptr;
      }
      if (none) {
        score_keys<T, NV, KEYS, false>(key + jj, cos + jj, sin + jj, q, R, part, jj);
      } else if (all) {
        score_keys<T, NV, KEYS, true>(key + jj, cos + jj, sin + jj, q, R, part, jj);
      } else {
        for (int c = jj; c < jj + KEYS; ++c) {
          if (cos[c] != nullptr) {
            score_keys<T, NV, 1, true>(key + c, cos + c, sin + c, q, R, part, c);
          } else {
            score_keys<T, NV, 1, false>(key + c, cos + c, sin + c, q, R, part, c);
          }
        }
      }
    }
  } else {
    for (int jj = 0; jj < kLanes; ++jj) {
      step();
      for (int r0 = 0; r0 < R; r0 += kDecodeRowChunk) {
        const float* qr = q + r0 * NV * kLanes;
        switch (std::min(R - r0, kDecodeRowChunk)) {
          case 4: score_long_key<T, NV, 4>(key[jj], cos[jj], sin[jj], qr, part + r0, jj); break;
          case 3: score_long_key<T, NV, 3>(key[jj], cos[jj], sin[jj], qr, part + r0, jj); break;
          case 2: score_long_key<T, NV, 2>(key[jj], cos[jj], sin[jj], qr, part + r0, jj); break;
          default: score_long_key<T, NV, 1>(key[jj], cos[jj], sin[jj], qr, part + r0, jj); break;
        }
      }
    }
  }
  for (int r = 0; r < R; ++r) store(s + r * lds, transpose_reduce(part[r]));  // (overwrites part[r])
}

// o[r][:] = alpha[r] * o[r][:] + sum_{j < n} p[r * ldp + j] * V_j for RC rows (fp32 FMAs on the widened rows); dims in
// chunks of kPvChunk vectors so that the RC x kPvChunk accumulators stay in registers while the value rows stream.
template <typename T, int NV, int RC>
inline void decode_pv_rows(const T* const* val, int n, const float* p, int64_t ldp, const float* alpha, float* o) {
  static_assert(NV % kPvChunk == 0, "head dim must be a multiple of kPvChunk vectors");
  for (int i0 = 0; i0 < NV; i0 += kPvChunk) {
    vf acc[RC][kPvChunk];
    for (int r = 0; r < RC; ++r)
      for (int i = 0; i < kPvChunk; ++i) acc[r][i] = alpha[r] * load(o + r * NV * kLanes + (i0 + i) * kLanes);
    for (int j = 0; j < n; ++j) {
      vf v[kPvChunk];
      for (int i = 0; i < kPvChunk; ++i) v[i] = load_cvt(val[j] + (i0 + i) * kLanes);
      for (int r = 0; r < RC; ++r) {
        const float pr = p[r * ldp + j];
        for (int i = 0; i < kPvChunk; ++i) acc[r][i] += pr * v[i];
      }
    }
    for (int r = 0; r < RC; ++r)
      for (int i = 0; i < kPvChunk; ++i) store(o + r * NV * kLanes + (i0 + i) * kLanes, acc[r][i]);
  }
}

#if MPLUS_ISA_LEVEL >= 3
// The same on vdpbf16ps for bf16 values: p16 [RC][ldp] holds the p rounded to bf16; each pair of keys (j, j + 1) is
// one instruction per accumulator, against the two value rows interleaved ((V_j[d], V_j+1[d]) per 32-bit lane) by
// vpermt2w. A missing second key of the last pair (odd n) is a zero row.
template <int NV, int RC>
inline void decode_pv_rows_bf16(const c10::BFloat16* const* val, int n, const uint16_t* p16, int64_t ldp,
                                const float* alpha, float* o) {
  static_assert(kPvChunk == 4 && NV % kPvChunk == 0, "a pass covers 64 dims: two rows of 32 bf16 per value row");
  const __m512i lo = _mm512_set_epi16(47, 15, 46, 14, 45, 13, 44, 12, 43, 11, 42, 10, 41, 9, 40, 8, 39, 7, 38, 6, 37,
                                      5, 36, 4, 35, 3, 34, 2, 33, 1, 32, 0);
  const __m512i hi = _mm512_add_epi16(lo, _mm512_set1_epi16(16));
  for (int i0 = 0; i0 < NV; i0 += kPvChunk) {
    __m512 acc[RC][kPvChunk];
    for (int r = 0; r < RC; ++r)
      for (int i = 0; i < kPvChunk; ++i)
        acc[r][i] = reinterpret_cast<__m512>(alpha[r] * load(o + r * NV * kLanes + (i0 + i) * kLanes));
    for (int j = 0; j < n; j += 2) {
      const uint16_t* a = reinterpret_cast<const uint16_t*>(val[j]) + i0 * kLanes;
      const uint16_t* b = j + 1 < n ? reinterpret_cast<const uint16_t*>(val[j + 1]) + i0 * kLanes : nullptr;
      __m512bh w[kPvChunk];
      for (int half = 0; half < 2; ++half) {
        const __m512i x = _mm512_loadu_si512(a + 32 * half);
        const __m512i y = b != nullptr ? _mm512_loadu_si512(b + 32 * half) : _mm512_setzero_si512();
        w[2 * half] = reinterpret_cast<__m512bh>(_mm512_permutex2var_epi16(x, lo, y));
        w[2 * half + 1] = reinterpret_cast<__m512bh>(_mm512_permutex2var_epi16(x, hi, y));
      }
      for (int r = 0; r < RC; ++r) {
        int32_t pair;
        std::memcpy(&pair, p16 + r * ldp + j, sizeof pair);
        const __m512bh pp = reinterpret_cast<__m512bh>(_mm512_set1_epi32(pair));
        for (int i = 0; i < kPvChunk; ++i) acc[r][i] = _mm512_dpbf16_ps(acc[r][i], pp, w[i]);
      }
    }
    for (int r = 0; r < RC; ++r)
      for (int i = 0; i < kPvChunk; ++i) _mm512_storeu_ps(o + r * NV * kLanes + (i0 + i) * kLanes, acc[r][i]);
  }
}
#endif

// o[r] = alpha[r] o[r] + sum_j p[r][j] V_j for the R rows; p16: the p as bf16 (used by the bf16 path only).
template <typename T, int NV>
inline void decode_pv(const T* const* val, int n, const float* p, const uint16_t* p16, int64_t ldp, const float* alpha,
                      int R, float* o) {
  for (int r0 = 0; r0 < R; r0 += kDecodeRowChunk) {
    const float* pr = p + r0 * ldp;
    const float* ar = alpha + r0;
    float* orow = o + r0 * NV * kLanes;
#if MPLUS_ISA_LEVEL >= 3
    if constexpr (std::is_same_v<T, c10::BFloat16>) {
      const uint16_t* pr16 = p16 + r0 * ldp;
      switch (std::min(R - r0, kDecodeRowChunk)) {
        case 4: decode_pv_rows_bf16<NV, 4>(val, n, pr16, ldp, ar, orow); break;
        case 3: decode_pv_rows_bf16<NV, 3>(val, n, pr16, ldp, ar, orow); break;
        case 2: decode_pv_rows_bf16<NV, 2>(val, n, pr16, ldp, ar, orow); break;
        default: decode_pv_rows_bf16<NV, 1>(val, n, pr16, ldp, ar, orow); break;
      }
      continue;
    }
#endif
    (void)p16;
    switch (std::min(R - r0, kDecodeRowChunk)) {
      case 4: decode_pv_rows<T, NV, 4>(val, n, pr, ldp, ar, orow); break;
      case 3: decode_pv_rows<T, NV, 3>(val, n, pr, ldp, ar, orow); break;
      case 2: decode_pv_rows<T, NV, 2>(val, n, pr, ldp, ar, orow); break;
      default: decode_pv_rows<T, NV, 1>(val, n, pr, ldp, ar, orow); break;
    }
  }
}

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

// Prefetches (into L2) the rows of keys [j, end) of [memory ; chunk] of batch row b: every KV head's K and V rows and
// the RoPE rows of the memory keys, as byte ranges (one per tensor for the usual [B, T, Hkv, D] layout, whose rows of
// consecutive keys and all heads are one contiguous region; one per row otherwise), a few lines per step(), so that
// the loads are spread over the compute and each range is read in address order.
template <typename T>
class RangePrefetcher {
 public:
  RangePrefetcher(const Problem& P, int64_t b, int64_t c0) : P_(P), b_(b), c0_(c0) {}

  // Lines of the ranges of keys [j, end), and starts issuing them.
  int64_t start(int64_t j, int64_t end) {
    ranges_.clear();
    next_ = 0;
    cur_ = stop_ = nullptr;
    const int64_t split = std::clamp(P_.M, j, end);  // memory keys [j, split), chunk keys [split, end)
    if (P_.pos != nullptr) {  // first: scattered rows, the longest to arrive
      const int64_t bytes = P_.D / 2 * static_cast<int64_t>(sizeof(float));
      for (int64_t i = j; i < split; ++i) {
        add(P_.cos + P_.pos[i] * P_.rope_ld, bytes);
        add(P_.sin + P_.pos[i] * P_.rope_ld, bytes);
      }
    }
    for (const View* src : {&P_.mk, &P_.mv}) add_rows(*src, j, split);
    for (const View* src : {&P_.k, &P_.v}) add_rows(*src, c0_ + std::max(j, split) - P_.M, c0_ + end - P_.M);
    int64_t lines = 0;
    for (const auto& r : ranges_) lines += (r.second + 63) / 64;
    return lines;
  }

  void step(int count) {
    while (count > 0) {
      if (cur_ >= stop_) {
        if (next_ == ranges_.size()) return;
        cur_ = ranges_[next_].first;
        stop_ = cur_ + ranges_[next_].second;
        ++next_;
      }
      prefetch_line(cur_);
      cur_ += 64;
      --count;
    }
  }

  void finish() { step(std::numeric_limits<int>::max()); }

 private:
  // Rows [t0, t1) of every head of `src` (rows of batch b).
  void add_rows(const View& src, int64_t t0, int64_t t1) {
    if (t0 >= t1) return;
    const int64_t H = P_.Hkv, D = P_.D, sz = sizeof(T);
    if (src.sh == D && src.st == H * D) return add(src.row<T>(b_, t0, 0), (t1 - t0) * H * D * sz);
    for (int64_t t = t0; t < t1; ++t)
      for (int64_t h = 0; h < H; ++h) add(src.row<T>(b_, t, h), D * sz);
  }
  void add(const void* p, int64_t bytes) {
    ranges_.emplace_back(reinterpret_cast<const char*>(p), bytes);
  }

  const Problem& P_;
  const int64_t b_, c0_;
  std::vector<std::pair<const char*, int64_t>> ranges_;
  size_t next_ = 0;
  const char *cur_ = nullptr, *stop_ = nullptr;
};

// Keys [k0, k1) of the concatenation [memory ; valid chunk keys of row b] for every KV head of batch rows
// [b, b + nb), whose G x Tq query rows each are scored together (row r: batch row b + r / (G Tq)); nb > 1 only for
// memory keys (k1 <= M) of a memory the rows share. Results: finished rows in P.out/P.lse when `part` is null, else
// normalised fp32 rows part[h][r][D] and their LSE part_lse[h][r].
template <typename T, int NV>
void decode_split(const Problem& P, int64_t b, int64_t nb, int64_t k0, int64_t k1, float* part, float* part_lse) {
  constexpr int64_t D = NV * kLanes;
  const int64_t G = P.G, H = P.Hkv, RB = G * P.Tq;  // query rows per batch row
  const int R = static_cast<int>(nb * RB);
  TORCH_CHECK(R <= kMaxJointRows && (nb == 1 || k1 <= P.M), "decode_split: ", nb, " batch rows over keys [", k0,
              ", ", k1, ")");
  Scratch ws(2 * H * R * D + 2 * H * R + D + H * R * D / 2);
  float *q = ws.p, *o = q + H * R * D, *m = o + H * R * D, *l = m + H * R, *tmp = l + H * R;
  uint16_t* q16 = reinterpret_cast<uint16_t*>(tmp + D);  // bf16 only: the rows' own bits, unscaled
  for (int64_t h = 0; h < H; ++h) {
    for (int r = 0; r < R; ++r) {
      float* qr = q + (h * R + r) * D;
      const T* src = P.q.row<T>(b + r / RB, r % RB / G, h * G + r % G);
      for (int64_t i = 0; i < D; i += kLanes) store(qr + i, load_cvt(src + i) * P.scale2);  // D: whole vectors
      if constexpr (std::is_same_v<T, c10::BFloat16>) std::memcpy(q16 + (h * R + r) * D, src, D * sizeof(T));
    }
  }
  std::fill(o, o + H * R * D, 0.f);
  std::fill(m, m + H * R, kNegInf);
  std::fill(l, l + H * R, 0.f);

  const T *key[kDecodeBlock], *val[kDecodeBlock];
  const float *cos[kDecodeBlock], *sin[kDecodeBlock];
  alignas(64) float s[kMaxJointRows * kDecodeBlock];
  alignas(64) uint16_t p16[kMaxJointRows * kDecodeBlock];
  float alpha[kMaxJointRows];
  const int64_t c0 = P.chunk_begin(b), c_end = P.chunk_end(b);  // key j >= M is chunk row c0 + j - M
  // The next block's lines, spread over this block's score passes (H heads x kDecodeBlock / keys per pass).
  RangePrefetcher<T> pf(P, b, c0);
  constexpr int kPassKeys = kScoreKeys<NV> > 0 ? kScoreKeys<NV> : 1;
  const int64_t passes = H * kDecodeBlock / kPassKeys;
  int per_pass = 0;
  auto step = [&] { pf.step(per_pass); };
  pf.start(k0, std::min(k0 + kDecodeBlock, k1));  // the first block's lines, all at once
  pf.finish();
  for (int64_t j0 = k0; j0 < k1; j0 += kDecodeBlock) {
    const int n = static_cast<int>(std::min<int64_t>(kDecodeBlock, k1 - j0));
    const int64_t lines = pf.start(j0 + kDecodeBlock, std::min(j0 + 2 * kDecodeBlock, k1));
    per_pass = static_cast<int>((lines + passes - 1) / passes);
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
      const float* qh = q + h * R * D;
      for (int g = 0; g < kDecodeBlock; g += kLanes) {
        if (g < n) {
          decode_scores<T, NV>(key + g, cos + g, sin + g, qh, q16 + h * R * D, P.scale2, R, s + g, kDecodeBlock,
                               step);
        } else {
          for (int jj = 0; jj < kLanes; jj += kPassKeys) step();
        }
      }
      if (n < kDecodeBlock || causal_mask) {
        for (int r = 0; r < R; ++r) {
          const int64_t thr = r % RB / G + c_end - P.Tq;  // last chunk row visible to the row's query (nb == 1)
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
#if MPLUS_ISA_LEVEL >= 3
          if constexpr (std::is_same_v<T, c10::BFloat16>) {
            _mm256_storeu_si256(reinterpret_cast<__m256i*>(p16 + r * kDecodeBlock + g),
                                reinterpret_cast<__m256i>(_mm512_cvtneps_pbh(p)));
          }
#endif
          sum += p;
        }
        alpha[r] = *mr == kNegInf ? 0.f : *mr == m_new ? 1.f : std::exp2(*mr - m_use);  // exp2(0) = 1 exactly
        l[h * R + r] = l[h * R + r] * alpha[r] + hsum(sum);
        *mr = m_new;
      }
      decode_pv<T, NV>(val, n, s, p16, kDecodeBlock, alpha, R, o + h * R * D);
    }
    pf.finish();
  }

  for (int64_t h = 0; h < H; ++h) {
    for (int r = 0; r < R; ++r) {
      const int64_t i = h * R + r;
      if (part == nullptr) {
        finish_row<T>(P, b + r / RB, r % RB / G, h * G + r % G, o + i * D, m[i], l[i], tmp);
      } else {
        const bool empty = !(l[i] > 0.f);
        for (int64_t d = 0; d < D; ++d) part[i * D + d] = empty ? 0.f : o[i * D + d] / l[i];
        part_lse[i] = empty ? kNegInf : (m[i] + std::log2(l[i])) * kLn2;
      }
    }
  }
}

// Row (b, r) of the output (r < G Tq: query row r / G of head h G + r % G) from n normalised partial rows and their
// natural-log LSEs, merged exactly in the given order: lse = log sum_s exp(lse_s), out = sum_s exp(lse_s - lse) out_s.
template <typename T>
void merge_partials(const Problem& P, int64_t b, int64_t h, int64_t r, const float* const* rows, const float* lse,
                    int64_t n, float* acc) {
  float mx = kNegInf;
  for (int64_t s = 0; s < n; ++s) mx = std::max(mx, lse[s]);
  std::fill(acc, acc + P.D, 0.f);
  float l = 0.f;
  for (int64_t s = 0; s < n && mx != kNegInf; ++s) {
    const float w = std::exp(lse[s] - mx);
    for (int64_t d = 0; d < P.D; ++d) acc[d] += w * rows[s][d];
    l += w;
  }
  // finish_row wants (m, l) in log2 units with acc unnormalised: m = mx / ln 2.
  finish_row<T>(P, b, r / P.G, h * P.G + r % P.G, acc, mx / kLn2, l, acc);
}

// Decode of every batch row: its memory keys in splits of ~kSplitKeys keys and its valid chunk keys in splits of their
// own (boundaries on decode blocks; the counts depend on the shapes only, never on the thread count), handed out
// dynamically; a row's splits merge through their LSEs in a fixed order (memory, then chunk), by the last of its tasks
// to finish: the bits do not depend on the machine's threads. Batch rows that share the memory (a batch-stride-0
// expand: how the model serves one memory state to a batch) are taken nb at a time, as many as fit kMaxJointRows query
// rows: a memory split then reads its keys once for the nb rows, whose rows are scored together, with the same
// arithmetic per row as alone, so that an expanded memory gives the bits of a dense copy. One split in all (short
// rows): the rows are finished in place.
template <typename T, int NV>
void decode(const Problem& P) {
  const int64_t RB = P.G * P.Tq, H = P.Hkv, D = NV * kLanes, slot = H * RB * D;  // slot: one batch row's partial
  const bool shared = P.B > 1 && P.M > 0 && P.mk.sb == 0 && P.mv.sb == 0;
  const int64_t nb = shared ? std::max<int64_t>(1, std::min<int64_t>(P.B, kMaxJointRows / RB)) : 1;
  const int64_t groups = (P.B + nb - 1) / nb;
  auto chunk_keys = [&](int64_t b) { return P.chunk_end(b) - P.chunk_begin(b); };
  int64_t c_max = 0;
  for (int64_t b = 0; b < P.B; ++b) c_max = std::max(c_max, chunk_keys(b));
  const int64_t ms = P.M == 0 ? 0 : std::clamp<int64_t>(P.M / kSplitKeys, 1, kMaxSplits);
  const int64_t cs = c_max == 0 ? 0 : std::clamp<int64_t>(c_max / kSplitKeys, 1, kMaxSplits);
  const int64_t mper = ms == 0 ? 0 : round_up((P.M + ms - 1) / ms, kDecodeBlock);
  if (ms + cs <= 1) {  // nb > 1 only when cs == 0, i.e. no row has chunk keys
    parallel_tasks(groups, [&](int64_t g) {
      const int64_t b0 = g * nb;
      decode_split<T, NV>(P, b0, std::min(nb, P.B - b0), 0, P.M + chunk_keys(b0), nullptr, nullptr);
    });
    return;
  }
  // memory partials [groups][ms][H][nb RB][D] (a short last group leaves its tail unused), chunk ones [B][cs][H][RB][D]
  std::vector<float> mpart(groups * ms * nb * slot), mlse(groups * ms * nb * H * RB);
  std::vector<float> cpart(P.B * cs * slot), clse(P.B * cs * H * RB);
  std::unique_ptr<std::atomic<int64_t>[]> done(new std::atomic<int64_t>[P.B]());
  auto merge = [&](int64_t b) {
    const int64_t g = b / nb, R = std::min(nb, P.B - g * nb) * RB, r0 = (b - g * nb) * RB;  // b's rows in its group
    std::vector<const float*> rows(ms + cs);
    std::vector<float> lse(ms + cs), acc(D);
    for (int64_t h = 0; h < H; ++h) {
      for (int64_t r = 0; r < RB; ++r) {
        for (int64_t sp = 0; sp < ms; ++sp) {
          const int64_t i = (g * ms + sp) * nb * H * RB + h * R + r0 + r;
          rows[sp] = mpart.data() + i * D;
          lse[sp] = mlse[i];
        }
        for (int64_t sp = 0; sp < cs; ++sp) {
          const int64_t i = (b * cs + sp) * H * RB + h * RB + r;
          rows[ms + sp] = cpart.data() + i * D;
          lse[ms + sp] = clse[i];
        }
        merge_partials<T>(P, b, h, r, rows.data(), lse.data(), ms + cs, acc.data());
      }
    }
  };
  auto finished = [&](int64_t b) {
    if (done[b].fetch_add(1) + 1 == ms + cs) merge(b);
  };
  parallel_tasks(groups * ms + P.B * cs, [&](int64_t task) {
    if (task < groups * ms) {
      const int64_t b0 = task / ms * nb, sp = task % ms, n = std::min(nb, P.B - b0);
      decode_split<T, NV>(P, b0, n, std::min(P.M, sp * mper), std::min(P.M, (sp + 1) * mper),
                          mpart.data() + task * nb * slot, mlse.data() + task * nb * H * RB);
      for (int64_t b = b0; b < b0 + n; ++b) finished(b);
    } else {
      const int64_t t = task - groups * ms, b = t / cs, sp = t % cs, n = chunk_keys(b);
      const int64_t per = round_up((n + cs - 1) / cs, kDecodeBlock);
      decode_split<T, NV>(P, b, 1, P.M + std::min(n, sp * per), P.M + std::min(n, (sp + 1) * per),
                          cpart.data() + t * slot, clse.data() + t * H * RB);
      finished(b);
    }
  });
}
