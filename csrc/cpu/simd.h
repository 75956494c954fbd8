// Shared, torch-free helpers of the CPU kernels (csrc/cpu/{isa,fake_quant,lsq}.cpp):
//   * the dispatch level (detected once in isa.cpp) and the thread count,
//   * bit-exact scalar fp16 / bf16 <-> fp32 conversions (same bits as F16C / AVX-512 and as torch),
//   * three "vector" types with one interface: V512 (AVX-512, 16 fp32 lanes), V256 (AVX2+FMA+F16C, 8 lanes)
//     and VScalar (8 lanes of plain C++, the fallback). Each SIMD type is compiled inside its own
//     `#pragma GCC target` region, so a single set of compile flags (-O3 -fopenmp, no -m flags) builds code
//     for every level and the rest of the binary runs on any x86-64,
//   * the fixed chunking / OpenMP loop, and the channel geometry of a memory-order walk (Geo).
// The kernel files compile their bodies once per level (see the "self-include" note in fake_quant.cpp).
#ifndef ZSQFAST_CPU_SIMD_H
#define ZSQFAST_CPU_SIMD_H
#include <immintrin.h>
#include <omp.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <vector>

#include "../kernels.h"

#define ZSQ_INLINE inline __attribute__((always_inline))

// The per-level compile regions. Every function defined between BEGIN and END (templates, lambdas and
// their instantiations included) may use that level's instructions; nothing else in the binary does.
#define ZSQ_BEGIN_AVX512 \
  _Pragma("GCC push_options") _Pragma("GCC target(\"avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,f16c\")")
#define ZSQ_BEGIN_AVX2 _Pragma("GCC push_options") _Pragma("GCC target(\"avx2,fma,f16c\")")
#define ZSQ_END_TARGET _Pragma("GCC pop_options")

