// CPU feature detection (once, at load time) and the process-wide dispatch level of the CPU kernels.
//   avx512_vnni  AVX-512 F/BW/VL/DQ + VNNI   (the elementwise kernels run the AVX-512 code; VNNI is for
//   avx512       AVX-512 F/BW/VL/DQ           int8 GEMM work)
//   avx2         AVX2 + FMA + F16C
//   scalar       any x86-64
// __builtin_cpu_supports also checks that the OS saves the vector state (XCR0), so a level is only
// reported when it can run.
#include <atomic>
#include <cstring>

#include "simd.h"

namespace zsqfast::cpu {
namespace detail {
namespace {

Isa detect() {
  __builtin_cpu_init();
  const bool avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c");
  if (avx2 && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
      __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq")) {
    return __builtin_cpu_supports("avx512vnni") ? Isa::Avx512Vnni : Isa::Avx512;
  }
  return avx2 ? Isa::Avx2 : Isa::Scalar;
}

const Isa kDetected = detect();
std::atomic<int> g_active{int(kDetected)};
std::atomic<int> g_threads{1};
constexpr const char* kNames[] = {"scalar", "avx2", "avx512", "avx512_vnni"};  // indexed by Isa

}  // namespace

Isa active_isa() { return Isa(g_active.load(std::memory_order_relaxed)); }
int num_threads() { return g_threads.load(std::memory_order_relaxed); }

}  // namespace detail

const char* isa_name() { return detail::kNames[detail::g_active.load(std::memory_order_relaxed)]; }

bool force_isa(const char* name) {
  if (name == nullptr) return false;
  if (std::strcmp(name, "auto") == 0) {
    detail::g_active.store(int(detail::kDetected));
    return true;
  }
  for (int i = 0; i < 4; ++i) {
    if (std::strcmp(name, detail::kNames[i]) == 0) {
      if (i > int(detail::kDetected)) return false;  // this CPU lacks it (levels are nested)
      detail::g_active.store(i);
      return true;
    }
  }
  return false;
}

void set_num_threads(int n) { detail::g_threads.store(n < 1 ? 1 : n, std::memory_order_relaxed); }

}  // namespace zsqfast::cpu
