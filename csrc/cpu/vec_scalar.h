// The scalar "vector" (one lane): the fallback ISA and the tails of every SIMD loop, so that all paths
// share one definition of each element-wise step and agree bit for bit.
#pragma once
#include <cmath>
#include <cstdint>

#include "convert.h"

namespace zsqfast::cpu {

struct ScalarV {
  static constexpr int W = 1;
  using F = float;
  static F set1(float a) { return a; }
  static F zero() { return 0.0f; }
  static F loadf(const float* p) { return *p; }
  static void storef(float* p, F v) { *p = v; }
  template <class S> static F load(const typename S::T* p) { return load1<S>(p); }
  template <class S> static void store(typename S::T* p, F v) { store1<S>(p, v); }
  static F add(F a, F b) { return a + b; }
  static F sub(F a, F b) { return a - b; }
  static F mul(F a, F b) { return a * b; }
  static F rne(F v) { return std::nearbyint(v); }  // default rounding mode: half to even
  static F clamp(F v, F lo, F hi) { return v < lo ? lo : (v > hi ? hi : v); }  // NaN passes through
  static uint32_t in_range(F q, F lo, F hi) { return (q >= lo) & (q <= hi); }
  static uint32_t lt(F a, F b) { return a < b; }
  static uint32_t gt(F a, F b) { return a > b; }
  static F select(uint32_t bits, F a, F b) { return (bits & 1u) ? a : b; }
  static float hsum(F v) { return v; }
  // 16 elements of 4 or 2 bytes: out = bit ? g : 0.
  template <class T> static void mask_copy16(const T* g, T* out, uint32_t bits) {
    for (int i = 0; i < 16; ++i) out[i] = ((bits >> i) & 1u) ? g[i] : T(0);
  }
};

// OR `nbits` (<= 16) flag bits into the bit-packed mask at bit offset o (LSB first). The bytes were zeroed.
inline void put_bits(uint8_t* mask, int64_t o, uint32_t bits, int nbits) {
  if (nbits < 32) bits &= (1u << nbits) - 1u;
  const uint32_t v = bits << (o & 7);
  uint8_t* p = mask + (o >> 3);
  const int nb = int(((o & 7) + nbits + 7) >> 3);
  for (int i = 0; i < nb; ++i) p[i] |= uint8_t(v >> (8 * i));
}

}  // namespace zsqfast::cpu
