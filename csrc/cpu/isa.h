// Runtime ISA dispatch of the CPU kernels (the way ATen's DispatchStub does it, without its macros).
//
// Each kernel family is compiled once per ISA level from one ISA-generic source (`<family>_impl.h`): the small
// files in csrc/cpu/isa/ include the family's headers (compiled for the portable baseline, like the rest of the
// extension), then switch the code generator to the level's instruction set with `#pragma GCC target` (isa_begin.h)
// and include the implementation inside the namespace `mplus::<level>`. Nothing the standard library or ATen defines
// is compiled for a higher level (their headers come before the pragma), so no inline function the linker might
// share between translation units can carry an instruction the CPU lacks; the extension is built without -march and
// loads on any x86-64 CPU. At load the best level the CPU (and OS) supports is chosen; `set_active_isa` (from
// Python: mplus_kernels.set_cpu_isa, or MPLUS_CPU_ISA) picks another one it supports, and refuses the others.
//
// | level       | instructions                                | vectors            | built on          |
// |-------------|---------------------------------------------|--------------------|-------------------|
// | baseline    | x86-64 (SSE2) or the host's default          | 4 fp32 lanes (xmm) | every architecture |
// | avx2        | AVX2 + FMA + F16C                           | 8 lanes (ymm, 16)  | x86-64            |
// | avx512      | AVX-512 F/BW/DQ/VL + the above              | 16 lanes (zmm, 32) | x86-64            |
// | avx512_bf16 | + AVX512_BF16 (vdpbf16ps: bf16 pairs, fp32 sums) | 16 lanes       | x86-64            |
// | amx         | + AMX-TILE/AMX-BF16, through ATen's brgemm  | 16 lanes + tiles   | x86-64            |
//
// The two top levels change only the bf16 matrix products of the compute-bound kernels, for bf16 inputs: attention
// prefill and backward (avx512_bf16 on this extension's own vdpbf16ps micro-kernels, amx on ATen's cpublas::brgemm,
// oneDNN's ukernel, which drives the AMX tiles; bf16_gemm.h says why a library there and intrinsics here), and at
// avx512_bf16 only the retrieval scoring and the retriever scores' dot products (vdpbf16ps, bf16_pairs.h; their amx
// entries are the fp32 kernels, MPLUS_ISA_TABLE_BF16). A family without a kernel of its own at a level is listed in
// its table with the kernel of the level below (MPLUS_ISA_TABLE_AVX512, MPLUS_ISA_TABLE_BF16): the level is still
// reported and selectable, and its tests run what it runs.
// The amx level also needs the OS to grant the process the tile state (Linux's ARCH_REQ_XCOMP_PERM, requested once,
// on first detection) and ATen's brgemm to be usable (a build with oneDNN's ukernel, oneDNN not disabled);
// `isa_missing` says which is lacking.
#pragma once

#include <array>
#include <string>

namespace mplus {

enum class Isa : int { kBaseline = 0, kAvx2 = 1, kAvx512 = 2, kAvx512Bf16 = 3, kAmx = 4 };
constexpr int kNumIsa = 5;

const char* isa_name(Isa isa);
// Built into this extension, and executable by this CPU and OS.
bool isa_supported(Isa isa);
// Why `isa` is not supported here ("" when it is): the missing CPU feature, OS permission or library.
std::string isa_missing(Isa isa);
// The best supported level (what the extension starts with).
Isa best_isa();
Isa active_isa();
// Makes `isa` the level every kernel uses from now on; TORCH_CHECK-fails for a level that is not supported.
void set_active_isa(Isa isa);
// TORCH_CHECK-fails, naming `op`, when the active level cannot run now: the amx level's products need oneDNN, which
// torch.backends.mkldnn.enabled = False switches off after the level was chosen. Called by the families that use it.
void require_active_isa(const char* op);
// The level named `name` ("baseline", "avx2", "avx512", "avx512_bf16", "amx"); TORCH_CHECK-fails for an unknown name.
Isa isa_from_name(const std::string& name);

// One entry point per level; entries of levels not built on this architecture are null (and never supported).
template <typename Fn>
struct IsaTable {
  std::array<Fn, kNumIsa> fn;
  Fn active() const { return fn[static_cast<int>(active_isa())]; }
};

#if defined(__x86_64__) || defined(_M_X64)
#define MPLUS_ISA_X86 1
// The table of a family whose avx512_bf16 and amx entries are the kernels of levels `bf16` and `amx`.
#define MPLUS_ISA_TABLE_OF(name, bf16, amx)                                                                  \
  {                                                                                                          \
    {                                                                                                        \
      &::mplus::baseline::name, &::mplus::avx2::name, &::mplus::avx512::name, &::mplus::bf16::name,        \
          &::mplus::amx::name                                                                                \
    }                                                                                                        \
  }
// A family compiled at every level.
#define MPLUS_ISA_TABLE(name) MPLUS_ISA_TABLE_OF(name, avx512_bf16, amx)
// A family with no bf16 / AMX kernels yet: the two top levels run its avx512 kernels.
#define MPLUS_ISA_TABLE_AVX512(name) MPLUS_ISA_TABLE_OF(name, avx512, avx512)
// A family with vdpbf16ps kernels (avx512_bf16) and no AMX ones: the amx level runs its avx512 kernels, not the
// vdpbf16ps ones (on the AMX Xeon this project measured, vdpbf16ps gave half the flops of the fp32 FMAs).
#define MPLUS_ISA_TABLE_BF16(name) MPLUS_ISA_TABLE_OF(name, avx512_bf16, avx512)
#else
#define MPLUS_ISA_X86 0
#define MPLUS_ISA_TABLE(name) \
  { { &::mplus::baseline::name, nullptr, nullptr, nullptr, nullptr } }
#define MPLUS_ISA_TABLE_AVX512(name) MPLUS_ISA_TABLE(name)
#define MPLUS_ISA_TABLE_BF16(name) MPLUS_ISA_TABLE(name)
#endif

}  // namespace mplus