namespace zsqfast::cpu::detail {

enum class Isa : int { Scalar = 0, Avx2 = 1, Avx512 = 2, Avx512Vnni = 3 };
Isa active_isa();   // isa.cpp: the level the kernels dispatch to now
int num_threads();  // isa.cpp: threads for the chunk loops (registration.cpp passes at::get_num_threads())

// ------------------------------------------------------------------------------------------------------
// Scalar conversions. Bit-identical to the hardware conversions the SIMD paths use, so every ISA level
// produces the same bits (NaN payloads included).
inline uint32_t f32_bits(float f) { uint32_t u; std::memcpy(&u, &f, 4); return u; }
inline float f32_from(uint32_t u) { float f; std::memcpy(&f, &u, 4); return f; }

// IEEE half -> float, exact (as vcvtph2ps; a signalling NaN comes back quiet, as there).
inline float half_to_float(uint16_t h) {
  const uint32_t sign = uint32_t(h & 0x8000u) << 16;
  const uint32_t exp = (h >> 10) & 0x1Fu, man = h & 0x3FFu;
  if (exp == 0x1F) return f32_from(sign | 0x7F800000u | (man << 13) | (man ? 0x00400000u : 0u));
  if (exp != 0) return f32_from(sign | ((exp + 112u) << 23) | (man << 13));
  // zero or subnormal: man * 2^-24, exact in fp32 (an integer below 2^10 times a power of two)
  const float mag = float(man) * 0x1.0p-24f;
  return f32_from(sign | f32_bits(mag));
}

// float -> IEEE half, round to nearest even (as vcvtps2ph with imm = RNE, and c10::Half for non-NaN);
// NaN -> quiet NaN keeping the sign and the top 9 payload bits (as vcvtps2ph).
inline uint16_t float_to_half(float f) {
  const uint32_t w = f32_bits(f);
  const uint32_t sign = (w >> 16) & 0x8000u;
  const uint32_t aw = w & 0x7FFFFFFFu;
  if (aw > 0x7F800000u) return uint16_t(sign | 0x7E00u | ((aw >> 13) & 0x3FFu));
  if (aw >= 0x477FF000u) return uint16_t(sign | 0x7C00u);  // rounds to >= 65520: Inf
  if (aw >= 0x38800000u) {                                  // normal half range (>= 2^-14)
    const uint32_t r = aw + 0xFFFu + ((aw >> 13) & 1u);     // round to nearest even at bit 13
    return uint16_t(sign | ((r - 0x38000000u) >> 13));
  }
  // subnormal half (or zero): value = m * 2^-24 with m = round_even(|f| * 2^24) in [0, 1024]
  if (aw < 0x33000000u) return uint16_t(sign);  // < 2^-25: rounds to 0 (2^-25 exactly is a tie -> 0)
  const uint32_t e = aw >> 23, man = (aw & 0x7FFFFFu) | 0x800000u;
  const uint32_t shift = 126u - e;  // |f| = man * 2^(e-150); m = man * 2^(e-126) = man >> (126 - e)
  const uint32_t q = man >> shift, rem = man & ((1u << shift) - 1u), half = 1u << (shift - 1u);
  const uint32_t m = q + ((rem > half || (rem == half && (q & 1u))) ? 1u : 0u);
  return uint16_t(sign | m);  // m == 1024 carries into the smallest normal, as it should
}

inline float bf16_to_float(uint16_t b) { return f32_from(uint32_t(b) << 16); }

// float -> bfloat16, round to nearest even; NaN -> 0x7FC0 (as c10::BFloat16 / torch's .to(bfloat16)).
inline uint16_t float_to_bf16(float f) {
  if (f != f) return 0x7FC0;
  const uint32_t u = f32_bits(f);
  return uint16_t((u + 0x7FFFu + ((u >> 16) & 1u)) >> 16);
}

// Storage tags.
struct F32 { using T = float; };
struct F16 { using T = uint16_t; };
struct BF16 { using T = uint16_t; };

// ------------------------------------------------------------------------------------------------------
// Mask bits of one block of W (8 or 16) elements at offset o (o % W == 0): bit i of the result belongs to
// element o + i; only ceil(cnt / 8) bytes are touched.
template <int W>
ZSQ_INLINE void put_bits(uint8_t* mask, int64_t o, uint32_t bits, int cnt) {
  uint8_t* p = mask + (o >> 3);
  if (W == 16 && cnt == 16) {
    const uint16_t b = uint16_t(bits);
    std::memcpy(p, &b, 2);
    return;
  }
  if (cnt < 32) bits &= (1u << cnt) - 1u;
  p[0] = uint8_t(bits);
  if (W == 16 && cnt > 8) p[1] = uint8_t(bits >> 8);
}
template <int W>
ZSQ_INLINE uint32_t get_bits(const uint8_t* mask, int64_t o, int cnt) {
  const uint8_t* p = mask + (o >> 3);
  if (W == 16 && cnt == 16) {
    uint16_t b;
    std::memcpy(&b, p, 2);
    return b;
  }
  uint32_t bits = p[0];
  if (W == 16 && cnt > 8) bits |= uint32_t(p[1]) << 8;
  return cnt < 32 ? bits & ((1u << cnt) - 1u) : bits;
}

// ------------------------------------------------------------------------------------------------------
// The scalar "vector": 8 lanes of plain C++ (compiled for baseline x86-64). Every operation is the
// IEEE-754 single operation the SIMD types use, so results are bit-identical.
struct VScalar {
  static constexpr int W = 8;
  struct F { float v[8]; };
  using M = uint32_t;  // lane bits
  template <class S> struct Raw { typename S::T v[8]; };

  static ZSQ_INLINE M lanes(int cnt) { return cnt >= 32 ? ~0u : (1u << cnt) - 1u; }
  static ZSQ_INLINE uint32_t bits(M m) { return m & 0xFFu; }
  static ZSQ_INLINE M from_bits(uint32_t b) { return b; }
  static ZSQ_INLINE M mor(M a, M b) { return a | b; }
  static ZSQ_INLINE M mnot(M a) { return ~a; }

  static ZSQ_INLINE F set1(float a) { F r; for (int i = 0; i < 8; ++i) r.v[i] = a; return r; }
  static ZSQ_INLINE F zero() { return set1(0.0f); }
  static ZSQ_INLINE F loadf(const float* p) { F r; std::memcpy(r.v, p, sizeof r.v); return r; }
  static ZSQ_INLINE void storef(float* p, F a) { std::memcpy(p, a.v, sizeof a.v); }

