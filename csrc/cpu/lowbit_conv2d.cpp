// CPU low-bit integer convolution (math: zsqfast/ops/lowbit_conv2d.py).
//   depthwise (C/groups == 1, e.g. MobileNetV2): direct int32 (int64 when the bound needs it) convolution of
//       the centred codes (ua - za) with (uw - zw) over a zero-padded plane (exact padding), fused epilogue.
//   otherwise: activations quantized once to u8 codes, im2col of the CODES per image and group into the GEMM
//       engine of lowbit_gemm.cpp, whose fused epilogue stores the (pixels, OC/groups) tiles transposed (NCHW).
//       Padded taps hold the code za when 0 <= za <= 2^ab - 1 (exact); otherwise they hold clamp(za) and each
//       border pixel is corrected by (clamp(za) - za) * sum_{padded taps} (uw - zw) before the epilogue.
#include <immintrin.h>

#include <algorithm>
#include <cstring>
#include <type_traits>
#include <vector>

#include "../kernels.h"
#include "isa.h"
#include "lowbit.h"
#include "lowbit_conv.h"
#include "vec_scalar.h"

namespace zsqfast::cpu {
template <class T>
using DwFn = void (*)(const T*, int64_t, const T*, int64_t, int64_t, int64_t, int64_t, int64_t, int64_t, int64_t,
                      int64_t, T*);
}  // namespace zsqfast::cpu

#define ZSQ_BODY "lowbit_dw_body.inc"
#include "isa_regions.inc"

