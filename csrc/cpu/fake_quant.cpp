// CPU fake quantization: one fused pass forward (output + 1-bit STE mask), one fused pass backward.
// Math and layout: csrc/kernels.h and zsqfast/ops/fake_quantize.py. Kernels walk memory order in chunks
// (isa.h); per-element channel parameters come from ChannelParams (tables or broadcast runs).
#include <immintrin.h>

#include <cstring>
#include <type_traits>

#include "../kernels.h"
#include "isa.h"
#include "vec_scalar.h"

namespace zsqfast::cpu {
struct FqArgs {
  const void* x;
  void* out;
  uint8_t* mask;
  const ChannelParams* params;  // scale, inv_scale, zero_point
  float qmin, qmax;
};
using FqFwdFn = void (*)(const FqArgs&, int64_t, int64_t);
using FqBwdFn = void (*)(const void*, const uint8_t*, void*, int64_t, int64_t);
}  // namespace zsqfast::cpu

#define ZSQ_BODY "fake_quant_body.inc"
#include "isa_regions.inc"

namespace zsqfast::cpu {

void fake_quant_fwd(DType dt, const void* x, void* out, uint8_t* mask, int64_t n, const float* scale,
                    const float* inv_scale, const float* zero_point, int64_t inner, int64_t C, float qmin,
                    float qmax) {
  if (n <= 0) return;
  const ChannelParams params(scale, inv_scale, zero_point, inner, C, int64_t(1) << 16);
  const FqArgs a{x, out, mask, &params, qmin, qmax};
  const FqFwdFn fn = pick(k_avx512::fwd_fn(dt), k_avx2::fwd_fn(dt), k_scalar::fwd_fn(dt));
  for_each_chunk(n, [&](int64_t, int64_t b, int64_t e) { fn(a, b, e); });
}

void fake_quant_bwd(DType dt, const void* grad, const uint8_t* mask, void* out, int64_t n) {
  if (n <= 0) return;
  const FqBwdFn fn = pick(k_avx512::bwd_fn(dt), k_avx2::bwd_fn(dt), k_scalar::bwd_fn(dt));
  for_each_chunk(n, [&](int64_t, int64_t b, int64_t e) { fn(grad, mask, out, b, e); });
}

}  // namespace zsqfast::cpu