  template <class S> static ZSQ_INLINE Raw<S> load_raw(const typename S::T* p) {
    Raw<S> r; std::memcpy(r.v, p, sizeof r.v); return r;
  }
  template <class S> static ZSQ_INLINE Raw<S> load_raw_n(const typename S::T* p, int cnt) {
    Raw<S> r; std::memset(r.v, 0, sizeof r.v); std::memcpy(r.v, p, sizeof(typename S::T) * cnt); return r;
  }
  template <class S> static ZSQ_INLINE void store_raw(typename S::T* p, Raw<S> r) { std::memcpy(p, r.v, sizeof r.v); }
  template <class S> static ZSQ_INLINE void store_raw_n(typename S::T* p, Raw<S> r, int cnt) {
    std::memcpy(p, r.v, sizeof(typename S::T) * cnt);
  }
  template <class S> static ZSQ_INLINE Raw<S> maskz_raw(M m, Raw<S> r) {
    for (int i = 0; i < 8; ++i) if (!((m >> i) & 1u)) r.v[i] = typename S::T(0);
    return r;
  }
  template <class S> static ZSQ_INLINE F to_f32(Raw<S> r) {
    F f;
    for (int i = 0; i < 8; ++i) {
      if constexpr (std::is_same_v<S, F32>) f.v[i] = r.v[i];
      else if constexpr (std::is_same_v<S, F16>) f.v[i] = half_to_float(r.v[i]);
      else f.v[i] = bf16_to_float(r.v[i]);
    }
    return f;
  }
  template <class S> static ZSQ_INLINE Raw<S> from_f32(F f) {
    Raw<S> r;
    for (int i = 0; i < 8; ++i) {
      if constexpr (std::is_same_v<S, F32>) r.v[i] = f.v[i];
      else if constexpr (std::is_same_v<S, F16>) r.v[i] = float_to_half(f.v[i]);
      else r.v[i] = float_to_bf16(f.v[i]);
    }
    return r;
  }

#define ZSQ_LANEWISE(expr) F r; for (int i = 0; i < 8; ++i) r.v[i] = (expr); return r
  static ZSQ_INLINE F add(F a, F b) { ZSQ_LANEWISE(a.v[i] + b.v[i]); }
  static ZSQ_INLINE F sub(F a, F b) { ZSQ_LANEWISE(a.v[i] - b.v[i]); }
  static ZSQ_INLINE F mul(F a, F b) { ZSQ_LANEWISE(a.v[i] * b.v[i]); }
  static ZSQ_INLINE F rne(F a) { ZSQ_LANEWISE(std::nearbyint(a.v[i])); }  // default mode: half to even
  // As maxps(lo, v) then minps(hi, .): the second operand wins on NaN and on equal zeros.
  static ZSQ_INLINE F clamp(F a, F lo, F hi) {
    F r;
    for (int i = 0; i < 8; ++i) {
      const float t = lo.v[i] > a.v[i] ? lo.v[i] : a.v[i];
      r.v[i] = hi.v[i] < t ? hi.v[i] : t;
    }
    return r;
  }
  static ZSQ_INLINE F select(M m, F a, F b) { ZSQ_LANEWISE(((m >> i) & 1u) ? a.v[i] : b.v[i]); }
  static ZSQ_INLINE F maskz(M m, F a) { ZSQ_LANEWISE(((m >> i) & 1u) ? a.v[i] : 0.0f); }
#undef ZSQ_LANEWISE
#define ZSQ_LANEBITS(cond) M m = 0; for (int i = 0; i < 8; ++i) m |= uint32_t(cond) << i; return m
  static ZSQ_INLINE M in_range(F q, F lo, F hi) { ZSQ_LANEBITS(q.v[i] >= lo.v[i] && q.v[i] <= hi.v[i]); }
  static ZSQ_INLINE M lt(F a, F b) { ZSQ_LANEBITS(a.v[i] < b.v[i]); }
  static ZSQ_INLINE M gt(F a, F b) { ZSQ_LANEBITS(a.v[i] > b.v[i]); }
#undef ZSQ_LANEBITS
  static ZSQ_INLINE double hsum_d(F a) {
    double s = 0.0;
    for (int i = 0; i < 8; ++i) s += double(a.v[i]);
    return s;
  }
};

}  // namespace zsqfast::cpu::detail

