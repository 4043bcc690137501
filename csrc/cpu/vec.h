// The vector layer of the CPU kernels: one fp32 vector type `vf` of the ISA level's native width (kLanes = 4 on the
// baseline, 8 with AVX2, 16 with AVX-512), written with GCC vector extensions so that every `vf` is one xmm / ymm /
// zmm register and `acc += x * v` one (fused, from AVX2 on) multiply-add. A vector wider than the ISA's registers
// (what a fixed 16-lane type was on AVX2) is not split into registers by GCC but kept in memory, which made every
// operation a load and a store; hence one width per level. Dtype conversions use the level's own instructions (F16C,
// AVX2 / AVX-512 widening shifts); the baseline converts fp16 through c10::Half.
//
// Included by the *_kernels.h / *_impl.h sources inside namespace mplus::MPLUS_ISA, after isa_begin.h; the library
// headers it uses come from prelude.h.

#if MPLUS_ISA_LEVEL >= 2
constexpr int kLanes = 16;
#elif MPLUS_ISA_LEVEL == 1
constexpr int kLanes = 8;
#else
constexpr int kLanes = 4;
#endif
// Register file of the level (the micro-kernels size their tiles by it): 32 zmm, 16 ymm, 16 xmm.
constexpr int kVectorRegisters = MPLUS_ISA_LEVEL >= 2 ? 32 : 16;

typedef float vf __attribute__((vector_size(4 * kLanes)));
typedef int32_t vi __attribute__((vector_size(4 * kLanes)));
typedef uint32_t vu __attribute__((vector_size(4 * kLanes)));
typedef uint16_t vu16 __attribute__((vector_size(2 * kLanes)));
constexpr float kNegInf = -std::numeric_limits<float>::infinity();

// 64-byte aligned fp32 scratch owned by its scope (at least one element, so n = 0 is fine).
struct Scratch {
  explicit Scratch(int64_t n)
      : p(static_cast<float*>(::operator new[](std::max<int64_t>(n, 1) * sizeof(float), std::align_val_t{64}))) {}
  ~Scratch() { ::operator delete[](p, std::align_val_t{64}); }
  Scratch(const Scratch&) = delete;
  Scratch& operator=(const Scratch&) = delete;
  float* p;
};

// Prefetch into L2 (prefetcht1): the lines are consumed a block later, after the compute in between has cycled L1,
// and measured faster than prefetcht0 (fewer stalls on the line-fill buffers). Written as asm because GCC 12 drops
// __builtin_prefetch from loops it proves otherwise free of side effects (the decode loop lost all of them).
inline void prefetch_line(const void* p) {
#if defined(__x86_64__)
  asm volatile("prefetcht1 %0" : : "m"(*static_cast<const char*>(p)));
#else
  __builtin_prefetch(p, 0, 2);
#endif
}

// A constant index vector: lane i holds f(i). Built from a brace list so that GCC sees a constant (element-wise
// assignment makes it assemble the vector at run time).
template <typename F, int... I>
constexpr vi index_vector_impl(F f, std::integer_sequence<int, I...>) {
  return vi{f(I)...};
}
template <typename F>
constexpr vi index_vector(F f) {
  return index_vector_impl(f, std::make_integer_sequence<int, kLanes>{});
}

inline vf splat(float x) { return vf{} + x; }
inline vf load(const float* p) {
  vf v;
  std::memcpy(&v, p, sizeof v);
  return v;
}
inline void store(float* p, vf v) { std::memcpy(p, &v, sizeof v); }
inline vf vmax(vf a, vf b) { return a > b ? a : b; }
// x86's max(a, b) / min(a, b): b where either is NaN, so a NaN x stays NaN through min_x86(hi, max_x86(lo, x)) (the
// sigmoid clamps of the retriever kernels). One instruction; GCC compiles the a > b ? a : b of vmax to a compare and a
// blend (it keeps the signed-zero semantics of the ?:).
inline vf max_x86(vf a, vf b) {
#if MPLUS_ISA_LEVEL >= 2
  return _mm512_max_ps(a, b);
#elif MPLUS_ISA_LEVEL == 1
  return _mm256_max_ps(a, b);
#elif defined(__SSE2__)
  return _mm_max_ps(a, b);
#else
  return a > b ? a : b;
#endif
}
inline vf min_x86(vf a, vf b) {
#if MPLUS_ISA_LEVEL >= 2
  return _mm512_min_ps(a, b);
#elif MPLUS_ISA_LEVEL == 1
  return _mm256_min_ps(a, b);
#elif defined(__SSE2__)
  return _mm_min_ps(a, b);
#else
  return a < b ? a : b;
#endif
}
// Lanes [0, n) of a, the rest 0 (n in [0, kLanes]).
inline vf keep_first(vf a, int n) {
  constexpr vi idx = index_vector([](int i) { return i; });
  return idx < (vi{} + n) ? a : vf{};
}

