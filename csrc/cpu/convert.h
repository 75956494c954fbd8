// Scalar fp16 / bf16 <-> fp32 conversions, bit-identical to F16C / AVX-512 conversions and to c10::Half /
// c10::BFloat16 (round to nearest even). No ISA requirements.
#pragma once
#include <cstdint>
#include <cstring>

namespace zsqfast::cpu {

inline uint32_t f32_bits(float f) { uint32_t u; std::memcpy(&u, &f, 4); return u; }
inline float f32_from(uint32_t u) { float f; std::memcpy(&f, &u, 4); return f; }

// IEEE half -> float (exact), as c10::detail::fp16_ieee_to_fp32_value.
inline float half_to_float(uint16_t h) {
  const uint32_t w = uint32_t(h) << 16;
  const uint32_t sign = w & 0x80000000u;
  const uint32_t two_w = w + w;
  const float normalized = f32_from((two_w >> 4) + (0xE0u << 23)) * 0x1.0p-112f;
  const float denormalized = f32_from((two_w >> 17) | (126u << 23)) - 0.5f;
  const uint32_t r = sign | (two_w < (1u << 27) ? f32_bits(denormalized) : f32_bits(normalized));
  return f32_from(r);
}

// float -> IEEE half, round to nearest even, as c10::detail::fp16_ieee_from_fp32_value.
inline uint16_t float_to_half(float f) {
  float base = (__builtin_fabsf(f) * 0x1.0p+112f) * 0x1.0p-110f;
  const uint32_t w = f32_bits(f);
  const uint32_t shl1_w = w + w;
  const uint32_t sign = w & 0x80000000u;
  uint32_t bias = shl1_w & 0xFF000000u;
  if (bias < 0x71000000u) bias = 0x71000000u;
  base = f32_from((bias >> 1) + 0x07800000u) + base;
  const uint32_t bits = f32_bits(base);
  const uint32_t nonsign = ((bits >> 13) & 0x00007C00u) + (bits & 0x00000FFFu);
  return uint16_t((sign >> 16) | (shl1_w > 0xFF000000u ? 0x7E00u : nonsign));
}

inline float bf16_to_float(uint16_t b) { return f32_from(uint32_t(b) << 16); }

// float -> bfloat16, round to nearest even; NaN -> 0x7FC0 (c10::BFloat16's scalar rule).
inline uint16_t float_to_bf16(float f) {
  if (f != f) return 0x7FC0;
  const uint32_t u = f32_bits(f);
  return uint16_t((u + 0x7FFFu + ((u >> 16) & 1u)) >> 16);
}

// Storage tags: the element type a kernel reads and writes.
struct F32 { using T = float; };
struct F16 { using T = uint16_t; };
struct BF16 { using T = uint16_t; };

template <class S> inline float load1(const typename S::T* p);
template <> inline float load1<F32>(const float* p) { return *p; }
template <> inline float load1<F16>(const uint16_t* p) { return half_to_float(*p); }
template <> inline float load1<BF16>(const uint16_t* p) { return bf16_to_float(*p); }
template <class S> inline void store1(typename S::T* p, float v);
template <> inline void store1<F32>(float* p, float v) { *p = v; }
template <> inline void store1<F16>(uint16_t* p, float v) { *p = float_to_half(v); }
template <> inline void store1<BF16>(uint16_t* p, float v) { *p = float_to_bf16(v); }

}  // namespace zsqfast::cpu