// ------------------------------------------------------------------------------------------------------
ZSQ_BEGIN_AVX2
namespace zsqfast::cpu::detail {
// AVX2 + FMA + F16C: 8 fp32 lanes; lane masks are vectors (all-ones lanes).
struct V256 {
  static constexpr int W = 8;
  using F = __m256;
  using M = __m256;
  template <class S, bool = std::is_same_v<S, F32>> struct RawT { using type = __m256; };
  template <class S> struct RawT<S, false> { using type = __m128i; };
  template <class S> using Raw = typename RawT<S>::type;

  static ZSQ_INLINE M from_bits(uint32_t b) {
    const __m256i sel = _mm256_setr_epi32(1, 2, 4, 8, 16, 32, 64, 128);
    return _mm256_castsi256_ps(_mm256_cmpeq_epi32(_mm256_and_si256(_mm256_set1_epi32(int(b)), sel), sel));
  }
  static ZSQ_INLINE M lanes(int cnt) { return from_bits(cnt >= 8 ? 0xFFu : (1u << cnt) - 1u); }
  static ZSQ_INLINE uint32_t bits(M m) { return uint32_t(_mm256_movemask_ps(m)); }
  static ZSQ_INLINE M mor(M a, M b) { return _mm256_or_ps(a, b); }
  static ZSQ_INLINE M mnot(M a) { return _mm256_xor_ps(a, _mm256_castsi256_ps(_mm256_set1_epi32(-1))); }

  static ZSQ_INLINE F set1(float a) { return _mm256_set1_ps(a); }
  static ZSQ_INLINE F zero() { return _mm256_setzero_ps(); }
  static ZSQ_INLINE F loadf(const float* p) { return _mm256_loadu_ps(p); }
  static ZSQ_INLINE void storef(float* p, F a) { _mm256_storeu_ps(p, a); }

