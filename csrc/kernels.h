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
}  // namespace cuda

}  // namespace zsqfast
