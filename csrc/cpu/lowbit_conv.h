// The implicit-GEMM NHWC convolution of lowbit_conv_vnni.cpp (math: zsqfast/ops/lowbit_conv2d.py).
#pragma once
#include <cstdint>

namespace zsqfast::cpu::lowbit {

// One call: x fp32 (B, C, H, W) in NCHW (x_nhwc false) or NHWC memory order; weights (OC, K = C kh kw) packed
// (zsqfast/ops/lowbit_pack.py); per-tensor activation grid (sa, inv = 1 / sa, za); y fp32 written NHWC
// (B, Ho, Wo, OC) contiguous.
struct ImplicitConv {
  const float* x;
  bool x_nhwc;
  int64_t B, C, H, W, OC, K, Ho, Wo;
  int64_t kh, kw, sh, sw, ph, pw, dh, dw;
  const uint8_t* w;
  int w_bits, a_bits;
  const float *w_scale, *bias;
  const int32_t *w_zero, *w_colsum;
  float sa, inv;
  int32_t za;
  float* y;
};

// Whether implicit_conv computes this call exactly: AVX-512 VNNI active, groups == 1, at most 64 taps, zero
// padding that is the code za (0 <= za <= 2^ab - 1, or no padding), and |sum (ua - za)(uw - zw)| < 2^31.
bool implicit_conv_applies(const ImplicitConv& c, int64_t groups);

// y for c (implicit_conv_applies must hold). Returns false (y unwritten) when x holds a NaN.
bool implicit_conv(const ImplicitConv& c);

}  // namespace zsqfast::cpu::lowbit
