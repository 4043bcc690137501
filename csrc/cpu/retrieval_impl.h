// Retriever scoring on the CPU, ISA-generic (csrc/cpu/retrieval.cpp checks the arguments, builds the Problem and
// selects the top K; the files in isa/ compile this once per ISA level inside namespace mplus::<level>, see isa.h).
//
// score(s) = mean_t sigmoid(q_t . k_s); the [T, S] matrix is never built.
// * Queries are converted to fp32 and packed once into blocks of NV vectors of kLanes query lanes,
//   [n_blocks][ds][NV * kLanes]: lane l of block b is query b * NV * kLanes + l (zero beyond T, masked out of the
//   sums).
// * At the avx512_bf16 level bf16 inputs skip the widening: queries are packed as pairs of dims (one 32-bit lane per
//   query and pair), keys copied as they are, and the micro-kernel runs vdpbf16ps (micro_tile_bf16; retrieval.cpp
//   says why not at the amx level).
// * Threads take units of ~kUnitKeysTarget keys (whole tiles) from an atomic counter (dynamic scheduling: a busy
//   neighbour on one core does not stall the others) and convert the unit's keys to fp32 into a small local buffer
//   (any row stride). (Tiles transposed to [ds][MR], which saves the kernel an integer register per key row, were
//   measured: the scalar transposition costs more than the kernel at T <= 256, and gained nothing clear at T 2048.)
// * The micro-kernel holds an MR keys x NV vectors tile of dot products in registers: per element d, NV query
//   vectors are loaded and each key's element is broadcast into a multiply-add with them (with NV = 1 on AVX-512 the
//   broadcast folds into the FMA's memory operand). Then a vectorised sigmoid, and the tile is added into one fp32
//   vector of partial sums per key and query vector. The tile fills the register file: MR * NV accumulators + NV
//   query vectors + 1 broadcast (+ 1 product on the baseline, which has no FMA) <= kVectorRegisters.
// * Query blocks are visited in chunks of ~256 KiB (kept in L2 while every key tile of the unit passes over them;
//   the key tile stays in L1). Each key's partial sums run over the query blocks in block order, and its lanes are
//   then added left to right, whatever its position in the tile, its unit or its thread: the result does not depend
//   on the thread count and identical keys get bit-identical scores (at a given ISA level).
//
// Library headers come from prelude.h (included before the ISA region); this file includes only kernel sources.

namespace mplus {
namespace MPLUS_ISA {
namespace {

using ::mplus::retr::KeyRange;
using ::mplus::retr::Problem;
#include "vec.h"
#if MPLUS_ISA_LEVEL == 3
#include "bf16_pairs.h"
#endif

constexpr int64_t kChunkBytes = 256 << 10;  // packed queries visited per pass over a unit (stays in L2)
constexpr int64_t kUnitKeysTarget = 48;     // keys per work unit handed to a thread (rounded up to whole tiles)

// The micro-tile shapes of the level, NV query vectors x MR keys: `kSmall` when the queries fit one vector (less
// padding), `kLarge` otherwise. Measured at T 2048, ds 256 on a 2-core AVX-512 Xeon (fp32 FMA peak per core: 160
// GFLOP/s with zmm, 82 with ymm; with keys in transposed tiles, see above), the shapes that fit the register file
// ran within a few per cent of each other: AVX-512 2x14, 1x24, 3x9, 4x6 at ~235 GFLOP/s; AVX2 2x6, 1x12, 3x4 at
// ~130 (1x14, all 16 registers, ~10 % slower); baseline 2x6 and 3x4 at ~37 (1x12 ~10 % slower). 2x6 is the classic
// AVX2 shape: 8 loads per 12 FMAs, so it stays FMA-bound on CPUs with two loads per cycle (1x12 needs 13 per 12),
// and it needs only 6 key-row offsets in integer registers (2x14 reloads 2 of its 14 from the stack).
struct TileShape {
  int nv, mr;
};
#if MPLUS_ISA_LEVEL >= 2
constexpr TileShape kSmall{1, 24}, kLarge{2, 14};  // 24 + 1, 28 + 2 + 1 of 32 zmm
#elif MPLUS_ISA_LEVEL == 1
constexpr TileShape kSmall{1, 12}, kLarge{2, 6};  // 12 + 1 + 1, 12 + 2 + 1 of 16 ymm
#else
constexpr TileShape kSmall{1, 12}, kLarge{2, 6};  // 12 + 1 + 1 (+ 1 product), 12 + 2 + 1 (+ 1) of 16 xmm
#endif
static_assert(kSmall.nv * kSmall.mr + kSmall.nv + 1 + (MPLUS_ISA_LEVEL == 0) <= kVectorRegisters &&
                  kLarge.nv * kLarge.mr + kLarge.nv + 1 + (MPLUS_ISA_LEVEL == 0) <= kVectorRegisters,
              "a micro-tile must fit the register file");

// sigmoid(x) = 1 / (1 + 2^z), z = -x * log2(e) clamped to [-100, 100] (beyond, sigmoid is 0 or 1 in fp32, and 2^z
// stays a normal float); 2^z by vec.h's exp2_in_range (~2 ulp), then a true division. Absolute error ~1e-7 for every
// x (vec.h's exp2v is for arguments <= 0 only). NaN stays NaN.
inline vf sigmoid(vf x) {
  vf z = x * -1.44269504088896341f;
  z = min_x86(splat(100.f), max_x86(splat(-100.f), z));  // NaN stays NaN
  return 1.f / (exp2_in_range(z) + 1.f);
}

// sums[(r * NV + v) * kLanes + l] += sigmoid(acc[r][v] lane l), lanes >= real[v] (padded queries) left out.
template <int NV, int MR>
inline void add_sigmoids(vf (&acc)[MR][NV], float* __restrict sums, const int* real) {
#pragma GCC unroll 32
  for (int r = 0; r < MR; ++r) {
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) {
      float* dst = sums + (r * NV + v) * kLanes;
      store(dst, load(dst) + keep_first(sigmoid(acc[r][v]), real[v]));
    }
  }
}

// sums[(r * NV + v) * kLanes + l] += sigmoid(K[r] . Q[v * kLanes + l]) over one query block. q: [ds][NV * kLanes]
// packed block; kb: MR key rows of ds fp32, ds apart.
template <int NV, int MR>
void micro_tile(const float* __restrict q, const float* __restrict kb, int64_t ds, float* __restrict sums,
                const int* real) {
  vf acc[MR][NV];
#pragma GCC unroll 32
  for (int r = 0; r < MR; ++r) {
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) acc[r][v] = vf{};
  }
  for (int64_t d = 0; d < ds; ++d) {
    vf a[NV];
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) a[v] = load(q + (d * NV + v) * kLanes);
#pragma GCC unroll 32
    for (int r = 0; r < MR; ++r) {
      const float b = kb[r * ds + d];  // vector * scalar: a broadcast GCC can fold into the FMA
#pragma GCC unroll 4
      for (int v = 0; v < NV; ++v) acc[r][v] += a[v] * b;
    }
  }
  add_sigmoids<NV, MR>(acc, sums, real);
}

