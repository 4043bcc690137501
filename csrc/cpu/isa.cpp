// CPU feature detection and the active ISA level of the CPU kernels (isa.h).
#include "isa.h"

#include <ATen/Context.h>
#include <c10/util/Exception.h>

#include <atomic>

#if defined(__x86_64__) || defined(_M_X64)
#include <ATen/native/CPUBlas.h>
#include <cpuid.h>
#endif
#if defined(__linux__)
#include <sys/syscall.h>
#include <unistd.h>
#endif

namespace mplus {
namespace {

bool cpu_has_avx2() {
#if MPLUS_ISA_X86
  // libgcc's cpuinfo also checks, through XGETBV, that the OS saves the ymm / zmm state.
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c");
#else
  return false;
#endif
}

bool cpu_has_avx512() {
#if MPLUS_ISA_X86
  __builtin_cpu_init();
  return cpu_has_avx2() && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
         __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("avx512vl");
#else
  return false;
#endif
}

bool cpu_has_avx512_bf16() {
#if MPLUS_ISA_X86
  __builtin_cpu_init();
  return cpu_has_avx512() && __builtin_cpu_supports("avx512bf16");
#else
  return false;
#endif
}

#if MPLUS_ISA_X86
// CPUID.(EAX=7, ECX=0):EDX bits of AMX: AMX-BF16 (22), AMX-TILE (24).
bool cpuid_has_amx() {
  unsigned eax = 0, ebx = 0, ecx = 0, edx = 0;
  if (__get_cpuid_max(0, nullptr) < 7) return false;
  __cpuid_count(7, 0, eax, ebx, ecx, edx);
  return (edx >> 22 & 1u) && (edx >> 24 & 1u);
}

// XCR0 bits 17 (XTILECFG) and 18 (XTILEDATA): the OS manages the tile state (needs OSXSAVE, CPUID.1:ECX bit 27).
bool os_saves_tiles() {
  unsigned eax = 0, ebx = 0, ecx = 0, edx = 0;
  __cpuid(1, eax, ebx, ecx, edx);
  if (!(ecx >> 27 & 1u)) return false;
  unsigned lo = 0, hi = 0;
  asm volatile("xgetbv" : "=a"(lo), "=d"(hi) : "c"(0));
  return (lo >> 17 & 1u) && (lo >> 18 & 1u);
}

// Linux hands a process the (8 KiB) AMX tile data state only once asked (arch_prctl ARCH_REQ_XCOMP_PERM, since
// 5.16); without it the first tile instruction faults. Asked once per process, here; oneDNN asks again for itself,
// which is harmless. "" when granted, else why not.
std::string request_tile_permission() {
#if defined(__linux__) && defined(SYS_arch_prctl)
  constexpr int kArchGetXcompPerm = 0x1022, kArchReqXcompPerm = 0x1023, kXfeatureXtileData = 18;
  if (syscall(SYS_arch_prctl, kArchReqXcompPerm, kXfeatureXtileData) != 0)
    return "the OS refused the AMX tile state (arch_prctl ARCH_REQ_XCOMP_PERM; Linux >= 5.16 needed)";
  unsigned long granted = 0;
  if (syscall(SYS_arch_prctl, kArchGetXcompPerm, &granted) != 0 || !(granted >> kXfeatureXtileData & 1ul))
    return "the OS did not grant the AMX tile state (arch_prctl ARCH_GET_XCOMP_PERM)";
  return "";
#else
  return "no way to request the AMX tile state from this OS (ARCH_REQ_XCOMP_PERM is Linux's)";
#endif
}

// The amx level's products run on ATen's cpublas::brgemm; a torch built without oneDNN's ukernel API falls back to a
// plain gemm that refuses the VNNI layout, so one small product tells whether the library path is there.
bool brgemm_bf16_works() {
  try {
    alignas(64) c10::BFloat16 a[2 * 32], b[32 * 16];
    alignas(64) float c[2 * 16];
    for (auto& x : a) x = 1.f;
    for (auto& x : b) x = 1.f;
    at::native::cpublas::brgemm(2, 16, 32, 32, 16, 16, false, a, b, c, /*is_vnni=*/true);
    at::native::cpublas::brgemm_release(true);
    return c[0] == 32.f && c[31] == 32.f;
  } catch (const c10::Error&) {
    return false;
  }
}

// What the amx level lacks apart from oneDNN being switched off (detected once: the permission request and the
// brgemm probe have effects).
const std::string& amx_missing_static() {
  static const std::string missing = [] () -> std::string {
    if (!cpu_has_avx512_bf16()) return "this CPU lacks avx512_bf16 (the level below amx)";
    if (!cpuid_has_amx()) return "this CPU lacks amx_tile / amx_bf16 (CPUID.7.0:EDX bits 24 / 22)";
    if (!os_saves_tiles()) return "the OS does not enable the AMX tile state (XCR0 bits 17-18)";
    std::string perm = request_tile_permission();
    if (!perm.empty()) return perm;
    if (!brgemm_bf16_works()) return "torch's cpublas::brgemm has no oneDNN ukernel in this build";
    return "";
  }();
  return missing;
}
#endif

std::atomic<int>& active_slot() {
  static std::atomic<int> slot{static_cast<int>(best_isa())};
  return slot;
}

}  // namespace

const char* isa_name(Isa isa) {
  switch (isa) {
    case Isa::kBaseline: return "baseline";
    case Isa::kAvx2: return "avx2";
    case Isa::kAvx512: return "avx512";
    case Isa::kAvx512Bf16: return "avx512_bf16";
    case Isa::kAmx: return "amx";
  }
  return "?";
}

std::string isa_missing(Isa isa) {
  if (!MPLUS_ISA_X86 && isa != Isa::kBaseline) return "only the baseline is built off x86-64";
  switch (isa) {
    case Isa::kBaseline: return "";
    case Isa::kAvx2: return cpu_has_avx2() ? "" : "this CPU (or OS) lacks avx2 / fma / f16c";
    case Isa::kAvx512:
      return cpu_has_avx512() ? "" : "this CPU (or OS) lacks avx512f / avx512bw / avx512dq / avx512vl";
    case Isa::kAvx512Bf16:
      return cpu_has_avx512_bf16() ? "" : cpu_has_avx512() ? "this CPU lacks avx512_bf16" : isa_missing(Isa::kAvx512);
    case Isa::kAmx:
#if MPLUS_ISA_X86
      if (!amx_missing_static().empty()) return amx_missing_static();
      if (!at::globalContext().userEnabledMkldnn())
        return "oneDNN is switched off (torch.backends.mkldnn.enabled = False), and with it ATen's brgemm";
      return "";
#else
      return "only the baseline is built off x86-64";
#endif
  }
  return "unknown level";
}

bool isa_supported(Isa isa) { return isa_missing(isa).empty(); }

Isa best_isa() {
  for (int i = kNumIsa - 1; i > 0; --i)
    if (isa_supported(static_cast<Isa>(i))) return static_cast<Isa>(i);
  return Isa::kBaseline;
}

Isa active_isa() { return static_cast<Isa>(active_slot().load(std::memory_order_relaxed)); }

void set_active_isa(Isa isa) {
  TORCH_CHECK(isa_supported(isa), "CPU ISA level '", isa_name(isa), "' is not supported by this CPU (",
              isa_missing(isa), "); the best here is '", isa_name(best_isa()), "'");
  active_slot().store(static_cast<int>(isa), std::memory_order_relaxed);
}

void require_active_isa(const char* op) {
  if (active_isa() != Isa::kAmx) return;
  TORCH_CHECK(at::globalContext().userEnabledMkldnn(), op,
              ": the CPU ISA level 'amx' runs its bf16 products on ATen's brgemm (oneDNN), which "
              "torch.backends.mkldnn.enabled = False has switched off; switch oneDNN back on or choose another level "
              "(mplus_kernels.set_cpu_isa('avx512_bf16'))");
}

Isa isa_from_name(const std::string& name) {
  for (int i = 0; i < kNumIsa; ++i)
    if (name == isa_name(static_cast<Isa>(i))) return static_cast<Isa>(i);
  TORCH_CHECK(false, "unknown CPU ISA level '", name, "': expected baseline, avx2, avx512, avx512_bf16 or amx");
}

}  // namespace mplus
