// CPU Gaussian kernel density of PSAQ-ViT's patch-similarity entropy (zsqfast/ops/kde_density.py), per row b of
// v (B, M) at its K grid points t (B, K):
//   p[b, k] = scale * sum_j exp(-0.5 ((t_k - v_j) / bw)^2),     scale = 1 / (M bw sqrt(2 pi)),
// and its backward  gv[b, j] = scale / bw * sum_k gp[b, k] z_kj exp(-0.5 z_kj^2),  z_kj = (t_k - v_j) / bw.
// Nothing (B, K, M)-sized is formed (the reference builds three such tensors, and autograd keeps them); the
// exponentials are recomputed in the backward. Work units: (row, chunk of kChunk values); the forward's
// partial sums are added in chunk order, so the result does not depend on the thread count.
#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <vector>

#include "../kernels.h"
#include "isa.h"
#include "vec_scalar.h"

namespace zsqfast::cpu {
using DensityFn = void (*)(const float*, int64_t, int64_t, const float*, int64_t, float, double*);
using DensityGradFn = void (*)(const float*, float*, int64_t, int64_t, const float*, const float*, int64_t, float,
                               float);
}  // namespace zsqfast::cpu

#define ZSQ_BODY "kde_body.inc"
#include "isa_regions.inc"

namespace zsqfast::cpu {
namespace {
constexpr int64_t kChunk = 8192;
}

void kde_density(const float* v, const float* t, float* p, int64_t B, int64_t M, int64_t K, float bandwidth) {
  if (B <= 0 || K <= 0) return;
  const int64_t chunks = std::max<int64_t>(1, (M + kChunk - 1) / kChunk), units = B * chunks;
  std::vector<double> part(size_t(units * K), 0.0);
  const DensityFn fn = pick<DensityFn>(k_avx512::density_chunk, k_avx2::density_chunk, k_scalar::density_chunk);
  const float inv_bw = 1.0f / bandwidth;
  const int threads = int(std::min<int64_t>(num_threads(), units));
#pragma omp parallel for schedule(dynamic, 1) num_threads(threads) if (threads > 1)
  for (int64_t u = 0; u < units; ++u) {
    const int64_t b = u / chunks, c = u % chunks;
    fn(v + b * M, c * kChunk, std::min(M, (c + 1) * kChunk), t + b * K, K, inv_bw, part.data() + u * K);
  }
  const double scale = 1.0 / (double(M) * double(bandwidth) * std::sqrt(2.0 * 3.14159265358979323846));
  for (int64_t b = 0; b < B; ++b)
    for (int64_t k = 0; k < K; ++k) {
      double s = 0.0;
      for (int64_t c = 0; c < chunks; ++c) s += part[size_t((b * chunks + c) * K + k)];
      p[b * K + k] = float(s * scale);
    }
}

void kde_density_bwd(const float* gp, const float* v, const float* t, float* gv, int64_t B, int64_t M, int64_t K,
                     float bandwidth) {
  if (B <= 0 || M <= 0) return;
  const int64_t chunks = (M + kChunk - 1) / kChunk, units = B * chunks;
  const DensityGradFn fn =
      pick<DensityGradFn>(k_avx512::density_grad_chunk, k_avx2::density_grad_chunk, k_scalar::density_grad_chunk);
  const float inv_bw = 1.0f / bandwidth;
  const float c = float(1.0 / (double(M) * double(bandwidth) * double(bandwidth) *
                               std::sqrt(2.0 * 3.14159265358979323846)));
  const int threads = int(std::min<int64_t>(num_threads(), units));
#pragma omp parallel for schedule(dynamic, 1) num_threads(threads) if (threads > 1)
  for (int64_t u = 0; u < units; ++u) {
    const int64_t b = u / chunks, ch = u % chunks;
    fn(v + b * M, gv + b * M, ch * kChunk, std::min(M, (ch + 1) * kChunk), t + b * K, gp + b * K, K, inv_bw, c);
  }
}

}  // namespace zsqfast::cpu