  template <class S> static ZSQ_INLINE Raw<S> load_raw(const typename S::T* p) {
    if constexpr (std::is_same_v<S, F32>) return _mm256_loadu_ps(p);
    else return _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  }
  template <class S> static ZSQ_INLINE Raw<S> load_raw_n(const typename S::T* p, int cnt) {
    alignas(32) typename S::T buf[8] = {};
    std::memcpy(buf, p, sizeof(typename S::T) * cnt);
    return load_raw<S>(buf);
  }
  template <class S> static ZSQ_INLINE void store_raw(typename S::T* p, Raw<S> r) {
    if constexpr (std::is_same_v<S, F32>) _mm256_storeu_ps(p, r);
    else _mm_storeu_si128(reinterpret_cast<__m128i*>(p), r);
  }
  template <class S> static ZSQ_INLINE void store_raw_n(typename S::T* p, Raw<S> r, int cnt) {
    alignas(32) typename S::T buf[8];
    store_raw<S>(buf, r);
    std::memcpy(p, buf, sizeof(typename S::T) * cnt);
  }
  template <class S> static ZSQ_INLINE Raw<S> maskz_raw(M m, Raw<S> r) {
    if constexpr (std::is_same_v<S, F32>) {
      return _mm256_and_ps(r, m);
    } else {  // 8 x 32-bit lane masks -> 8 x 16-bit
      const __m256i mi = _mm256_castps_si256(m);
      const __m128i m16 = _mm_packs_epi32(_mm256_castsi256_si128(mi), _mm256_extracti128_si256(mi, 1));
      return _mm_and_si128(r, m16);
    }
  }
  template <class S> static ZSQ_INLINE F to_f32(Raw<S> r) {
    if constexpr (std::is_same_v<S, F32>) return r;
    else if constexpr (std::is_same_v<S, F16>) return _mm256_cvtph_ps(r);
    else return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(r), 16));
  }
  template <class S> static ZSQ_INLINE Raw<S> from_f32(F v) {
    if constexpr (std::is_same_v<S, F32>) {
      return v;
    } else if constexpr (std::is_same_v<S, F16>) {
      return _mm256_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    } else {  // round to nearest even; NaN -> 0x7FC0
      const __m256i u = _mm256_castps_si256(v);
      const __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1));
      __m256i r = _mm256_srli_epi32(_mm256_add_epi32(_mm256_add_epi32(u, _mm256_set1_epi32(0x7FFF)), lsb), 16);
      r = _mm256_blendv_epi8(_mm256_set1_epi32(0x7FC0), r, _mm256_castps_si256(_mm256_cmp_ps(v, v, _CMP_ORD_Q)));
      return _mm_packus_epi32(_mm256_castsi256_si128(r), _mm256_extracti128_si256(r, 1));
    }
  }

  static ZSQ_INLINE F add(F a, F b) { return _mm256_add_ps(a, b); }
  static ZSQ_INLINE F sub(F a, F b) { return _mm256_sub_ps(a, b); }
  static ZSQ_INLINE F mul(F a, F b) { return _mm256_mul_ps(a, b); }
  static ZSQ_INLINE F rne(F a) { return _mm256_round_ps(a, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC); }
  // maxps/minps return the second operand when either is NaN: max(lo, v), min(hi, .) propagate NaN v.
  static ZSQ_INLINE F clamp(F a, F lo, F hi) { return _mm256_min_ps(hi, _mm256_max_ps(lo, a)); }
  static ZSQ_INLINE F select(M m, F a, F b) { return _mm256_blendv_ps(b, a, m); }
  static ZSQ_INLINE F maskz(M m, F a) { return _mm256_and_ps(a, m); }
  static ZSQ_INLINE M in_range(F q, F lo, F hi) {
    return _mm256_and_ps(_mm256_cmp_ps(q, lo, _CMP_GE_OQ), _mm256_cmp_ps(q, hi, _CMP_LE_OQ));
  }
  static ZSQ_INLINE M lt(F a, F b) { return _mm256_cmp_ps(a, b, _CMP_LT_OQ); }
  static ZSQ_INLINE M gt(F a, F b) { return _mm256_cmp_ps(a, b, _CMP_GT_OQ); }
  static ZSQ_INLINE double hsum_d(F a) {
    __m256d d = _mm256_add_pd(_mm256_cvtps_pd(_mm256_castps256_ps128(a)), _mm256_cvtps_pd(_mm256_extractf128_ps(a, 1)));
    __m128d s = _mm_add_pd(_mm256_castpd256_pd128(d), _mm256_extractf128_pd(d, 1));
    return _mm_cvtsd_f64(_mm_add_sd(s, _mm_unpackhi_pd(s, s)));
  }
};
}  // namespace zsqfast::cpu::detail
ZSQ_END_TARGET

// ------------------------------------------------------------------------------------------------------
// AVX-512 F/BW/VL/DQ (no VNNI: this code also runs on the plain "avx512" level).
ZSQ_BEGIN_AVX512
namespace zsqfast::cpu::detail {
struct V512 {
  static constexpr int W = 16;
  using F = __m512;
  using M = __mmask16;
  template <class S, bool = std::is_same_v<S, F32>> struct RawT { using type = __m512; };
  template <class S> struct RawT<S, false> { using type = __m256i; };
  template <class S> using Raw = typename RawT<S>::type;

  static ZSQ_INLINE M lanes(int cnt) { return M(cnt >= 16 ? 0xFFFFu : (1u << cnt) - 1u); }
  static ZSQ_INLINE uint32_t bits(M m) { return uint32_t(m); }
  static ZSQ_INLINE M from_bits(uint32_t b) { return M(b); }
  static ZSQ_INLINE M mor(M a, M b) { return M(a | b); }
  static ZSQ_INLINE M mnot(M a) { return M(~a); }

  static ZSQ_INLINE F set1(float a) { return _mm512_set1_ps(a); }
  static ZSQ_INLINE F zero() { return _mm512_setzero_ps(); }
  static ZSQ_INLINE F loadf(const float* p) { return _mm512_loadu_ps(p); }
  static ZSQ_INLINE void storef(float* p, F a) { _mm512_storeu_ps(p, a); }