#if MPLUS_ISA_LEVEL == 3
// The same for bf16 queries and keys on vdpbf16ps (bf16_pairs.h): q: [depth][NV * kLanes] packed block of pairs;
// kb: MR key rows of `depth` pairs.
template <int NV, int MR>
void micro_tile_bf16(const float* __restrict q, const float* __restrict kb, int64_t depth, float* __restrict sums,
                     const int* real) {
  vf acc[MR][NV];
  dot_pairs<MR, NV>(q, NV * kLanes, kb, depth, depth, acc);
  add_sigmoids<NV, MR>(acc, sums, real);
}
#endif

// The operands of a kernel: `depth` 32-bit elements per query or key row (packed queries [depth][block lanes], key
// rows `depth` apart), what `row` writes from a row of ds input elements, and the micro-tiles.
// Fp32Operands: each element widened to fp32 (every dtype, every level).
struct Fp32Operands {
  static int64_t depth(int64_t ds) { return ds; }
  static void row(const void* src, c10::ScalarType dtype, int64_t ds, float* dst) { row_to_float(src, dtype, ds, dst); }
  template <int NV, int MR>
  static void tile(const float* q, const float* kb, int64_t depth, float* sums, const int* real) {
    micro_tile<NV, MR>(q, kb, depth, sums, real);
  }
};

#if MPLUS_ISA_LEVEL == 3
// Bf16Operands: bf16 rows as they are, a pair of elements per 32-bit lane (the last one zero-padded for an odd ds).
struct Bf16Operands {
  static int64_t depth(int64_t ds) { return pairs_depth(ds); }
  static void row(const void* src, c10::ScalarType, int64_t ds, float* dst) { copy_pairs(src, ds, dst); }
  template <int NV, int MR>
  static void tile(const float* q, const float* kb, int64_t depth, float* sums, const int* real) {
    micro_tile_bf16<NV, MR>(q, kb, depth, sums, real);
  }
};
#endif

// Micro-tiles for 1..MR keys (the last tile of a range may be short): entry m - 1 has m keys.
using TileFn = void (*)(const float*, const float*, int64_t, float*, const int*);
template <typename Ops, int NV, int... I>
constexpr std::array<TileFn, sizeof...(I)> tile_table(std::integer_sequence<int, I...>) {
  return {&Ops::template tile<NV, I + 1>...};
}

int64_t element_size(c10::ScalarType dtype) { return dtype == c10::ScalarType::Float ? 4 : 2; }