namespace zsqfast::cpu {
namespace {

struct Conv : lowbit::ImplicitConv {  // the call (x NCHW on these paths) and its group geometry
  int64_t groups, Cg, OCg;
};

Conv make_conv(const float* x, bool x_nhwc, int64_t B, int64_t C, int64_t H, int64_t W, const uint8_t* w, int w_bits,
               int64_t OC, const float* w_scale, const int32_t* w_zero, const int32_t* w_colsum, float a_scale,
               float a_inv_scale, int32_t a_zero, int a_bits, const float* bias, const int64_t* geom, int64_t groups,
               float* y) {
  Conv c{{x, x_nhwc, B, C, H, W, OC, C / groups * geom[0] * geom[1], 0, 0, geom[0], geom[1], geom[2], geom[3],
          geom[4], geom[5], geom[6], geom[7], w, w_bits, a_bits, w_scale, bias, w_zero, w_colsum, a_scale,
          a_inv_scale, a_zero, y},
         groups, C / groups, OC / groups};
  c.Ho = (H + 2 * c.ph - c.dh * (c.kh - 1) - 1) / c.sh + 1;
  c.Wo = (W + 2 * c.pw - c.dw * (c.kw - 1) - 1) / c.sw + 1;
  return c;
}

int64_t row_bytes_k(int bits, int64_t K) { return lowbit::row_bytes(bits, lowbit::padded_k(K)); }  // unpadded K

using lowbit::wcode;  // weight code (n, k) of the packed layout

template <class T>  // int32_t, int64_t or __int128 (exact integers; float(v) rounds to nearest even)
float epilogue(const Conv& c, int64_t n, T v) {
  const float y = float(v) * (c.sa * c.w_scale[n]);
  return c.bias ? y + c.bias[n] : y;
}

// max |code - za| times max |uw - zw| times taps: the bound of |c|
long double bound(const Conv& c) {
  const int64_t qa = (int64_t(1) << c.a_bits) - 1, qw = (int64_t(1) << c.w_bits) - 1;
  int64_t dw = 0;
  for (int64_t n = 0; n < c.OC; ++n) dw = std::max<int64_t>({dw, std::llabs(c.w_zero[n]), std::llabs(qw - c.w_zero[n])});
  return (long double)(c.K) * std::max(std::llabs(c.za), std::llabs(qa - c.za)) * dw;
}

template <class T>
void depthwise(const Conv& c, const lowbit::Acts& codes) {
  DwFn<T> fn;
  if constexpr (std::is_same_v<T, int32_t>) fn = pick(k_avx512::dw_fn32(), k_avx2::dw_fn32(), k_scalar::dw_fn32());
  else fn = pick(k_avx512::dw_fn64(), k_avx2::dw_fn64(), k_scalar::dw_fn64());
  const int64_t Hp = c.H + 2 * c.ph, Wp = c.W + 2 * c.pw, P = c.Ho * c.Wo, tasks = c.B * c.OC;
  const int threads = lowbit::threads_for(tasks);
#pragma omp parallel num_threads(threads) if (threads > 1)
  {
    std::vector<T> xc(size_t(Hp * Wp), T(0)), out(static_cast<size_t>(P)), wc(size_t(c.K));
#pragma omp for schedule(static)
    for (int64_t t = 0; t < tasks; ++t) {
      const int64_t b = t / c.OC, oc = t % c.OC, ci = oc / c.OCg;
      const uint8_t* plane = codes.codes.data() + (b * c.C + ci) * codes.lda;
      for (int64_t ih = 0; ih < c.H; ++ih)
        for (int64_t iw = 0; iw < c.W; ++iw) xc[size_t((ih + c.ph) * Wp + iw + c.pw)] = T(plane[ih * c.W + iw]) - T(c.za);
      for (int64_t k = 0; k < c.K; ++k) wc[size_t(k)] = T(wcode(c, oc, k)) - T(c.w_zero[oc]);
      fn(xc.data(), Wp, wc.data(), c.kh, c.kw, c.sh, c.sw, c.dh, c.dw, c.Ho, c.Wo, out.data());
      float* yo = c.y + t * P;
      for (int64_t p = 0; p < P; ++p) yo[p] = epilogue(c, oc, out[size_t(p)]);
    }
  }
}

// im2col of the codes of one image's group channels `planes` (row stride lda) in K-major form:
// A.codes[k * ldk + p] = code of tap k = (ci, i, j) of output pixel p (`pad` outside the image); row sums.
void im2col(const Conv& c, const uint8_t* planes, int64_t lda, uint8_t pad, lowbit::Acts& A) {
  const int64_t P = c.Ho * c.Wo, ld = A.ldk;
  const int threads = lowbit::threads_for(std::max<int64_t>(1, P * c.K / 65536));
  // a 1x1 convolution with stride 1 and no padding: each K-row is a whole plane (one copy)
  const bool plain = c.kh == 1 && c.kw == 1 && c.sh == 1 && c.sw == 1 && c.ph == 0 && c.pw == 0;
#pragma omp parallel for schedule(static) num_threads(threads) if (threads > 1)
  for (int64_t k = 0; k < c.K; ++k) {
    const int64_t ci = k / (c.kh * c.kw), i = (k / c.kw) % c.kh, j = k % c.kw;
    uint8_t* dst = A.codes.data() + k * ld;
    if (plain) {
      std::memcpy(dst, planes + k * lda, size_t(P));
      continue;
    }
    // output columns whose tap lies inside the row: iw = ow sw - pw + j dw in [0, W)
    const int64_t off = j * c.dw - c.pw;
    const int64_t lo = std::clamp<int64_t>(off >= 0 ? 0 : (-off + c.sw - 1) / c.sw, 0, c.Wo);
    const int64_t hi = std::clamp<int64_t>(c.W - off > 0 ? (c.W - off + c.sw - 1) / c.sw : 0, lo, c.Wo);
    for (int64_t oh = 0; oh < c.Ho; ++oh) {
      uint8_t* d = dst + oh * c.Wo;
      const int64_t ih = oh * c.sh - c.ph + i * c.dh;
      if (ih < 0 || ih >= c.H) {
        std::memset(d, pad, size_t(c.Wo));
        continue;
      }
      const uint8_t* src = planes + ci * lda + ih * c.W + off;
      std::memset(d, pad, size_t(lo));
      if (c.sw == 1) std::memcpy(d + lo, src + lo, size_t(hi - lo));
      else for (int64_t ow = lo; ow < hi; ++ow) d[ow] = src[ow * c.sw];
      std::memset(d + hi, pad, size_t(c.Wo - hi));
    }
  }
  const int64_t nb = (P + 255) / 256;
#pragma omp parallel for schedule(static) num_threads(threads) if (threads > 1)
  for (int64_t b = 0; b < nb; ++b) {
    const int64_t p0 = b * 256, p1 = std::min(P, p0 + 256);
    int32_t* s = A.rowsum.data() + p0;
    for (int64_t p = 0; p < p1 - p0; ++p) s[p] = 0;
    for (int64_t k = 0; k < c.K; ++k) {
      const uint8_t* r = A.codes.data() + k * ld + p0;
      for (int64_t p = 0; p < p1 - p0; ++p) s[p] += r[p];
    }
  }
}

// The exact epilogue with the border correction of pad codes != za (rare: za outside the code range).
void corrected_epilogue(const Conv& c, int64_t g, const lowbit::Acts& A, const int32_t* acc, uint8_t pad, float* yb) {
  const int64_t P = c.Ho * c.Wo;
  const int threads = lowbit::threads_for(P);
#pragma omp parallel for schedule(static) num_threads(threads) if (threads > 1)
  for (int64_t p = 0; p < P; ++p) {
    const int64_t oh = p / c.Wo, ow = p % c.Wo;
    std::vector<int64_t> taps;  // padded tap indices k of this pixel
    for (int64_t ci = 0; ci < c.Cg; ++ci)
      for (int64_t i = 0; i < c.kh; ++i)
        for (int64_t j = 0; j < c.kw; ++j) {
          const int64_t ih = oh * c.sh - c.ph + i * c.dh, iw = ow * c.sw - c.pw + j * c.dw;
          if (ih < 0 || ih >= c.H || iw < 0 || iw >= c.W) taps.push_back((ci * c.kh + i) * c.kw + j);
        }
    for (int64_t n = 0; n < c.OCg; ++n) {
      const int64_t oc = g * c.OCg + n;
      const __int128 zw = c.w_zero[oc], za = c.za;
      __int128 v = __int128(acc[p * c.OCg + n]) - zw * A.rowsum[size_t(p)] + za * (zw * c.K - c.w_colsum[oc]);
      __int128 s = 0;
      for (int64_t k : taps) s += __int128(wcode(c, oc, k)) - zw;
      v -= (__int128(pad) - za) * s;
      yb[oc * P + p] = epilogue(c, oc, v);
    }
  }
}

// One (image, group): im2col, then the GEMM with its fused epilogue writing y (NCHW) directly.
struct ConvScratch {
  lowbit::Acts A;
  std::vector<int32_t> acc;  // raw accumulators (border-corrected path only)
};

void gemm_conv_one(const Conv& c, const lowbit::Acts& codes, int64_t b, int64_t g, uint8_t pad, bool exact_pad,
                   ConvScratch& s) {
  const int64_t P = c.Ho * c.Wo, n0 = g * c.OCg;
  im2col(c, codes.codes.data() + (b * c.C + g * c.Cg) * codes.lda, codes.lda, pad, s.A);
  lowbit::Gemm gm{c.w + n0 * row_bytes_k(c.w_bits, c.K), c.w_bits, c.a_bits, c.OCg, c.K};
  float* yb = c.y + b * c.OC * P;
  if (!exact_pad) {
    gm.acc = s.acc.data();
    lowbit::run(gm, s.A);
    return corrected_epilogue(c, g, s.A, s.acc.data(), pad, yb);
  }
  gm.y = yb + n0 * P;  // fused epilogue stored straight into NCHW
  gm.ldy = P;
  gm.y_trans = true;
  gm.sw = c.w_scale + n0;
  gm.zw = c.w_zero + n0;
  gm.cw = c.w_colsum + n0;
  gm.bias = c.bias ? c.bias + n0 : nullptr;
  gm.sa = &c.sa;
  gm.za = &c.za;
  lowbit::run(gm, s.A);
}

// Images (x groups) in parallel when there are at least as many as threads (each one's GEMM then runs
// serially: one parallel region a call instead of several an image); otherwise one at a time on ONE thread:
// splitting one image's GEMM over the threads measured 2-4x slower than a single thread (64->64 3x3 at
// 56x56, batch 1: 8.7 vs 2.3 ms on 2 threads vs 1).
void gemm_conv(const Conv& c, const lowbit::Acts& codes) {
  const int64_t P = c.Ho * c.Wo, qa = (int64_t(1) << c.a_bits) - 1, jobs = c.B * c.groups;
  const uint8_t pad = uint8_t(std::clamp<int64_t>(c.za, 0, qa));
  const bool exact_pad = pad == c.za || (c.ph == 0 && c.pw == 0);
  const int threads = lowbit::threads_for(jobs);
  const bool outer = threads > 1 && jobs >= threads;
  const lowbit::ThreadLimit limit(outer ? threads : 1);
#pragma omp parallel num_threads(threads) if (outer)
  {
    ConvScratch s;
    s.A.resize_kmajor(P, c.K);
    s.acc.resize(exact_pad ? 0 : size_t(P * c.OCg));
#pragma omp for schedule(static)
    for (int64_t j = 0; j < jobs; ++j) gemm_conv_one(c, codes, j / c.groups, j % c.groups, pad, exact_pad, s);
  }
}

}  // namespace

bool lowbit_conv2d(const float* x, int64_t B, int64_t C, int64_t H, int64_t W, const uint8_t* w, int w_bits,
                   int64_t OC, const float* w_scale, const int32_t* w_zero, const int32_t* w_colsum, float a_scale,
                   float a_inv_scale, int32_t a_zero, int a_bits, const float* bias, const int64_t* geom,
                   int64_t groups, float* y) {
  const Conv c = make_conv(x, false, B, C, H, W, w, w_bits, OC, w_scale, w_zero, w_colsum, a_scale, a_inv_scale,
                           a_zero, a_bits, bias, geom, groups, y);
  if (B <= 0 || OC <= 0 || c.Ho <= 0 || c.Wo <= 0) return true;
  const lowbit::ThreadLimit limit(lowbit::threads_for_macs(double(B) * double(c.Ho * c.Wo) * double(c.K) * double(OC)));
  lowbit::Acts codes;  // one row of codes per (image, channel) plane
  if (!lowbit::quantize_rows(x, H * W, B * C, H * W, &a_inv_scale, &a_zero, false, a_bits, codes)) return false;
  const long double bd = bound(c);
  if (c.Cg == 1 && bd < 2147483648.0L) depthwise<int32_t>(c, codes);
  else if (c.Cg == 1 && bd < 4611686018427387904.0L) depthwise<int64_t>(c, codes);
  else gemm_conv(c, codes);
  return true;
}

int lowbit_conv2d_nhwc(const float* x, bool x_nhwc, int64_t B, int64_t C, int64_t H, int64_t W, const uint8_t* w,
                       int w_bits, int64_t OC, const float* w_scale, const int32_t* w_zero, const int32_t* w_colsum,
                       float a_scale, float a_inv_scale, int32_t a_zero, int a_bits, const float* bias,
                       const int64_t* geom, int64_t groups, float* y) {
  const Conv c = make_conv(x, x_nhwc, B, C, H, W, w, w_bits, OC, w_scale, w_zero, w_colsum, a_scale, a_inv_scale,
                           a_zero, a_bits, bias, geom, groups, y);
  const bool dw = lowbit::depthwise_nhwc_applies(c, groups);
  if (!dw && !lowbit::implicit_conv_applies(c, groups)) return 0;
  if (B <= 0 || OC <= 0 || c.Ho <= 0 || c.Wo <= 0) return 1;
  const lowbit::ThreadLimit limit(lowbit::threads_for_macs(double(B) * double(c.Ho * c.Wo) * double(c.K) * double(OC)));
  return (dw ? lowbit::depthwise_nhwc(c) : lowbit::implicit_conv(c)) ? 1 : -1;
}

}  // namespace zsqfast::cpu
