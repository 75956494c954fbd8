// The implicit-GEMM NHWC convolution of lowbit_conv_vnni.cpp (math: zsqfast/ops/lowbit_conv2d.py).
#pragma once
#include <cstdint>

#include "lowbit.h"

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

// Weight code (n, k) of the call's packed weights (zsqfast/ops/lowbit_pack.py).
inline int32_t wcode(const ImplicitConv& c, int64_t n, int64_t k) {
  return packed_code(c.w + n * row_bytes(c.w_bits, padded_k(c.K)), c.w_bits, k);
}

// The padded NHWC code buffer: image b, padded row hp, padded column wp at X[((b Hp + hp) Wp + wp) Cs],
// Hp = H + 2 ph, Wp = W + 2 pw, Cs = C rounded up to 16 (pad channels hold 0); the ring holds the pad code
// za (and S = C za).
struct Geo {
  int64_t Cs, Hp, Wp;
  explicit Geo(const ImplicitConv& c) : Cs((c.C + 15) / 16 * 16), Hp(c.H + 2 * c.ph), Wp(c.W + 2 * c.pw) {}
  int64_t pix(int64_t b, int64_t h, int64_t w) const { return (b * Hp + h) * Wp + w; }  // padded coordinates
};

// The calling thread's code buffer (X: B Hp Wp Cs bytes; S: B Hp Wp pixel code sums when `sums`, else null),
// kept between calls unless it grew over 64 MiB.
struct CodeBuffer {
  uint8_t* X;
  int32_t* S;
  CodeBuffer(const ImplicitConv& c, const Geo& G, bool sums);
  ~CodeBuffer();
};

// X (and S when not null) for c: clamp(rne(x * inv) + za, 0, 2^ab - 1) per element (images in parallel), the
// pad ring filled. Returns false when x holds a NaN.
bool codes_nhwc(const ImplicitConv& c, const Geo& G, uint8_t* X, int32_t* S);

// Whether implicit_conv computes this call exactly: AVX-512 VNNI active, groups == 1, at most 64 taps, zero
// padding that is the code za (0 <= za <= 2^ab - 1, or no padding), and |sum (ua - za)(uw - zw)| < 2^31.
bool implicit_conv_applies(const ImplicitConv& c, int64_t groups);

// y for c (implicit_conv_applies must hold). Returns false (y unwritten) when x holds a NaN.
bool implicit_conv(const ImplicitConv& c);

// The depthwise convolution over the same NHWC codes (lowbit_dw_vnni.cpp): groups == C == OC, at most 64
// taps, padding that is the code za (or none), AVX-512 VNNI active. y written NHWC; false on a NaN.
bool depthwise_nhwc_applies(const ImplicitConv& c, int64_t groups);
bool depthwise_nhwc(const ImplicitConv& c);

}  // namespace zsqfast::cpu::lowbit
