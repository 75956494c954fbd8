// CPU LSQ fake quantization: fused forward; fused backward that writes grad_x and reduces the step
// gradient from in-kernel partial sums (per chunk, per channel, in double), combined in chunk order so
// the result does not depend on the thread count. Math: csrc/kernels.h and zsqfast/ops/lsq.py.
#include <immintrin.h>

#include <cstring>
#include <type_traits>

#include "../kernels.h"
#include "isa.h"
#include "vec_scalar.h"

namespace zsqfast::cpu {
struct LsqArgs {
  const void* grad;  // backward only
  const void* x;
  void* out;         // forward: out; backward: grad_x
  double* sums;      // backward: (chunks, C) partial step-gradient sums
  const ChannelParams* params;  // step, inv_step
  float qmin, qmax;
};
using LsqFn = void (*)(const LsqArgs&, int64_t, int64_t, int64_t);
}  // namespace zsqfast::cpu

#define ZSQ_BODY "lsq_body.inc"
#include "isa_regions.inc"

namespace zsqfast::cpu {

void lsq_fwd(DType dt, const void* x, void* out, int64_t n, const float* step, const float* inv_step,
             int64_t inner, int64_t C, float qmin, float qmax) {
  if (n <= 0) return;
  const ChannelParams params(step, inv_step, nullptr, inner, C, int64_t(1) << 16);
  const LsqArgs a{nullptr, x, out, nullptr, &params, qmin, qmax};
  const LsqFn fn = pick(k_avx512::fwd_fn(dt), k_avx2::fwd_fn(dt), k_scalar::fwd_fn(dt));
  for_each_chunk(n, [&](int64_t i, int64_t b, int64_t e) { fn(a, i, b, e); });
}

void lsq_bwd(DType dt, const void* grad, const void* x, void* grad_x, float* grad_step, int64_t n,
             const float* step, const float* inv_step, int64_t inner, int64_t C, float qmin, float qmax,
             float grad_scale) {
  const int64_t nchunks = n > 0 ? (n + chunk_size(n) - 1) / chunk_size(n) : 0;
  std::vector<double> sums(size_t(nchunks * C), 0.0);
  if (n > 0) {
    const ChannelParams params(step, inv_step, nullptr, inner, C, 4096);
    const LsqArgs a{grad, x, grad_x, sums.data(), &params, qmin, qmax};
    const LsqFn fn = pick(k_avx512::bwd_fn(dt), k_avx2::bwd_fn(dt), k_scalar::bwd_fn(dt));
    for_each_chunk(n, [&](int64_t i, int64_t b, int64_t e) { fn(a, i, b, e); });
  }
  for (int64_t c = 0; c < C; ++c) {
    double total = 0.0;
    for (int64_t k = 0; k < nchunks; ++k) total += sums[size_t(k * C + c)];
    grad_step[c] = float(total * double(grad_scale));
  }
}

}  // namespace zsqfast::cpu
