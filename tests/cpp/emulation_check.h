// The check counter and CHECK macro of the host emulation tests (tests/cpp/test_*cuda_emulation.cu): CHECK
// counts, prints a failure with its location and returns from the calling (void) function.
#pragma once
#include <cstdio>

namespace {
int g_failures = 0, g_checks = 0;
}  // namespace

#define CHECK(cond, ...)                                \
  do {                                                  \
    ++g_checks;                                         \
    if (!(cond)) {                                      \
      ++g_failures;                                     \
      std::printf("FAIL %s:%d: ", __FILE__, __LINE__);  \
      std::printf(__VA_ARGS__);                         \
      std::printf("\n");                                \
      return;                                           \
    }                                                   \
  } while (0)
