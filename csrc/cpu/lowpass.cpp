// CPU separable circular convolution (the banded fast path of SynQ's Gaussian low-pass filter, see
// zsqfast/ops/lowpass.py): for every (H, W) plane of a contiguous fp32 (planes, H, W) tensor,
//   out[i, j] = sum_a sum_b wh[a] ww[b] x[(i + a - rh) mod H, (j + b - rw) mod W],
// with symmetric taps (wh[a] = wh[2 rh - a], ww likewise), applied as a vertical then a horizontal pass per
// output row (the intermediate row stays in L1). Work is split into (plane, block of 16 rows) units over
// the OpenMP threads; per output element it costs rh + rw + 2 FMAs-with-add and no FFT.
#include <immintrin.h>

#include <algorithm>
#include <type_traits>
#include <vector>

#include "../kernels.h"
#include "isa.h"
#include "vec_scalar.h"

namespace zsqfast::cpu {
using PlaneRowsFn = void (*)(const float*, float*, int64_t, int64_t, const float*, int64_t, const float*, int64_t,
                             int64_t, int64_t, const float**, float*, const int64_t*);
}  // namespace zsqfast::cpu

#define ZSQ_BODY "lowpass_body.inc"
#include "isa_regions.inc"

namespace zsqfast::cpu {

void circular_conv_sep(const float* x, float* out, int64_t planes, int64_t H, int64_t W, const float* wh,
                       int64_t rh, const float* ww, int64_t rw) {
  if (planes <= 0 || H <= 0 || W <= 0) return;
  constexpr int64_t kRows = 16;
  const int64_t blocks = (H + kRows - 1) / kRows, units = planes * blocks;
  const PlaneRowsFn fn = pick<PlaneRowsFn>(k_avx512::plane_rows, k_avx2::plane_rows, k_scalar::plane_rows);
  const int threads = int(std::min<int64_t>(num_threads(), units));
#pragma omp parallel num_threads(threads) if (threads > 1)
  {
    std::vector<const float*> rows(size_t(H + 2 * rh));
    std::vector<float> pad(size_t(W + 2 * rw));
    std::vector<int64_t> wrap(size_t(2 * rw));  // source columns of the circular margins
    for (int64_t k = 0; k < rw; ++k) {
      wrap[size_t(k)] = (((k - rw) % W) + W) % W;
      wrap[size_t(rw + k)] = k % W;
    }
#pragma omp for schedule(static)
    for (int64_t u = 0; u < units; ++u) {
      const int64_t p = u / blocks, i0 = (u % blocks) * kRows;
      fn(x + p * H * W, out + p * H * W, H, W, wh, rh, ww, rw, i0, std::min(H, i0 + kRows), rows.data(), pad.data(),
         wrap.data());
    }
  }
}

}  // namespace zsqfast::cpu
