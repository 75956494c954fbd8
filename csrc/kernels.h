// Raw-pointer kernel entry points shared by csrc/registration.cpp (the one unit that sees torch headers),
// the CPU kernels (csrc/cpu/*.cpp) and the CUDA kernels (csrc/cuda/*.cu). No torch headers here, so kernel
// files compile in seconds.
//
// Every kernel walks `n` elements of a dense tensor in MEMORY order. The element at memory offset o uses
// channel c = (o / inner) % C (per tensor: inner = 1, C = 1). Arithmetic is fp32 whatever the storage dtype;
// rounding is half-to-even; clamps propagate NaN (see zsqfast/ops/fake_quantize.py and lsq.py for the math).
#pragma once
#include <cstdint>

namespace zsqfast {

enum class DType : int { F32 = 0, F16 = 1, BF16 = 2 };

namespace cpu {
// out[o] = (clamp(rne(x[o] * inv_scale[c]) + zp[c], qmin, qmax) - zp[c]) * scale[c]
// mask (nullable, ceil(n/8) bytes): bit o&7 of byte o>>3 = qmin <= rne(x*inv)+zp <= qmax; padding bits 0.
void fake_quant_fwd(DType dt, const void* x, void* out, uint8_t* mask, int64_t n, const float* scale,
                    const float* inv_scale, const float* zero_point, int64_t inner, int64_t C, float qmin,
                    float qmax);
// out[o] = bit(mask, o) ? grad[o] : 0
void fake_quant_bwd(DType dt, const void* grad, const uint8_t* mask, void* out, int64_t n);
// out[o] = clamp(rne(x[o] * inv_step[c]), qmin, qmax) * step[c]
void lsq_fwd(DType dt, const void* x, void* out, int64_t n, const float* step, const float* inv_step,
             int64_t inner, int64_t C, float qmin, float qmax);
// v = x * inv_step[c]; grad_x = (v < qmin || v > qmax) ? 0 : grad   (NaN v passes grad);
// grad_step[c] = grad_scale * sum_{o in c} grad[o] * (v < qmin ? qmin : v > qmax ? qmax : rne(v) - v)
// grad_step (C floats) is overwritten. Sums are deterministic (fixed chunking, independent of threads).
void lsq_bwd(DType dt, const void* grad, const void* x, void* grad_x, float* grad_step, int64_t n,
             const float* step, const float* inv_step, int64_t inner, int64_t C, float qmin, float qmax,
             float grad_scale);
// Per-channel mean and biased variance of a BatchNorm input (channel c = (o / inner) % C), accumulated in
// double: mean[c], var[c] (C floats each, overwritten). Deterministic like lsq_bwd.
void bn_stats(DType dt, const void* x, int64_t n, int64_t inner, int64_t C, float* mean, float* var);
// out[o] = (grad ? grad[o] : 0) + a[c] + b[c] * x[o]    (fp32 math: (a + b * x) + grad)
void bn_stats_bwd(DType dt, const void* grad, const void* x, void* out, int64_t n, const float* a, const float* b,
                  int64_t inner, int64_t C);
// Separable circular convolution of each (H, W) plane of contiguous fp32 x (planes, H, W) into out:
// out[i, j] = sum_{a<=2rh} sum_{b<=2rw} wh[a] ww[b] x[(i + a - rh) mod H, (j + b - rw) mod W].
// The taps must be symmetric (wh[a] = wh[2rh - a], ww[b] = ww[2rw - b]); fp32 arithmetic with FMA.
void circular_conv_sep(const float* x, float* out, int64_t planes, int64_t H, int64_t W, const float* wh,
                       int64_t rh, const float* ww, int64_t rw);
// Separable real-mask FFT filter of each (H, W) plane of contiguous fp32 x (planes, H, W) into out:
// out = ifft2(fft2(x) * gh[u] gw[v]).real, gh (H,) and gw (W,) real masks in FFT bin order that are symmetric
// (g[k] = g[(n - k) % n]). fp32 arithmetic, twiddles rounded from double. Every length whose prime factors are
// all <= 64 is supported (fft_filter_supported).
bool fft_filter_supported(int64_t n);
void fft_filter_sep(const float* x, float* out, int64_t planes, int64_t H, int64_t W, const float* gh,
                    const float* gw);
// Gaussian KDE of each row of contiguous fp32 v (B, M) at its K grid points t (B, K) (PSAQ-ViT, see
// zsqfast/ops/kde_density.py): p[b, k] = sum_j exp(-0.5 ((t_k - v_j) / bw)^2) / (M bw sqrt(2 pi)); the backward
// gv[b, j] = sum_k gp[b, k] z exp(-0.5 z^2) / (M bw^2 sqrt(2 pi)), z = (t_k - v_j) / bw. Deterministic.
void kde_density(const float* v, const float* t, float* p, int64_t B, int64_t M, int64_t K, float bandwidth);
void kde_density_bwd(const float* gp, const float* v, const float* t, float* gv, int64_t B, int64_t M, int64_t K,
                     float bandwidth);
// SynQ CAM-alignment loss (zsqfast/ops/cam_mse.py), contiguous fp32: a (B, K, h, w), alpha (B, K), target
// (B, H, W); iy, wy (H, 2) and ix, wx (W, 2) the bilinear (align_corners=False) source indices and weights.
// Forward writes s (B, h, w) = sum_k alpha_k a_k and returns mean((normalised upsampled ReLU(s) - target)^2);
// backward writes da (B, K, h, w) = dLoss/da for the upstream gradient `grad`.
float cam_mse_fwd(const float* a, const float* alpha, const float* target, float* s, int64_t B, int64_t K, int64_t h,
                  int64_t w, int64_t H, int64_t W, const int64_t* iy, const float* wy, const int64_t* ix,
                  const float* wx);
void cam_mse_bwd(float grad, const float* s, const float* alpha, const float* target, float* da, int64_t B, int64_t K,
                 int64_t h, int64_t w, int64_t H, int64_t W, const int64_t* iy, const float* wy, const int64_t* ix,
                 const float* wx);
// Low-bit integer GEMM (zsqfast/ops/lowbit_gemm.py; weights packed as in zsqfast/ops/lowbit_pack.py, N rows):
// acc (M, N) int32 = a (M, K) uint8 codes x uw^T. Exact for K (2^8 - 1)(2^w_bits - 1) < 2^31.
void lowbit_gemm(const uint8_t* a, const uint8_t* w, int w_bits, int64_t M, int64_t N, int64_t K, int32_t* acc);
// y (M, N) fp32 = fp32(sum_k (ua - za)(uw - zw)) * fp32(sa * sw) + bias, ua the codes of x (M, K) fp32:
// clamp(rne(x * a_inv_scale) + a_zero, 0, 2^a_bits - 1). a_*: 1 value (per tensor) or M (per_token); w_*
// and bias (nullable): N values; w_colsum = sum_k uw. Returns false (y unwritten) when x holds a NaN.
bool lowbit_linear(const float* x, const uint8_t* w, int w_bits, int64_t M, int64_t N, int64_t K,
                   const float* w_scale, const int32_t* w_zero, const int32_t* w_colsum, const float* a_scale,
                   const float* a_inv_scale, const int32_t* a_zero, bool per_token, int a_bits, const float* bias,
                   float* y);
// y (B, OC, Ho, Wo) fp32 = the integer convolution of zsqfast/ops/lowbit_conv2d.py of x (B, C, H, W) fp32
// (activations per tensor), weights (OC, C/groups * kh * kw) packed; geom = {kh, kw, sh, sw, ph, pw, dh, dw}.
// Returns false (y unwritten) when x holds a NaN.
bool lowbit_conv2d(const float* x, int64_t B, int64_t C, int64_t H, int64_t W, const uint8_t* w, int w_bits,
                   int64_t OC, const float* w_scale, const int32_t* w_zero, const int32_t* w_colsum, float a_scale,
                   float a_inv_scale, int32_t a_zero, int a_bits, const float* bias, const int64_t* geom,
                   int64_t groups, float* y);
// The same convolution with y written NHWC ((B, Ho, Wo, OC) contiguous) and x NCHW or, when x_nhwc, NHWC, by
// the NHWC paths (csrc/cpu/lowbit_conv_vnni.cpp: implicit GEMM, groups == 1; lowbit_dw_vnni.cpp: depthwise)
// where they apply: returns 0 (nothing written) when they do not (then call lowbit_conv2d), 1 when y is
// written, -1 when x holds a NaN.
int lowbit_conv2d_nhwc(const float* x, bool x_nhwc, int64_t B, int64_t C, int64_t H, int64_t W, const uint8_t* w,
                       int w_bits, int64_t OC, const float* w_scale, const int32_t* w_zero, const int32_t* w_colsum,
                       float a_scale, float a_inv_scale, int32_t a_zero, int a_bits, const float* bias,
                       const int64_t* geom, int64_t groups, float* y);
// "avx512_vnni", "avx512", "avx2" or "scalar": what the kernels dispatch to now (the best this CPU has,
// unless force_isa chose a lower one).
const char* isa_name();
// Force the dispatch level ("auto" restores the detected one). Returns false, changing nothing, when the
// name is unknown or this CPU lacks it. For tests that must cover every code path on one machine.
bool force_isa(const char* name);
// Threads the CPU kernels may use (the caller passes at::get_num_threads()).
void set_num_threads(int n);
}  // namespace cpu

namespace cuda {
// Same contracts as zsqfast::cpu, launched asynchronously on `stream` (a cudaStream_t); device pointers.
// grad_step must hold C floats and is overwritten (no host synchronisation).
void fake_quant_fwd(DType dt, const void* x, void* out, uint8_t* mask, int64_t n, const float* scale,
                    const float* inv_scale, const float* zero_point, int64_t inner, int64_t C, float qmin,
                    float qmax, void* stream);
void fake_quant_bwd(DType dt, const void* grad, const uint8_t* mask, void* out, int64_t n, void* stream);
void lsq_fwd(DType dt, const void* x, void* out, int64_t n, const float* step, const float* inv_step,
             int64_t inner, int64_t C, float qmin, float qmax, void* stream);
void lsq_bwd(DType dt, const void* grad, const void* x, void* grad_x, float* grad_step, int64_t n,
             const float* step, const float* inv_step, int64_t inner, int64_t C, float qmin, float qmax,
             float grad_scale, void* stream);
// Low-bit integer GEMM (zsqfast/ops/lowbit_gemm.py; layout zsqfast/ops/lowbit_pack.py), tensor cores.
// acc (M, N) int32 = sum_k a[m, k] * uw[n, k]; a: uint8 codes (M, K_pad), K_pad = 128 * ceil(K / 128), zero
// past K; w_packed: (N, K_pad / 2) nibbles (w_bits <= 4) or (N, K_pad) bytes. a, w_packed 16-byte aligned.
void lowbit_gemm(const uint8_t* a, const uint8_t* w_packed, int32_t* acc, int64_t M, int64_t N, int64_t K, int w_bits,
                 void* stream);
// Whether lowbit_linear takes the int4 tensor-core path on the current device (sm_8x and both widths <= 4).
bool lowbit_int4_path(int a_bits, int w_bits);
// Bytes of one group of one row of lowbit_linear's activation-code workspace (K_pad / 2 on the int4 path,
// else K_pad).
int64_t lowbit_codes_row_bytes(int64_t K, int a_bits, int w_bits);
// y (M, N) fp32 = lowbit_linear of x fp32 (M, K) contiguous; w_scale fp32, w_zero, w_colsum int32 (N,);
// a_scale, a_inv_scale fp32, a_zero int32: (M,) when per_token, else (1,); bias (N,) or null.
// groups > 1 (a grouped convolution's im2col): x is (M, groups K), group g = columns g K .. g K + K - 1
// times weight rows g N/groups .. into output columns g N/groups ..; K is the per-group reduction length.
// Workspace: codes (M * groups * lowbit_codes_row_bytes bytes, 16-byte aligned) and rowsum (M * groups
// int32), both overwritten.
void lowbit_linear(const float* x, const uint8_t* w_packed, float* y, int64_t M, int64_t N, int64_t K, int w_bits,
                   const float* w_scale, const int32_t* w_zero, const int32_t* w_colsum, const float* a_scale,
                   const float* a_inv_scale, const int32_t* a_zero, bool per_token, int a_bits, const float* bias,
                   int64_t groups, uint8_t* codes, int32_t* rowsum, void* stream);
}  // namespace cuda

}  // namespace zsqfast
