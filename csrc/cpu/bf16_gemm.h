// bf16 x bf16 -> fp32 matrix products for the levels with a bf16 matrix engine (isa.h: avx512_bf16, amx), ISA-generic
// in the sense of the other kernel sources: included inside namespace mplus::MPLUS_ISA after vec.h, at levels >= 3.
//
//   C[M][N] = (accumulate ? C : 0) + A[M][K] . B[K][N]
//
// A: row-major bf16, lda elements apart; K even (callers zero-pad to kGemmK). B: "VNNI" bf16, the layout both the
// vdpbf16ps instruction and an AMX B tile read: the pairs (B[2i][n], B[2i+1][n]) side by side, element (k, n) at
// B[(k / 2) * 2 * ldb + 2 * n + k % 2] (ldb = N for a dense block). C: row-major fp32, ldc apart. N is a multiple of
// 16, M anything.
//
// Which code multiplies, and why:
// * amx: ATen's at::native::cpublas::brgemm, i.e. oneDNN's ukernel API (what torch's own CPU flash attention uses on
//   AMX): a maintained micro-kernel that configures and drives the tiles (ldtilecfg, tileloadd, tdpbf16ps), which
//   this extension would otherwise hand-write with _tile_* intrinsics and could not test on CPUs without AMX. (Its
//   VNNI layout and the kernel above it were checked on a Zen 4, where oneDNN runs the same brgemm calls on its
//   avx512_core_bf16 kernels: the attention tests pass there; on AMX tiles they have not run.)
// * avx512_bf16: this file's own vdpbf16ps micro-kernel (below), although brgemm serves this CPU class too (on a Zen 4
//   core, oneDNN's avx512_core_bf16 brgemm and this micro-kernel give the same prefill time within 2%): oneDNN picks
//   its instruction set itself, from CPUID, for the whole process (ONEDNN_MAX_CPU_ISA, read once), so on an AMX CPU a
//   brgemm-based avx512_bf16 level would run AMX tiles under the avx512_bf16 name, and forcing the level
//   (MPLUS_CPU_ISA, the per-level tests) would not run what it says. The micro-kernel is ~40 lines of the same
//   broadcast-FMA shape as the fp32 ones (attention_kernels.h); one Zen 4 core runs it at 222 GFLOP/s for Q.K^T
//   (48 x 64 x 256) and 190 for P.V (48 x 128 x 64), 96% and 82% of the instruction's 232 (12 independent chains).
// Both need the same packed operands, so the kernels above them are shared.

#if MPLUS_ISA_LEVEL < 3
#error "bf16_gemm.h is for the avx512_bf16 and amx levels"
#endif

using bf16_t = uint16_t;  // the bits of a c10::BFloat16

constexpr int kGemmK = 32;  // K of every product is padded to a multiple of this (an AMX tile row: 32 bf16)

// fp32 -> bf16 bits, round to nearest even (vcvtneps2bf16; inputs here are finite).
inline void store_bf16(bf16_t* p, vf v) {
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), reinterpret_cast<__m256i>(_mm512_cvtneps_pbh(v)));
}

#if MPLUS_ISA_LEVEL == 3
// Micro-tile: kGemmMR rows x NV vectors of 16 columns, NV <= kGemmNV: 24 accumulators + 4 B vectors + 1 broadcast.
constexpr int kGemmMR = 6, kGemmNV = 4;

template <int MR, int NV>
inline void gemm_tile(const bf16_t* A, int64_t lda, const bf16_t* B, int64_t ldb, int K, float* C, int64_t ldc,
                      bool accumulate) {
  __m512 acc[MR][NV];
  for (int r = 0; r < MR; ++r)
    for (int v = 0; v < NV; ++v) acc[r][v] = accumulate ? _mm512_loadu_ps(C + r * ldc + v * 16) : _mm512_setzero_ps();
  for (int p = 0; p < K / 2; ++p) {
    __m512bh b[NV];
    for (int v = 0; v < NV; ++v)
      b[v] = reinterpret_cast<__m512bh>(_mm512_loadu_si512(B + p * 2 * ldb + v * 32));
    for (int r = 0; r < MR; ++r) {
      int32_t pair;  // (A[r][2p], A[r][2p + 1]), broadcast to every lane (folded into vdpbf16ps as {1to16})
      std::memcpy(&pair, A + r * lda + 2 * p, sizeof pair);
      const __m512bh a = reinterpret_cast<__m512bh>(_mm512_set1_epi32(pair));
      for (int v = 0; v < NV; ++v) acc[r][v] = _mm512_dpbf16_ps(acc[r][v], a, b[v]);
    }
  }
  for (int r = 0; r < MR; ++r)
    for (int v = 0; v < NV; ++v) _mm512_storeu_ps(C + r * ldc + v * 16, acc[r][v]);
}

