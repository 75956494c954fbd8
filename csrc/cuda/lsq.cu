// CUDA LSQ (compile-checked; never run on hardware in this project).
// Backward: grid (blocks per channel, C); block (j, c) walks part of channel c (memory viewed as
// (outer, C, inner)), writes grad_x, and reduces g * dstep with warp shuffles into one partial sum; a second
// kernel adds each channel's partials in a fixed order (deterministic, no float atomics, no host sync).
// The partials live in stream-ordered memory (cudaMallocAsync / cudaFreeAsync).
#include "common.cuh"

namespace zsqfast::cuda_detail {

template <class T>
__global__ void lsq_fwd_kernel(const T* __restrict__ x, T* __restrict__ out, int64_t n, const float* __restrict__ step,
                               const float* __restrict__ inv, int64_t inner, int64_t C, float qmin, float qmax) {
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += int64_t(gridDim.x) * blockDim.x) {
    const int64_t c = C == 1 ? 0 : (i / inner) % C;
    st(out + i, __fmul_rn(clamp_nan(rintf(__fmul_rn(ld(x + i), inv[c])), qmin, qmax), step[c]));
  }
}

template <class T>
__global__ void lsq_bwd_kernel(const T* __restrict__ grad, const T* __restrict__ x, T* __restrict__ grad_x,
                               float* __restrict__ partial, const float* __restrict__ inv, int64_t per_channel,
                               int64_t per_block, int64_t inner, int64_t C, float qmin, float qmax) {
  const int64_t c = blockIdx.y;
  const float iv = inv[c];
  const int64_t start = int64_t(blockIdx.x) * per_block;
  const int64_t stop = start + per_block < per_channel ? start + per_block : per_channel;
  float acc = 0.0f;
  for (int64_t k = start + threadIdx.x; k < stop; k += blockDim.x) {
    const int64_t o = (k / inner) * (C * inner) + c * inner + k % inner;
    const float g = ld(grad + o);
    const float v = __fmul_rn(ld(x + o), iv);
    const bool below = v < qmin, above = v > qmax;
    st(grad_x + o, (below || above) ? 0.0f : g);
    acc += __fmul_rn(g, below ? qmin : (above ? qmax : rintf(v) - v));
  }
  for (int off = 16; off > 0; off >>= 1) acc += __shfl_down_sync(0xffffffffu, acc, off);
  __shared__ float warp_sums[kThreads / 32];
  if ((threadIdx.x & 31) == 0) warp_sums[threadIdx.x / 32] = acc;
  __syncthreads();
  if (threadIdx.x == 0) {
    float total = 0.0f;
    for (int w = 0; w < int(blockDim.x / 32); ++w) total += warp_sums[w];
    partial[c * gridDim.x + blockIdx.x] = total;
  }
}

__global__ void lsq_sum_partials(const float* __restrict__ partial, float* __restrict__ grad_step, int64_t C,
                                 int64_t blocks, float grad_scale) {
  for (int64_t c = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; c < C; c += int64_t(gridDim.x) * blockDim.x) {
    float total = 0.0f;
    for (int64_t j = 0; j < blocks; ++j) total += partial[c * blocks + j];
    grad_step[c] = total * grad_scale;
  }
}

}  // namespace zsqfast::cuda_detail

namespace zsqfast::cuda {
using namespace zsqfast::cuda_detail;

void lsq_fwd(DType dt, const void* x, void* out, int64_t n, const float* step, const float* inv_step, int64_t inner,
             int64_t C, float qmin, float qmax, void* stream) {
  if (n <= 0) return;
  by_dtype(dt, [&]<class T>() {
    lsq_fwd_kernel<T><<<grid_for(n), kThreads, 0, static_cast<cudaStream_t>(stream)>>>(
        static_cast<const T*>(x), static_cast<T*>(out), n, step, inv_step, inner, C, qmin, qmax);
  });
}

void lsq_bwd(DType dt, const void* grad, const void* x, void* grad_x, float* grad_step, int64_t n, const float* step,
             const float* inv_step, int64_t inner, int64_t C, float qmin, float qmax, float grad_scale, void* stream) {
  const auto s = static_cast<cudaStream_t>(stream);
  if (n <= 0) {
    cudaMemsetAsync(grad_step, 0, size_t(C) * sizeof(float), s);
    return;
  }
  if (C == 1) inner = n;  // one channel: one long run
  const int64_t per_channel = n / C;
  int64_t blocks = (per_channel + kThreads * 16 - 1) / (kThreads * 16);
  blocks = blocks < 1 ? 1 : (blocks > 1024 ? 1024 : blocks);
  const int64_t per_block = (per_channel + blocks - 1) / blocks;
  float* partial = nullptr;
  cudaMallocAsync(reinterpret_cast<void**>(&partial), size_t(C * blocks) * sizeof(float), s);
  by_dtype(dt, [&]<class T>() {
    lsq_bwd_kernel<T><<<dim3(unsigned(blocks), unsigned(C)), kThreads, 0, s>>>(
        static_cast<const T*>(grad), static_cast<const T*>(x), static_cast<T*>(grad_x), partial, inv_step, per_channel,
        per_block, inner, C, qmin, qmax);
  });
  lsq_sum_partials<<<grid_for(C), kThreads, 0, s>>>(partial, grad_step, C, blocks, grad_scale);
  cudaFreeAsync(partial, s);
  (void)step;
}

}  // namespace zsqfast::cuda
