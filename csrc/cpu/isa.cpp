// CPU feature detection and the active ISA level of the CPU kernels (isa.h).
#include "isa.h"

#include <c10/util/Exception.h>

#include <atomic>

namespace mplus {
namespace {

bool cpu_has(Isa isa) {
  switch (isa) {
    case Isa::kBaseline: return true;
#if MPLUS_ISA_X86
    // libgcc's cpuinfo also checks, through XGETBV, that the OS saves the ymm / zmm state.
    case Isa::kAvx2:
      __builtin_cpu_init();
      return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c");
    case Isa::kAvx512:
      __builtin_cpu_init();
      return cpu_has(Isa::kAvx2) && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
             __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("avx512vl");
#endif
    default: return false;
  }
}

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
  }
  return "?";
}

bool isa_supported(Isa isa) { return cpu_has(isa); }

Isa best_isa() {
  for (int i = kNumIsa - 1; i > 0; --i)
    if (isa_supported(static_cast<Isa>(i))) return static_cast<Isa>(i);
  return Isa::kBaseline;
}

Isa active_isa() { return static_cast<Isa>(active_slot().load(std::memory_order_relaxed)); }

void set_active_isa(Isa isa) {
  TORCH_CHECK(isa_supported(isa), "CPU ISA level '", isa_name(isa), "' is not supported by this CPU",
              MPLUS_ISA_X86 ? "" : " (only 'baseline' is built off x86-64)", "; the best here is '",
              isa_name(best_isa()), "'");
  active_slot().store(static_cast<int>(isa), std::memory_order_relaxed);
}

Isa isa_from_name(const std::string& name) {
  for (int i = 0; i < kNumIsa; ++i)
    if (name == isa_name(static_cast<Isa>(i))) return static_cast<Isa>(i);
  TORCH_CHECK(false, "unknown CPU ISA level '", name, "': expected baseline, avx2 or avx512");
}

}  // namespace mplus
