// CPU kernel of SynQ's CAM-alignment loss (zsqfast/ops/cam_mse.py), fused per sample b:
//   s = sum_k alpha_k A_k (h, w),  m = ReLU(s),  u = bilinear upsample of m to (H, W) (align_corners=False,
//   the 2-tap index / weight tables iy, wy (H, 2) and ix, wx (W, 2); rounded as torch rounds it: u_row),
//   lo = min u, hi = max u (first index of each, like torch), D = hi - lo + 1e-10,
//   loss = sum_b sum_ij ((u - lo) / D - T)^2 / (B H W).
// Backward with g = ((u - lo) / D - T) c, c = 2 dL / (B H W):
//   du = g / D, plus sum(g (u - lo)) / D^2 - sum(g) / D at argmin and - sum(g (u - lo)) / D^2 at argmax,
//   dm = U^T du (the transposed taps), ds = dm [s > 0], dA_k = alpha_k ds.
// Only s is kept between forward and backward; u is recomputed row by row (the (h, W) half-resampled map
// stays in L1), so the (H, W) maps are never stored. One OpenMP task per sample.
#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <type_traits>
#include <vector>

#include "../kernels.h"
#include "isa.h"
#include "vec_scalar.h"

namespace zsqfast::cpu {
struct CamGeom {
  int64_t K, h, w, H, W;
  const int64_t* iy;  // (H, 2): source rows of each output row
  const float* wy;    // (H, 2): their weights
  const int64_t* ix;  // (W, 2)
  const float* wx;    // (W, 2)
  const float* bx0;   // (W,): wx[:, 0] and wx[:, 1] de-interleaved (the small-map rows load them as vectors)
  const float* bx1;
};
using CamFwdFn = double (*)(const CamGeom&, int64_t, const float*, const float*, const float*, float*);
using CamBwdFn = void (*)(const CamGeom&, int64_t, float, const float*, const float*, const float*, float*);
}  // namespace zsqfast::cpu

#define ZSQ_BODY "cam_mse_body.inc"
#include "isa_regions.inc"

namespace zsqfast::cpu {

namespace {
struct Columns {  // the W-axis weights (W, 2) de-interleaved
  std::vector<float> b0, b1;
  Columns(const float* wx, int64_t W) : b0(static_cast<size_t>(W)), b1(static_cast<size_t>(W)) {
    for (int64_t j = 0; j < W; ++j) {
      b0[size_t(j)] = wx[2 * j];
      b1[size_t(j)] = wx[2 * j + 1];
    }
  }
};
}  // namespace

float cam_mse_fwd(const float* a, const float* alpha, const float* target, float* s, int64_t B, int64_t K, int64_t h,
                  int64_t w, int64_t H, int64_t W, const int64_t* iy, const float* wy, const int64_t* ix,
                  const float* wx) {
  const Columns cols(wx, W);
  const CamGeom g{K, h, w, H, W, iy, wy, ix, wx, cols.b0.data(), cols.b1.data()};
  const CamFwdFn fn = pick<CamFwdFn>(k_avx512::forward_batch, k_avx2::forward_batch, k_scalar::forward_batch);
  return float(fn(g, B, a, alpha, target, s) / double(B * H * W));
}

void cam_mse_bwd(float grad, const float* s, const float* alpha, const float* target, float* da, int64_t B, int64_t K,
                 int64_t h, int64_t w, int64_t H, int64_t W, const int64_t* iy, const float* wy, const int64_t* ix,
                 const float* wx) {
  const Columns cols(wx, W);
  const CamGeom g{K, h, w, H, W, iy, wy, ix, wx, cols.b0.data(), cols.b1.data()};
  const float c = (2.0f * grad) / float(B * H * W);  // torch: 2.0 * grad_out / numel, in fp32
  const CamBwdFn fn = pick<CamBwdFn>(k_avx512::backward_batch, k_avx2::backward_batch, k_scalar::backward_batch);
  fn(g, B, c, s, alpha, target, da);
}

}  // namespace zsqfast::cpu