  template <class S> static ZSQ_INLINE Raw<S> load_raw(const typename S::T* p) {
    if constexpr (std::is_same_v<S, F32>) return _mm512_loadu_ps(p);
    else return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  }
  // Masked loads/stores: lanes >= cnt are neither read nor written (no fault past the end).
  template <class S> static ZSQ_INLINE Raw<S> load_raw_n(const typename S::T* p, int cnt) {
    if constexpr (std::is_same_v<S, F32>) return _mm512_maskz_loadu_ps(lanes(cnt), p);
    else return _mm256_maskz_loadu_epi16(lanes(cnt), p);
  }
  template <class S> static ZSQ_INLINE void store_raw(typename S::T* p, Raw<S> r) {
    if constexpr (std::is_same_v<S, F32>) _mm512_storeu_ps(p, r);
    else _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), r);
  }
  template <class S> static ZSQ_INLINE void store_raw_n(typename S::T* p, Raw<S> r, int cnt) {
    if constexpr (std::is_same_v<S, F32>) _mm512_mask_storeu_ps(p, lanes(cnt), r);
    else _mm256_mask_storeu_epi16(p, lanes(cnt), r);
  }
  template <class S> static ZSQ_INLINE Raw<S> maskz_raw(M m, Raw<S> r) {
    if constexpr (std::is_same_v<S, F32>) return _mm512_maskz_mov_ps(m, r);
    else return _mm256_maskz_mov_epi16(m, r);
  }
  template <class S> static ZSQ_INLINE F to_f32(Raw<S> r) {
    if constexpr (std::is_same_v<S, F32>) return r;
    else if constexpr (std::is_same_v<S, F16>) return _mm512_cvtph_ps(r);
    else return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(r), 16));
  }
  template <class S> static ZSQ_INLINE Raw<S> from_f32(F v) {
    if constexpr (std::is_same_v<S, F32>) {
      return v;
    } else if constexpr (std::is_same_v<S, F16>) {
      return _mm512_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    } else {  // round to nearest even; NaN -> 0x7FC0
      const __m512i u = _mm512_castps_si512(v);
      const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
      __m512i r = _mm512_srli_epi32(_mm512_add_epi32(_mm512_add_epi32(u, _mm512_set1_epi32(0x7FFF)), lsb), 16);
      r = _mm512_mask_blend_epi32(_mm512_cmp_ps_mask(v, v, _CMP_ORD_Q), _mm512_set1_epi32(0x7FC0), r);
      return _mm512_cvtepi32_epi16(r);
    }
  }

  static ZSQ_INLINE F add(F a, F b) { return _mm512_add_ps(a, b); }
  static ZSQ_INLINE F sub(F a, F b) { return _mm512_sub_ps(a, b); }
  static ZSQ_INLINE F mul(F a, F b) { return _mm512_mul_ps(a, b); }
  static ZSQ_INLINE F rne(F a) { return _mm512_roundscale_ps(a, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC); }
  // vmaxps/vminps return the second operand when either is NaN: max(lo, v), min(hi, .) propagate NaN v.
  static ZSQ_INLINE F clamp(F a, F lo, F hi) { return _mm512_min_ps(hi, _mm512_max_ps(lo, a)); }
  static ZSQ_INLINE F select(M m, F a, F b) { return _mm512_mask_blend_ps(m, b, a); }
  static ZSQ_INLINE F maskz(M m, F a) { return _mm512_maskz_mov_ps(m, a); }
  static ZSQ_INLINE M in_range(F q, F lo, F hi) {
    return _mm512_mask_cmp_ps_mask(_mm512_cmp_ps_mask(q, lo, _CMP_GE_OQ), q, hi, _CMP_LE_OQ);
  }
  static ZSQ_INLINE M lt(F a, F b) { return _mm512_cmp_ps_mask(a, b, _CMP_LT_OQ); }
  static ZSQ_INLINE M gt(F a, F b) { return _mm512_cmp_ps_mask(a, b, _CMP_GT_OQ); }
  static ZSQ_INLINE double hsum_d(F a) {
    const __m512d d = _mm512_add_pd(_mm512_cvtps_pd(_mm512_castps512_ps256(a)),
                                    _mm512_cvtps_pd(_mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(a), 1))));
    return _mm512_reduce_add_pd(d);
  }
};
}  // namespace zsqfast::cpu::detail
ZSQ_END_TARGET

