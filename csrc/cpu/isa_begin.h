// Switches the code generator to the ISA level MPLUS_ISA_LEVEL (0 baseline, 1 avx2, 2 avx512, 3 avx512_bf16, 4 amx)
// for the rest of the translation unit, up to isa_end.h (isa.h explains why a pragma and not a compiler flag).
// Include it after every standard / ATen header the code needs: what comes after it is compiled for the level.
#if !defined(MPLUS_ISA) || !defined(MPLUS_ISA_LEVEL)
#error "define MPLUS_ISA (the namespace) and MPLUS_ISA_LEVEL before including isa_begin.h"
#endif
#if defined(__clang__) || !defined(__GNUC__)
#error "the ISA variants of the CPU kernels are built with GCC's #pragma GCC target; build with g++"
#endif
#pragma GCC push_options
// amx: the tiles are driven by ATen's brgemm (oneDNN's JIT code, bf16_gemm.h), so the level's own code needs no AMX
// instruction, only those of avx512_bf16 (its softmax and packing share that level's code).
#if MPLUS_ISA_LEVEL == 3 || MPLUS_ISA_LEVEL == 4
#pragma GCC target("avx512f,avx512bw,avx512dq,avx512vl,avx512bf16,avx2,fma,f16c,bmi,bmi2,lzcnt,popcnt")
#elif MPLUS_ISA_LEVEL == 2
#pragma GCC target("avx512f,avx512bw,avx512dq,avx512vl,avx2,fma,f16c,bmi,bmi2,lzcnt,popcnt")
#elif MPLUS_ISA_LEVEL == 1
#pragma GCC target("avx2,fma,f16c,bmi,bmi2,lzcnt,popcnt")
#elif MPLUS_ISA_LEVEL != 0
#error "MPLUS_ISA_LEVEL must be 0, 1, 2, 3 or 4"
#endif
// GCC 12's AVX-512 headers trip -Wuninitialized / -Wmaybe-uninitialized on their own _mm512_undefined_*()
// placeholders once inlined at -O3; the warnings are about the headers.
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wuninitialized"
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#pragma GCC diagnostic ignored "-Wpsabi"
