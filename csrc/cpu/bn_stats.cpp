// CPU BatchNorm-input statistics: one read pass producing per-channel mean and biased variance (double
// accumulation: fp32 vector partial sums of at most 128 terms flushed to double, chunks combined in a fixed
// order), and the backward's per-channel affine map added to an incoming gradient in one pass.
#include <immintrin.h>

#include <cstring>
#include <type_traits>

#include "../kernels.h"
#include "isa.h"
#include "vec_scalar.h"

namespace zsqfast::cpu {
struct BnArgs {
  const void* x;
  const void* grad;  // backward, nullable
  void* out;         // backward
  double* sums;      // forward: (chunks, C, 2)
  const ChannelParams* params;  // backward: a, b
};
using BnFn = void (*)(const BnArgs&, int64_t, int64_t, int64_t);
}  // namespace zsqfast::cpu

#define ZSQ_BODY "bn_stats_body.inc"
#include "isa_regions.inc"

namespace zsqfast::cpu {

void bn_stats(DType dt, const void* x, int64_t n, int64_t inner, int64_t C, float* mean, float* var) {
  const int64_t nchunks = n > 0 ? (n + chunk_size(n) - 1) / chunk_size(n) : 0;
  std::vector<double> sums(size_t(nchunks * C * 2), 0.0);
  std::vector<float> shift(size_t(C), 0.0f);
  if (n > 0) {
    k_scalar::shift_fn(dt)(x, inner, C, shift.data());
    const ChannelParams params(shift.data(), nullptr, nullptr, inner, C, 4096);
    const BnArgs a{x, nullptr, nullptr, sums.data(), &params};
    const BnFn fn = pick(k_avx512::stats_fn(dt), k_avx2::stats_fn(dt), k_scalar::stats_fn(dt));
    for_each_chunk(n, [&](int64_t i, int64_t b, int64_t e) { fn(a, i, b, e); });
  }
  const double m = C > 0 ? double(n / C) : 0.0;
  for (int64_t c = 0; c < C; ++c) {
    double s = 0.0, q = 0.0;
    for (int64_t k = 0; k < nchunks; ++k) {
      s += sums[size_t((k * C + c) * 2)];
      q += sums[size_t((k * C + c) * 2 + 1)];
    }
    const double d = s / m, v = q / m - d * d;  // mean and variance of x - K_c
    mean[c] = float(double(shift[size_t(c)]) + d);
    var[c] = float(v > 0.0 ? v : 0.0);
  }
}

void bn_stats_bwd(DType dt, const void* grad, const void* x, void* out, int64_t n, const float* a, const float* b,
                  int64_t inner, int64_t C) {
  if (n <= 0) return;
  const ChannelParams params(a, b, nullptr, inner, C, int64_t(1) << 16);
  const BnArgs args{x, grad, out, nullptr, &params};
  const BnFn fn = pick(k_avx512::affine_fn(dt), k_avx2::affine_fn(dt), k_scalar::affine_fn(dt));
  for_each_chunk(n, [&](int64_t i, int64_t bg, int64_t e) { fn(args, i, bg, e); });
}

}  // namespace zsqfast::cpu