template <int NV>
inline void gemm_cols(int M, const bf16_t* A, int64_t lda, const bf16_t* B, int64_t ldb, int K, float* C, int64_t ldc,
                      bool accumulate) {
  int r = 0;
  for (; r + kGemmMR <= M; r += kGemmMR)
    gemm_tile<kGemmMR, NV>(A + r * lda, lda, B, ldb, K, C + r * ldc, ldc, accumulate);
  const bf16_t* a = A + r * lda;
  float* c = C + r * ldc;
  switch (M - r) {  // kGemmMR - 1 tail rows at most
    case 5: gemm_tile<5, NV>(a, lda, B, ldb, K, c, ldc, accumulate); break;
    case 4: gemm_tile<4, NV>(a, lda, B, ldb, K, c, ldc, accumulate); break;
    case 3: gemm_tile<3, NV>(a, lda, B, ldb, K, c, ldc, accumulate); break;
    case 2: gemm_tile<2, NV>(a, lda, B, ldb, K, c, ldc, accumulate); break;
    case 1: gemm_tile<1, NV>(a, lda, B, ldb, K, c, ldc, accumulate); break;
    default: break;
  }
}
static_assert(kGemmMR == 6, "gemm_cols handles kGemmMR - 1 = 5 tail rows");

inline void gemm_bf16(int M, int N, int K, const bf16_t* A, int64_t lda, const bf16_t* B, int64_t ldb, float* C,
                      int64_t ldc, bool accumulate) {
  // Column panels of kGemmNV vectors (64 columns): the panel of B (K x 64 bf16, 16 KiB at K 128) stays in L1 while
  // the rows stream past it.
  for (int n0 = 0; n0 < N; n0 += kGemmNV * 16) {
    const bf16_t* b = B + 2 * n0;
    float* c = C + n0;
    switch ((std::min(N - n0, kGemmNV * 16) + 15) / 16) {
      case 4: gemm_cols<4>(M, A, lda, b, ldb, K, c, ldc, accumulate); break;
      case 3: gemm_cols<3>(M, A, lda, b, ldb, K, c, ldc, accumulate); break;
      case 2: gemm_cols<2>(M, A, lda, b, ldb, K, c, ldc, accumulate); break;
      default: gemm_cols<1>(M, A, lda, b, ldb, K, c, ldc, accumulate); break;
    }
  }
}

// Nothing to release: no tile state.
inline void gemm_bf16_release() {}

#else  // MPLUS_ISA_LEVEL == 4: ATen's brgemm on the AMX tiles (UNTESTED on AMX hardware, see the module notes)

inline void gemm_bf16(int M, int N, int K, const bf16_t* A, int64_t lda, const bf16_t* B, int64_t ldb, float* C,
                      int64_t ldc, bool accumulate) {
  // oneDNN keeps one generated kernel per shape (M, N, K, ld*, add_C) in a per-process cache; the shapes here are a
  // handful per call (row tails), so each is generated once.
  at::native::cpublas::brgemm(M, N, K, lda, ldb, ldc, accumulate, reinterpret_cast<const c10::BFloat16*>(A),
                              reinterpret_cast<const c10::BFloat16*>(B), C, /*is_vnni=*/true);
}

// Releases the tile configuration brgemm left loaded (torch's flash attention does it at the end of each thread's
// work), so the next AMX user of this thread configures its own.
inline void gemm_bf16_release() { at::native::cpublas::brgemm_release(/*is_vnni=*/true); }

#endif
