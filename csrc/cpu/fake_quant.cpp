// CPU fake quantization: one fused pass forward (output + 1-bit STE mask), one fused pass backward.
// Math and layout: csrc/kernels.h and zsqfast/ops/fake_quantize.py.
//
// Per element (fp32 arithmetic whatever the storage):  q = rne(x * inv[c]) + zp[c];
//   out = (min(hi, max(lo, q)) - zp[c]) * s[c]   (NaN propagates);   mask bit = lo <= q <= hi.
//
// Layout of this file ("self-include"): the first pass (ZSQ_FQ_BODY undefined) declares the argument
// structs, then includes this same file three times, inside the AVX-512 region, the AVX2 region and plain
// code, each time in its own namespace with `V` naming that level's vector type (simd.h). Those passes
// compile only the kernel bodies (the #else branch at the bottom). The entry points then pick the active
// level's function pointer. One source of truth per kernel, compiled per ISA with one set of flags.
#ifndef ZSQ_FQ_BODY
#include "simd.h"

namespace zsqfast::cpu::detail {
struct FqArgs {
  const void* x;
  void* out;
  uint8_t* mask;  // nullable
  const Geo* geo; // scale, inv_scale, zero_point
  float qmin, qmax;
};
using FqFwdFn = void (*)(const FqArgs&, int64_t, int64_t);
using FqBwdFn = void (*)(const void*, const uint8_t*, void*, int64_t, int64_t);
}  // namespace zsqfast::cpu::detail

#define ZSQ_FQ_BODY
#define ZSQ_ISA_PASS
ZSQ_BEGIN_AVX512
namespace zsqfast::cpu::detail::k_avx512 {
namespace {
using V = V512;
#include "simd.h"
#include "fake_quant.cpp"
}  // namespace
}  // namespace zsqfast::cpu::detail::k_avx512
ZSQ_END_TARGET
ZSQ_BEGIN_AVX2
namespace zsqfast::cpu::detail::k_avx2 {
namespace {
using V = V256;
#include "simd.h"
#include "fake_quant.cpp"
}  // namespace
}  // namespace zsqfast::cpu::detail::k_avx2
ZSQ_END_TARGET
namespace zsqfast::cpu::detail::k_scalar {
namespace {
using V = VScalar;
#include "simd.h"
#include "fake_quant.cpp"
}  // namespace
}  // namespace zsqfast::cpu::detail::k_scalar
#undef ZSQ_ISA_PASS
#undef ZSQ_FQ_BODY

namespace zsqfast::cpu {

void fake_quant_fwd(DType dt, const void* x, void* out, uint8_t* mask, int64_t n, const float* scale,
                    const float* inv_scale, const float* zero_point, int64_t inner, int64_t C, float qmin,
                    float qmax) {
  using namespace detail;
  if (n <= 0) return;
  const Geo geo(n, scale, inv_scale, zero_point, inner, C, /*max_table=*/16384, /*want_chan=*/false);
  const FqArgs a{x, out, mask, &geo, qmin, qmax};
  const bool m = mask != nullptr;
  const FqFwdFn fn = pick(k_avx512::fwd_fn(dt, m), k_avx2::fwd_fn(dt, m), k_scalar::fwd_fn(dt, m));
  for_each_chunk(n, [&](int64_t, int64_t b, int64_t e) { fn(a, b, e); });
}

void fake_quant_bwd(DType dt, const void* grad, const uint8_t* mask, void* out, int64_t n) {
  using namespace detail;
  if (n <= 0) return;
  const FqBwdFn fn = pick(k_avx512::bwd_fn(dt), k_avx2::bwd_fn(dt), k_scalar::bwd_fn(dt));
  for_each_chunk(n, [&](int64_t, int64_t b, int64_t e) { fn(grad, mask, out, b, e); });
}

}  // namespace zsqfast::cpu

#else  // ---------------------------------------- kernel bodies, once per level (V) -------------------

// Forward over [begin, end): output and (kMask) the mask bits of whole bytes [begin / 8, ceil(end / 8)).
template <class S, bool kMask>
void fq_fwd_chunk(const FqArgs& a, int64_t begin, int64_t end) {
  using T = typename S::T;
  using F = typename V::F;
  const T* x = static_cast<const T*>(a.x);
  T* y = static_cast<T*>(a.out);
  uint8_t* mask = a.mask;
  const F lo = V::set1(a.qmin), hi = V::set1(a.qmax);
  walk(*a.geo, begin, end, [&](int64_t o, int cnt, F s, F inv, F zp) __attribute__((always_inline)) {
    const bool full = cnt == V::W;
    const F xv = V::template to_f32<S>(full ? V::template load_raw<S>(x + o) : V::template load_raw_n<S>(x + o, cnt));
    const F q = V::add(V::rne(V::mul(xv, inv)), zp);
    const auto r = V::template from_f32<S>(V::mul(V::sub(V::clamp(q, lo, hi), zp), s));
    if (full) {
      V::template store_raw<S>(y + o, r);
    } else {
      V::template store_raw_n<S>(y + o, r, cnt);
    }
    if constexpr (kMask) put_bits<V::W>(mask, o, V::bits(V::in_range(q, lo, hi)), cnt);
  });
}

// out = bit(mask, o) ? grad : 0 on the raw elements (S = F32, or F16 standing for any 16-bit type).
template <class S>
void fq_bwd_chunk(const void* grad, const uint8_t* mask, void* out, int64_t begin, int64_t end) {
  using T = typename S::T;
  constexpr int W = V::W;
  const T* g = static_cast<const T*>(grad);
  T* y = static_cast<T*>(out);
  int64_t o = begin;
  for (; o + W <= end; o += W) {
    const auto m = V::from_bits(get_bits<W>(mask, o, W));
    V::template store_raw<S>(y + o, V::template maskz_raw<S>(m, V::template load_raw<S>(g + o)));
  }
  if (o < end) {
    const int cnt = int(end - o);
    const auto m = V::from_bits(get_bits<W>(mask, o, cnt));
    V::template store_raw_n<S>(y + o, V::template maskz_raw<S>(m, V::template load_raw_n<S>(g + o, cnt)), cnt);
  }
}

inline FqFwdFn fwd_fn(DType dt, bool mask) {
  switch (dt) {
    case DType::F16: return mask ? &fq_fwd_chunk<F16, true> : &fq_fwd_chunk<F16, false>;
    case DType::BF16: return mask ? &fq_fwd_chunk<BF16, true> : &fq_fwd_chunk<BF16, false>;
    default: return mask ? &fq_fwd_chunk<F32, true> : &fq_fwd_chunk<F32, false>;
  }
}

inline FqBwdFn bwd_fn(DType dt) { return dt == DType::F32 ? &fq_bwd_chunk<F32> : &fq_bwd_chunk<F16>; }

#endif  // ZSQ_FQ_BODY
