// Depthwise low-bit convolution over NHWC codes on AVX-512 (math: zsqfast/ops/lowbit_conv2d.py), taken by
// lowbit_conv2d for groups == C == OC (MobileNetV2's depthwise layers) with exact padding (no padding, or
// 0 <= za <= 2^ab - 1) when the AVX-512 VNNI level is active (the same level as the implicit GEMM, whose
// NHWC code buffer it shares: lowbit_conv.h).
//   y[b, oh, ow, c] = fp32(sum_t (X[corner + t, c] - za) (uw[c, t] - zw[c])) * fp32(sa sw[c]) + bias[c]
// with 16 channels a vector: int32 products of the centred codes (exact: |sum| <= taps 255 255 < 2^31), the
// padded ring holding za (centred 0). y is written NHWC.
#include <immintrin.h>

#include <algorithm>
#include <cstring>
#include <vector>

#include "lowbit_conv.h"
#include "lowbit_impl.h"

#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx512vnni,avx2,fma,f16c")
namespace zsqfast::cpu::lowbit {
namespace {

#include "vnni_ops.inc"

}  // namespace

bool depthwise_nhwc_applies(const ImplicitConv& c, int64_t groups) {
  if (active_isa() != Isa::Avx512Vnni || groups != c.C || c.OC != c.C || c.kh * c.kw > 64) return false;
  const int64_t qa = (int64_t(1) << c.a_bits) - 1;
  if ((c.ph || c.pw) && (c.za < 0 || c.za > qa)) return false;  // padding must be the code za
  return int32_exact(c.kh * c.kw, c.a_bits, &c.za, 1, c.w_bits, c.w_zero, c.OC);  // exact int32 tap sums
}

bool depthwise_nhwc(const ImplicitConv& c) {
  const Geo G(c);
  CodeBuffer buf(c, G, false);
  if (!codes_nhwc(c, G, buf.X, nullptr)) return false;
  const int64_t T = c.kh * c.kw, Cs = G.Cs, P = c.Ho * c.Wo, M = c.B * P;
  // per call: centred weights wt[t][c] (0 in the pad channels), pixel offsets of the taps, fp32(sa sw)
  std::vector<int32_t> wt(size_t(T * Cs), 0);
  std::vector<float> sc(size_t(Cs), 0.0f), bias(size_t(Cs), 0.0f);
  int64_t poff[64];
  for (int64_t i = 0; i < c.kh; ++i)
    for (int64_t j = 0; j < c.kw; ++j) poff[i * c.kw + j] = i * c.dh * G.Wp + j * c.dw;
  for (int64_t ch = 0; ch < c.C; ++ch) {
    for (int64_t t = 0; t < T; ++t) wt[size_t(t * Cs + ch)] = wcode(c, ch, t) - c.w_zero[ch];
    sc[size_t(ch)] = c.sa * c.w_scale[ch];
    if (c.bias) bias[size_t(ch)] = c.bias[ch];
  }
  const uint8_t* X = buf.X;
  const int threads = threads_for(std::max<int64_t>(1, M * c.C * T / 65536));
#pragma omp parallel for schedule(static) num_threads(threads) if (threads > 1)
  for (int64_t m = 0; m < M; ++m) {
    const int64_t b = m / P, oh = m % P / c.Wo, ow = m % c.Wo;
    const uint8_t* corner = X + G.pix(b, oh * c.sh, ow * c.sw) * Cs;
    float* yr = c.y + m * c.OC;
    const __m512i za = _mm512_set1_epi32(c.za);
    for (int64_t c0 = 0; c0 < c.C; c0 += 16) {
      __m512i acc = _mm512_setzero_si512();
      for (int64_t t = 0; t < T; ++t) {
        const __m128i codes = _mm_loadu_si128(reinterpret_cast<const __m128i*>(corner + poff[t] * Cs + c0));
        const __m512i v = _mm512_sub_epi32(_mm512_cvtepu8_epi32(codes), za);
        acc = _mm512_add_epi32(acc, _mm512_mullo_epi32(v, _mm512_loadu_si512(wt.data() + t * Cs + c0)));
      }
      __m512 y = _mm512_mul_ps(_mm512_cvtepi32_ps(acc), _mm512_loadu_ps(sc.data() + c0));
      if (c.bias) y = _mm512_add_ps(y, _mm512_loadu_ps(bias.data() + c0));
      _mm512_mask_storeu_ps(yr + c0, lanes(c.C - c0), y);
    }
  }
  return true;
}

}  // namespace zsqfast::cpu::lowbit
#pragma GCC pop_options