namespace zsqfast::cpu::detail {

// The implementation of the active level ("avx512_vnni" runs the AVX-512 code: these kernels use no VNNI).
template <class Fn>
Fn pick(Fn avx512, Fn avx2, Fn scalar) {
  switch (active_isa()) {
    case Isa::Avx512Vnni:
    case Isa::Avx512: return avx512;
    case Isa::Avx2: return avx2;
    default: return scalar;
  }
}

// ------------------------------------------------------------------------------------------------------
// Fixed chunking: a multiple of 64 elements (so no two chunks share a mask byte, and every chunk starts
// on a vector boundary), at least 32 Ki elements (smaller tensors run on the calling thread), at most
// ~256 chunks. Depends only on n: reductions are the same on any thread count.
inline int64_t chunk_size(int64_t n) {
  int64_t ch = (n + 255) / 256;
  if (ch < 32768) ch = 32768;
  return (ch + 63) / 64 * 64;
}
inline int64_t num_chunks(int64_t n) { return n > 0 ? (n + chunk_size(n) - 1) / chunk_size(n) : 0; }

// fn(chunk_index, begin, end) for every chunk of [0, n); contiguous blocks of chunks per thread.
template <class Fn>
void for_each_chunk(int64_t n, Fn&& fn) {
  const int64_t ch = chunk_size(n), nchunks = num_chunks(n);
  const int threads = int(std::min<int64_t>(num_threads(), nchunks));
  if (threads <= 1) {
    for (int64_t i = 0; i < nchunks; ++i) fn(i, i * ch, std::min(n, (i + 1) * ch));
    return;
  }
#pragma omp parallel for schedule(static) num_threads(threads)
  for (int64_t i = 0; i < nchunks; ++i) fn(i, i * ch, std::min(n, (i + 1) * ch));
}

// ------------------------------------------------------------------------------------------------------
// Channel geometry of a memory-order walk: element o has channel (o / inner) % C. Three ways to feed the
// per-lane parameters of a vector block:
//   Runs  (inner >= 16, or per tensor): a channel covers >= 16 consecutive elements, so a 16-lane block
//         meets at most two channels: broadcasts, and one blend where a run ends inside a block.
//   Table (inner < 16, period inner*C short): per-position parameter tables over a period P2 (a multiple
//         of inner*C, of 16 where that stays small), so lanes load contiguously (channels-last, inner = 1).
//   Lanes (inner < 16, long period): per-lane parameters gathered with scalar counters (rare layouts).
struct Geo {
  enum class Mode { Runs, Table, Lanes };
  static constexpr int kPad = 16;  // widest vector: tables are readable 16 past any position < P2
  Mode mode = Mode::Runs;
  int64_t inner = 1, C = 1, P = 1, P2 = 0;
  const float* p[3] = {nullptr, nullptr, nullptr};
  std::vector<float> tab[3];      // Table: parameter k at table position q (length P2 + kPad)
  std::vector<int32_t> chan;      // Table, when asked: channel of table position q

  Geo(int64_t n, const float* p0, const float* p1, const float* p2, int64_t inner_, int64_t C_, int64_t max_table,
      bool want_chan)
      : inner(inner_), C(C_), p{p0, p1, p2} {
    if (inner < 1) inner = 1;
    if (C <= 1) {  // per tensor: one run
      C = 1;
      inner = std::max<int64_t>(n, 1);
    }
    if (inner >= 16) return;  // Runs
    P = inner * C;
    const int64_t l16 = P * (16 / std::min<int64_t>(16, P & -P)), cover = P * ((kPad + P - 1) / P);
    P2 = l16 <= max_table ? l16 : cover;
    if (P2 > max_table) {
      mode = Mode::Lanes;
      return;
    }
    mode = Mode::Table;
    const int64_t len = P2 + kPad;
    for (int k = 0; k < 3; ++k) {
      if (!p[k]) continue;
      tab[k].resize(size_t(len));
      for (int64_t q = 0; q < len; ++q) tab[k][size_t(q)] = p[k][((q % P) / inner) % C];
    }
    if (want_chan) {
      chan.resize(size_t(len));
      for (int64_t q = 0; q < len; ++q) chan[size_t(q)] = int32_t(((q % P) / inner) % C);
    }
  }
};

}  // namespace zsqfast::cpu::detail
#endif  // ZSQFAST_CPU_SIMD_H