// --- kLanes elements of an input dtype <-> kLanes fp32 lanes ------------------------------------------------------
inline vf load_cvt(const float* p) { return load(p); }
inline vf load_cvt(const c10::BFloat16* p) {  // bf16 is the top half of an fp32: exact
#if MPLUS_ISA_LEVEL >= 2
  const __m512i w = _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
  return reinterpret_cast<vf>(_mm512_slli_epi32(w, 16));
#elif MPLUS_ISA_LEVEL == 1
  const __m256i w = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  return reinterpret_cast<vf>(_mm256_slli_epi32(w, 16));
#else
  vu16 h;
  std::memcpy(&h, p, sizeof h);
  return reinterpret_cast<vf>(__builtin_convertvector(h, vu) << 16);
#endif
}
inline vf load_cvt(const c10::Half* p) {  // exact
#if MPLUS_ISA_LEVEL >= 2
  return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
#elif MPLUS_ISA_LEVEL == 1
  return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
#else
  vf v;
  for (int i = 0; i < kLanes; ++i) v[i] = static_cast<float>(p[i]);
  return v;
#endif
}
inline void store_cvt(float* p, vf v) { store(p, v); }
inline void store_cvt(c10::Half* p, vf v) {  // round to nearest even (c10::Half's rule)
#if MPLUS_ISA_LEVEL >= 2
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), _mm512_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
#elif MPLUS_ISA_LEVEL == 1
  _mm_storeu_si128(reinterpret_cast<__m128i*>(p), _mm256_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
#else
  for (int i = 0; i < kLanes; ++i) p[i] = c10::Half(v[i]);
#endif
}
inline void store_cvt(c10::BFloat16* p, vf v) {  // round to nearest even, NaN stays NaN (c10::BFloat16's rule)
  const vu u = reinterpret_cast<vu>(v);
  vu r = (u + 0x7FFFu + ((u >> 16) & 1u)) >> 16;
  r = (v != v) ? vu{} + 0x7FC0u : r;
  const vu16 h = __builtin_convertvector(r, vu16);
  std::memcpy(p, &h, sizeof h);
}

// A row of n elements converted to fp32 and back (n need not be a multiple of kLanes).
template <typename T>
inline void load_row(const T* src, float* dst, int64_t n) {
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes) store(dst + i, load_cvt(src + i));
  for (; i < n; ++i) dst[i] = static_cast<float>(src[i]);
}
template <typename T>
inline void store_row(T* dst, const float* src, int64_t n) {
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes) store_cvt(dst + i, load(src + i));
  for (; i < n; ++i) dst[i] = static_cast<T>(src[i]);
}
// n elements of `dtype` (fp32, bf16 or fp16) -> fp32 (exact), for kernels that take the dtype at run time.
inline void row_to_float(const void* src, c10::ScalarType dtype, int64_t n, float* dst) {
  if (dtype == c10::ScalarType::Float) {
    load_row(static_cast<const float*>(src), dst, n);
  } else if (dtype == c10::ScalarType::BFloat16) {
    load_row(static_cast<const c10::BFloat16*>(src), dst, n);
  } else {
    load_row(static_cast<const c10::Half*>(src), dst, n);
  }
}

// 2^x for x in [-125, 126]: x = n + f with f in [-1/2, 1/2], 2^f by Cephes' exp2f polynomial (relative error ~1e-7),
// 2^n added to the exponent bits. The callers clamp x to that range first.
inline vf exp2_in_range(vf x) {
  const vf magic = splat(12582912.f);  // 1.5 * 2^23: adding it rounds to an integer kept in the low mantissa bits
  const vf t = x + magic;
  const vf f = x - (t - magic);
  vf p = splat(1.535336188319500e-4f);
  p = p * f + 1.339887440266574e-3f;
  p = p * f + 9.618437357674640e-3f;
  p = p * f + 5.550332471162809e-2f;
  p = p * f + 2.402264791363012e-1f;
  p = p * f + 6.931472028550421e-1f;
  p = p * f + 1.0f;
  const vi e = (reinterpret_cast<vi>(t) - reinterpret_cast<vi>(magic)) << 23;
  return reinterpret_cast<vf>(reinterpret_cast<vi>(p) + e);
}

// 2^x for x <= 0 (softmax arguments). x < -125 (including -inf, masked keys) gives exactly 0.
inline vf exp2v(vf x) {
  const vi tiny = x < splat(-125.f);
  const vf r = exp2_in_range(tiny ? splat(-125.f) : x);
  return tiny ? vf{} : r;
}

// Lane i of the result is lane i ^ S of v (S a power of two below kLanes): one in-register permute.
template <int S>
inline vf swap_lanes(vf v) {
  constexpr vi idx = index_vector([](int i) { return i ^ S; });
  return __builtin_shuffle(v, idx);
}

// Horizontal max / sum by halving (log2(kLanes) shuffle steps).
template <int S = kLanes / 2>
inline float hmax(vf v) {
  if constexpr (S == 0) {
    return v[0];
  } else {
    return hmax<S / 2>(vmax(v, swap_lanes<S>(v)));
  }
}
template <int S = kLanes / 2>
inline float hsum(vf v) {
  if constexpr (S == 0) {
    return v[0];
  } else {
    return hsum<S / 2>(v + swap_lanes<S>(v));
  }
}

// out[i] = sum of the lanes of x[i], i < kLanes: a tree of kLanes - 1 shuffle-add pairs instead of kLanes separate
// horizontal sums. Step s (1, 2, 4, ...) folds each pair (u, w) of partial vectors into one whose lane l carries u's
// partial sum over lanes {l, l ^ s} where bit s of l is 0, and w's where it is 1; after log2(kLanes) steps lane l holds
// the whole sum of x[l]. The lane order of each sum is fixed, so equal inputs give equal bits.
template <int S = 1>
inline vf transpose_reduce(vf* cur) {  // cur[0 .. kLanes / S) is overwritten
  if constexpr (S == kLanes) {
    return cur[0];
  } else {
    constexpr vi same = index_vector([](int l) { return (l & S) ? kLanes + l : l; });
    constexpr vi cross = index_vector([](int l) { return (l & S) ? kLanes + (l ^ S) : (l ^ S); });
    for (int i = 0; i < kLanes / S / 2; ++i) {
      const vf u = cur[2 * i], w = cur[2 * i + 1];
      cur[i] = __builtin_shuffle(u, w, same) + __builtin_shuffle(u, w, cross);
    }
    return transpose_reduce<2 * S>(cur);
  }
}
