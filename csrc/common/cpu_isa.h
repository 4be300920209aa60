// Which instruction set the CPU kernels run with. Kernel headers are compiled once per
// instruction set (AVX-512 and AVX2 on x86-64 with GCC, inside `#pragma GCC target` regions, and
// the build's baseline everywhere); the one that runs follows ATen's CPU capability, so
// ATEN_CPU_CAPABILITY=avx2|default selects a narrower path as it does for torch's own kernels.
#pragma once

#include <ATen/Version.h>

#include <string>

#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__)
#define REGGAN_X86_ISAS 1
#endif

namespace reggan_ext {

enum class CpuIsa { kBaseline, kAvx2, kAvx512 };

inline CpuIsa cpu_isa() {
  static const CpuIsa isa = [] {
#ifdef REGGAN_X86_ISAS
    const std::string capability = at::get_cpu_capability();
    if (capability == "AVX512" && __builtin_cpu_supports("avx512f") &&
        __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq") &&
        __builtin_cpu_supports("avx512bw")) {
      return CpuIsa::kAvx512;
    }
    if ((capability == "AVX512" || capability == "AVX2") && __builtin_cpu_supports("avx2") &&
        __builtin_cpu_supports("fma")) {
      return CpuIsa::kAvx2;
    }
#endif
    return CpuIsa::kBaseline;
  }();
  return isa;
}

// An op's kernel tags, one per instruction set. Builds without the x86 kernels name only the
// baseline's: cpu_isa() is always kBaseline there.
template <typename Baseline, typename Avx2 = Baseline, typename Avx512 = Avx2>
struct CpuIsaTags {};

// Calls fn with the tag of the instruction set that runs.
template <typename Baseline, typename Avx2, typename Avx512, typename Fn>
void with_cpu_isa(CpuIsaTags<Baseline, Avx2, Avx512>, Fn&& fn) {
  switch (cpu_isa()) {
    case CpuIsa::kAvx512:
      return fn(Avx512{});
    case CpuIsa::kAvx2:
      return fn(Avx2{});
    default:
      return fn(Baseline{});
  }
}

inline std::string cpu_isa_name() {
  switch (cpu_isa()) {
    case CpuIsa::kAvx512:
      return "avx512";
    case CpuIsa::kAvx2:
      return "avx2";
    default:
      return "baseline";
  }
}

}  // namespace reggan_ext