// ------------------------------------------------------------------------------------------------------
// Part 2, compiled once per level: a kernel file includes simd.h again inside each level's region and
// namespace, with ZSQ_ISA_PASS defined and `V` naming that level's vector type.
#ifdef ZSQ_ISA_PASS

// Calls blk(o, cnt, s, inv, zp) for the consecutive V::W-element blocks of [begin, end) (begin % 64 == 0,
// so every block starts on a multiple of V::W; cnt == V::W except for a last partial block), with each
// lane's parameters p[0][c], p[1][c], p[2][c] (zero where p[2] is null). Full blocks are called with the
// literal V::W so that `cnt == V::W` folds away in the inlined block.
template <class Blk>
ZSQ_INLINE void walk(const Geo& g, int64_t begin, int64_t end, Blk&& blk) {
  using F = typename V::F;
  constexpr int W = V::W;
  const float *p0 = g.p[0], *p1 = g.p[1], *p2 = g.p[2];
  int64_t o = begin;
  switch (g.mode) {
    case Geo::Mode::Runs: {
      int64_t c = (o / g.inner) % g.C, run_end = (o / g.inner + 1) * g.inner;
      for (;;) {
        const F s = V::set1(p0[c]), inv = V::set1(p1[c]), zp = p2 ? V::set1(p2[c]) : V::zero();
        const int64_t stop = std::min(run_end, end);
        for (; o + W <= stop; o += W) blk(o, W, s, inv, zp);
        if (o >= end) return;
        const int k = int(stop - o);  // lanes of the block at o still in channel c: 0 <= k < W
        if (stop == end) {
          blk(o, k, s, inv, zp);
          return;
        }
        c = c + 1 == g.C ? 0 : c + 1;  // the run of c ends inside (or at) this block; inner >= W
        run_end += g.inner;
        if (k == 0) continue;
        const typename V::M m = V::lanes(k);
        const int cnt = int(std::min<int64_t>(W, end - o));
        blk(o, cnt, V::select(m, s, V::set1(p0[c])), V::select(m, inv, V::set1(p1[c])),
            p2 ? V::select(m, zp, V::set1(p2[c])) : zp);
        o += cnt;
        if (o >= end) return;
      }
    }
    case Geo::Mode::Table: {
      const float *t0 = g.tab[0].data(), *t1 = g.tab[1].data(), *t2 = p2 ? g.tab[2].data() : nullptr;
      int64_t pos = begin % g.P2;
      for (; o + W <= end; o += W) {
        blk(o, W, V::loadf(t0 + pos), V::loadf(t1 + pos), t2 ? V::loadf(t2 + pos) : V::zero());
        pos += W;
        if (pos >= g.P2) pos -= g.P2;
      }
      if (o < end) blk(o, int(end - o), V::loadf(t0 + pos), V::loadf(t1 + pos), t2 ? V::loadf(t2 + pos) : V::zero());
      return;
    }
    case Geo::Mode::Lanes: {
      alignas(64) float l0[W], l1[W], l2[W];
      int64_t c = (o / g.inner) % g.C, rem = o % g.inner;
      for (; o < end; o += W) {
        for (int i = 0; i < W; ++i) {
          l0[i] = p0[c];
          l1[i] = p1[c];
          l2[i] = p2 ? p2[c] : 0.0f;
          if (++rem == g.inner) {
            rem = 0;
            if (++c == g.C) c = 0;
          }
        }
        blk(o, int(std::min<int64_t>(W, end - o)), V::loadf(l0), V::loadf(l1), V::loadf(l2));
      }
      return;
    }
  }
}

#endif  // ZSQ_ISA_PASS
