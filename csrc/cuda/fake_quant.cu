// CUDA fake quantization (compile-checked; never run on hardware in this project).
// Forward: one thread per element; the 1-bit STE mask of 32 consecutive elements comes from one warp
// ballot, written as 4 bytes by lanes 0..3. Backward: out = bit ? grad : 0 on raw 2- or 4-byte elements.
// Math (csrc/kernels.h): q = rint(x * inv) + zp (rint = half to even); out = (clamp(q) - zp) * s.
#include "common.cuh"

namespace zsqfast::cuda_detail {

template <class T>
__global__ void fake_quant_fwd_kernel(const T* __restrict__ x, T* __restrict__ out, uint8_t* __restrict__ mask,
                                      int64_t n, const float* __restrict__ scale, const float* __restrict__ inv,
                                      const float* __restrict__ zp, int64_t inner, int64_t C, float qmin, float qmax) {
  const int lane = threadIdx.x & 31;
  const int64_t warps = int64_t(gridDim.x) * (blockDim.x / 32);
  const int64_t n_bytes = (n + 7) / 8;
  for (int64_t base = (int64_t(blockIdx.x) * (blockDim.x / 32) + threadIdx.x / 32) * 32; base < n; base += warps * 32) {
    const int64_t i = base + lane;
    bool inside = false;
    if (i < n) {
      const int64_t c = C == 1 ? 0 : (i / inner) % C;
      const float z = zp[c];
      const float q = rintf(__fmul_rn(ld(x + i), inv[c])) + z;
      st(out + i, __fmul_rn(clamp_nan(q, qmin, qmax) - z, scale[c]));
      inside = q >= qmin && q <= qmax;
    }
    if (mask) {  // warp-uniform branch: every lane reaches the ballot
      const unsigned bits = __ballot_sync(0xffffffffu, inside);
      const int64_t byte = base / 8 + lane;
      if (lane < 4 && byte < n_bytes) mask[byte] = uint8_t(bits >> (8 * lane));
    }
  }
}

template <class R>  // R: raw element (uint32_t or uint16_t)
__global__ void fake_quant_bwd_kernel(const R* __restrict__ grad, const uint8_t* __restrict__ mask, R* __restrict__ out,
                                      int64_t n) {
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += int64_t(gridDim.x) * blockDim.x) {
    out[i] = ((mask[i >> 3] >> (i & 7)) & 1) ? grad[i] : R(0);
  }
}

}  // namespace zsqfast::cuda_detail

namespace zsqfast::cuda {
using namespace zsqfast::cuda_detail;

void fake_quant_fwd(DType dt, const void* x, void* out, uint8_t* mask, int64_t n, const float* scale,
                    const float* inv_scale, const float* zero_point, int64_t inner, int64_t C, float qmin, float qmax,
                    void* stream) {
  if (n <= 0) return;
  by_dtype(dt, [&]<class T>() {
    fake_quant_fwd_kernel<T><<<grid_for(n), kThreads, 0, static_cast<cudaStream_t>(stream)>>>(
        static_cast<const T*>(x), static_cast<T*>(out), mask, n, scale, inv_scale, zero_point, inner, C, qmin, qmax);
  });
}

void fake_quant_bwd(DType dt, const void* grad, const uint8_t* mask, void* out, int64_t n, void* stream) {
  if (n <= 0) return;
  const auto s = static_cast<cudaStream_t>(stream);
  if (dt == DType::F32) {
    fake_quant_bwd_kernel<uint32_t><<<grid_for(n), kThreads, 0, s>>>(static_cast<const uint32_t*>(grad), mask,
                                                                       static_cast<uint32_t*>(out), n);
  } else {
    fake_quant_bwd_kernel<uint16_t><<<grid_for(n), kThreads, 0, s>>>(static_cast<const uint16_t*>(grad), mask,
                                                                       static_cast<uint16_t*>(out), n);
  }
}

}  // namespace zsqfast::cuda
