// CPU separable real-mask FFT filter (the wide-kernel fast path of SynQ's Gaussian low-pass filter, see
// zsqfast/ops/fft_filter.py): for every (H, W) plane of a contiguous fp32 (planes, H, W) tensor,
//   out = ifft2(fft2(x) * gh[u] gw[v]).real,
// gh, gw real and symmetric (g[k] = g[(n - k) % n]), so each 1-D filter A = F^-1 diag(g) F is a REAL matrix:
// filtering the complex signal a + i b gives A a + i A b. Two real rows (or columns) therefore share one
// complex FFT, and V::W independent signals share every SIMD instruction (lanes = rows for the row pass,
// columns for the column pass). The FFT is a mixed-radix Stockham autosort (radix 8, 4, 2, 3, 5, 7 and any other
// odd factor <= kMaxRadix), O(n log n) per signal instead of the O(n) taps per pixel of the dense circulant.
// One plane per OpenMP work unit: its row pass then its column pass, the plane staying in L2.
#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <vector>

#include "../kernels.h"
#include "isa.h"
#include "vec_scalar.h"

namespace zsqfast::cpu {

constexpr int64_t kMaxRadix = 64;

// Stages, twiddles and scale of one 1-D filter of length n (see stage() in fft_filter_body.inc).
struct FftPlan {
  int64_t n = 0;
  std::vector<int64_t> radix, ns, tw_off, roots_off;
  std::vector<float> tw, roots, scale;
};

// Radix 8 first, then 4, 2, then odd factors ascending; false when a prime factor exceeds kMaxRadix.
bool fft_factors(int64_t n, std::vector<int64_t>& out) {
  out.clear();
  while (n % 8 == 0) out.push_back(8), n /= 8;
  while (n % 4 == 0) out.push_back(4), n /= 4;
  while (n % 2 == 0) out.push_back(2), n /= 2;
  for (int64_t p = 3; n > 1; p += 2) {
    if (p > kMaxRadix) return false;
    while (n % p == 0) out.push_back(p), n /= p;
  }
  return true;
}

FftPlan make_plan(int64_t n, const float* g) {
  FftPlan p;
  p.n = n;
  fft_factors(n, p.radix);
  const double two_pi = 6.283185307179586476925286766559;
  int64_t ns = 1;
  for (int64_t R : p.radix) {
    p.ns.push_back(ns);
    p.tw_off.push_back(int64_t(p.tw.size()));
    for (int64_t k = 0; k < ns; ++k)
      for (int64_t r = 1; r < R; ++r) {
        const double a = two_pi * double(r * k) / double(ns * R);
        p.tw.push_back(float(std::cos(a)));
        p.tw.push_back(float(std::sin(a)));
      }
    p.roots_off.push_back(int64_t(p.roots.size()));
    if (R % 2 == 1 && R > 7) {  // only the generic odd radix reads it (3, 5 and 7 are compile-time stages)
      const int64_t h = (R - 1) / 2;
      for (int64_t r = 1; r <= h; ++r)
        for (int64_t q = 1; q <= h; ++q) {
          const double a = two_pi * double((r * q) % R) / double(R);
          p.roots.push_back(float(std::cos(a)));
          p.roots.push_back(float(std::sin(a)));
        }
    }
    ns *= R;
  }
  p.tw.push_back(0.0f);  // never empty: data() is always a valid pointer
  p.roots.push_back(0.0f);
  for (int64_t e = 0; e < n; ++e) p.scale.push_back(float(double(g[e]) / double(n)));
  return p;
}

using PlaneFn = void (*)(const float*, float*, int64_t, int64_t, const FftPlan&, const FftPlan&, float* const*);
using LanesFn = int64_t (*)();

}  // namespace zsqfast::cpu

#define ZSQ_BODY "fft_filter_body.inc"
#include "isa_regions.inc"

namespace zsqfast::cpu {

bool fft_filter_supported(int64_t n) {
  std::vector<int64_t> f;
  return n >= 1 && fft_factors(n, f);
}

void fft_filter_sep(const float* x, float* out, int64_t planes, int64_t H, int64_t W, const float* gh,
                    const float* gw) {
  if (planes <= 0 || H <= 0 || W <= 0) return;
  const FftPlan ph = make_plan(H, gh), pw = make_plan(W, gw);
  const PlaneFn fn = pick<PlaneFn>(k_avx512::filter_plane, k_avx2::filter_plane, k_scalar::filter_plane);
  const int64_t L = pick<LanesFn>(k_avx512::lanes, k_avx2::lanes, k_scalar::lanes)();
  const int threads = int(std::min<int64_t>(num_threads(), planes));
#pragma omp parallel num_threads(threads) if (threads > 1)
  {
    const size_t len = size_t(std::max(H, W) * 2 * L);  // one complex vector signal, re and im interleaved
    std::vector<float> mem(2 * len + 16);
    float* buf[2] = {mem.data(), mem.data() + len};
    // dynamic chunks: a descheduled or slower vCPU does not leave the other thread waiting at the end
    const int64_t chunk = std::max<int64_t>(1, planes / (int64_t(threads) * 16));
#pragma omp for schedule(dynamic, chunk)
    for (int64_t p = 0; p < planes; ++p) fn(x + p * H * W, out + p * H * W, H, W, ph, pw, buf);
  }
}

}  // namespace zsqfast::cpu