// All scores, with micro-tiles of NV query vectors by MR keys on the operands of Ops.
template <typename Ops, int NV, int MR>
void score_all(const Problem& P) {
  constexpr int64_t kBlock = NV * kLanes;  // queries per packed block
  const int64_t T = P.T, ds = P.ds, depth = Ops::depth(ds);
  const int64_t esize = element_size(P.dtype);
  const int64_t n_blocks = (T + kBlock - 1) / kBlock;

  // Queries packed once, [n_blocks][depth][kBlock] (zero beyond T).
  Scratch packed(n_blocks * depth * kBlock);
  float* qp = packed.p;
  const char* q_base = static_cast<const char*>(P.queries);
  at::parallel_for(0, n_blocks, 1, [&](int64_t b0, int64_t b1) {
    Scratch row(ds);
    for (int64_t b = b0; b < b1; ++b) {
      float* blk = qp + b * depth * kBlock;
      for (int64_t l = 0; l < kBlock; ++l) {
        const int64_t t = b * kBlock + l;
        if (t < T) {
          Ops::row(q_base + t * P.q_stride * esize, P.dtype, ds, row.p);
        } else {
          std::fill(row.p, row.p + depth, 0.f);  // 0.f: the bits of a zero pair too
        }
        for (int64_t d = 0; d < depth; ++d) blk[d * kBlock + l] = row.p[d];
      }
    }
  });
  // Real queries per vector of a block: all of them but in the last block.
  int full_real[NV], last_real[NV];
  for (int v = 0; v < NV; ++v) {
    full_real[v] = kLanes;
    last_real[v] = static_cast<int>(std::clamp<int64_t>(T - (n_blocks - 1) * kBlock - v * kLanes, 0, kLanes));
  }
  // ds = 0 is allowed (every q . k = 0, score 0.5): guard the division.
  const int64_t chunk_blocks = std::max<int64_t>(1, kChunkBytes / std::max<int64_t>(1, depth * kBlock * 4));

  constexpr int64_t kUnitKeys = (kUnitKeysTarget + MR - 1) / MR * MR;
  std::array<int64_t, retr::kMaxRanges + 1> unit_start{};
  for (int r = 0; r < P.num_ranges; ++r) {
    unit_start[r + 1] = unit_start[r] + (P.ranges[r].rows + kUnitKeys - 1) / kUnitKeys;
  }
  const int64_t n_units = unit_start[P.num_ranges];
  static constexpr auto tiles = tile_table<Ops, NV>(std::make_integer_sequence<int, MR>{});
  const float t_count = static_cast<float>(T);

  std::atomic<int64_t> next_unit{0};
  const int64_t n_workers = std::min<int64_t>(at::get_num_threads(), std::max<int64_t>(n_units, 1));
  at::parallel_for(0, n_workers, 1, [&](int64_t, int64_t) {
    Scratch keybuf(kUnitKeys * depth);  // [kUnitKeys][depth]
    Scratch sums(kUnitKeys * kBlock);
    for (int64_t u = next_unit.fetch_add(1); u < n_units; u = next_unit.fetch_add(1)) {
      int r = 0;
      while (u >= unit_start[r + 1]) ++r;
      const KeyRange& range = P.ranges[r];
      const int64_t first = (u - unit_start[r]) * kUnitKeys;
      const int64_t count = std::min(kUnitKeys, range.rows - first);
      const char* k_base = static_cast<const char*>(range.data);
      for (int64_t i = 0; i < count; ++i) {
        Ops::row(k_base + (first + i) * range.stride * esize, P.dtype, ds, keybuf.p + i * depth);
      }
      std::fill(sums.p, sums.p + count * kBlock, 0.f);
      // Query chunks outermost so a chunk stays in L2 while every key tile of the unit visits it; each key still
      // sees the blocks in ascending order.
      for (int64_t c0 = 0; c0 < n_blocks; c0 += chunk_blocks) {
        const int64_t c1 = std::min(n_blocks, c0 + chunk_blocks);
        for (int64_t k0 = 0; k0 < count; k0 += MR) {
          const TileFn tile = tiles[std::min<int64_t>(MR, count - k0) - 1];
          for (int64_t b = c0; b < c1; ++b) {
            tile(qp + b * depth * kBlock, keybuf.p + k0 * depth, depth, sums.p + k0 * kBlock,
                 b == n_blocks - 1 ? last_real : full_real);
          }
        }
      }
      float* out = P.scores + range.offset + first;
      for (int64_t i = 0; i < count; ++i) {
        // The kBlock lane sums of a key, left to right: the same order for every key.
        const float* lanes = sums.p + i * kBlock;
        float total = 0.f;
        for (int64_t l = 0; l < kBlock; ++l) total += lanes[l];
        out[i] = total / t_count;
      }
    }
  });
}

template <typename Ops>
void score_all_tiles(const Problem& P) {
  if (P.T <= kSmall.nv * kLanes) {
    score_all<Ops, kSmall.nv, kSmall.mr>(P);
  } else {
    score_all<Ops, kLarge.nv, kLarge.mr>(P);
  }
}

}  // namespace

void retrieval_scores(const Problem& P) {
  if (P.num_ranges == 0) return;
#if MPLUS_ISA_LEVEL == 3
  if (P.dtype == c10::ScalarType::BFloat16) return score_all_tiles<Bf16Operands>(P);
#endif
  score_all_tiles<Fp32Operands>(P);
}

}  // namespace MPLUS_ISA
}  // namespace mplus
