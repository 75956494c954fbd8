// Device helpers shared by the CUDA kernels: storage-dtype loads/stores (fp32 math), NaN-propagating clamp,
// launch sizes. No torch headers.
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "../kernels.h"

namespace zsqfast::cuda_detail {

template <class T> __device__ __forceinline__ float ld(const T* p);
template <> __device__ __forceinline__ float ld<float>(const float* p) { return __ldg(p); }
template <> __device__ __forceinline__ float ld<__half>(const __half* p) { return __half2float(p[0]); }
template <> __device__ __forceinline__ float ld<__nv_bfloat16>(const __nv_bfloat16* p) { return __bfloat162float(p[0]); }

template <class T> __device__ __forceinline__ void st(T* p, float v);
template <> __device__ __forceinline__ void st<float>(float* p, float v) { *p = v; }
template <> __device__ __forceinline__ void st<__half>(__half* p, float v) { *p = __float2half_rn(v); }
template <> __device__ __forceinline__ void st<__nv_bfloat16>(__nv_bfloat16* p, float v) { *p = __float2bfloat16_rn(v); }

// clamp that keeps NaN (both comparisons are false for NaN)
__device__ __forceinline__ float clamp_nan(float v, float lo, float hi) { return v < lo ? lo : (v > hi ? hi : v); }

constexpr int kThreads = 256;

inline unsigned grid_for(int64_t work, int64_t per_block = kThreads) {
  const int64_t g = (work + per_block - 1) / per_block;
  return unsigned(g < 1 ? 1 : (g > (1 << 20) ? (1 << 20) : g));  // grid-stride loops cover the rest
}

// Calls f.template operator()<T>() with T the storage type of dt.
template <class F>
void by_dtype(zsqfast::DType dt, F&& f) {
  switch (dt) {
    case zsqfast::DType::F16: f.template operator()<__half>(); break;
    case zsqfast::DType::BF16: f.template operator()<__nv_bfloat16>(); break;
    default: f.template operator()<float>(); break;
  }
}

}  // namespace zsqfast::cuda_detail
