// CPU feature detection (once) and the process-wide dispatch level.
#include "isa.h"

#include <atomic>
#include <cstring>

#include "../kernels.h"

namespace zsqfast::cpu {
namespace {

Isa detect() {
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
      __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq")) {
    return __builtin_cpu_supports("avx512vnni") ? Isa::Avx512Vnni : Isa::Avx512;
  }
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c")) {
    return Isa::Avx2;
  }
  return Isa::Scalar;
}

const Isa kDetected = detect();
std::atomic<int> g_active{static_cast<int>(kDetected)};

constexpr const char* kNames[] = {"scalar", "avx2", "avx512", "avx512_vnni"};

}  // namespace

namespace {
std::atomic<int> g_threads{1};
}

int num_threads() { return g_threads.load(std::memory_order_relaxed); }

void set_num_threads(int n) { g_threads.store(n < 1 ? 1 : n, std::memory_order_relaxed); }

Isa active_isa() { return static_cast<Isa>(g_active.load(std::memory_order_relaxed)); }

const char* isa_name() { return kNames[g_active.load(std::memory_order_relaxed)]; }

bool force_isa(const char* name) {
  if (std::strcmp(name, "auto") == 0) {
    g_active.store(static_cast<int>(kDetected));
    return true;
  }
  for (int i = 0; i < 4; ++i) {
    if (std::strcmp(name, kNames[i]) == 0) {
      if (i > static_cast<int>(kDetected)) return false;  // this CPU lacks it
      g_active.store(i);
      return true;
    }
  }
  return false;
}

}  // namespace zsqfast::cpu
