// CUDA LSQ (compile-checked here; the per-unit / per-thread functions also run on the host in
// tests/cpp/test_cuda_emulation.cu).
//
// Forward: elementwise, units of 8 as in fake_quant.cu.
//
// Backward, one fused pass plus a tiny finishing kernel, deterministic, no float atomics, no host sync:
//   * Memory is (outer, C, inner); channel c owns K = outer * inner elements, indexed k -> offset
//     (k / inner) * C * inner + c * inner + k % inner (per tensor: one run of K = n). Its k range is cut
//     into fixed chunks of kChunk elements: E = ceil(K / kChunk) chunks, a function of the shape only.
//   * Block (c, j) walks chunk j of channel c in units of 8 (unit-strided over its threads), writes grad_x
//     (raw-bit select), accumulates grad * dstep in fp32, and reduces to one chunk sum with a fixed warp
//     butterfly + fixed warp order (block_sum). Thread count is a function of K only.
//   * E > 1: chunk sums go to partial[c][j] (stream-ordered cudaMallocAsync scratch, freed with
//     cudaFreeAsync, no synchronisation); lsq_finish_kernel gives each channel one warp: lane l adds
//     chunks l, l+32, ... in order, then a butterfly; grad_step[c] = sum * grad_scale.
//   * E == 1, or when the scratch cannot be had (no memory pools / out of memory): one block per channel
//     walks all its chunks and folds each chunk sum into lane (j % 32) of warp 0 in the same order, then the
//     same butterfly, so grad_step is bit-identical to the two-kernel path. Only slower.
// Hence the sums depend on the shape alone (not on the GPU, the grid, alignment or memory availability).
#include "common.cuh"

namespace zsqfast::cuda_detail {

struct LsqArgs {
  const float* step;
  const float* inv;
  int64_t inner, C;
  float qmin, qmax;
};

template <class T>
ZSQ_HD void lsq_fwd_unit(const T* x, T* out, int64_t n, const LsqArgs& a, bool vec, int64_t u) {
  const int64_t o = u * kUnit;
  const int cnt = n - o < kUnit ? int(n - o) : kUnit;
  Unit<T> v;
  v.load(x, o, cnt, vec);
  if (unit_is_one_channel(a.inner, a.C)) {
    const int64_t c = unit_channel(o, a.inner, a.C);
    const float s = ldf(a.step + c), iv = ldf(a.inv + c);
    ZSQ_UNROLL
    for (int e = 0; e < kUnit; ++e) v.set(e, mul_rn(clamp_nan(rne(mul_rn(v.get(e), iv)), a.qmin, a.qmax), s));
  } else {
    ChannelCursor cur(o, a.inner, a.C);
    ZSQ_UNROLL
    for (int e = 0; e < kUnit; ++e) {
      if (e < cnt) {
        v.set(e, mul_rn(clamp_nan(rne(mul_rn(v.get(e), ldf(a.inv + cur.c))), a.qmin, a.qmax), ldf(a.step + cur.c)));
        cur.next(a.inner, a.C);
      }
    }
  }
  v.store(out, o, cnt, vec);
}

// One element of the backward: returns whether grad passes to grad_x; adds grad * dstep to *acc.
ZSQ_HD bool lsq_bwd_elem(float g, float x, float iv, float lo, float hi, float* acc) {
  const float v = mul_rn(x, iv);
  const bool below = v < lo, above = v > hi;  // NaN: neither (grad passes, dstep = NaN)
  const float d = below ? lo : (above ? hi : sub_rn(rne(v), v));
  *acc = add_rn(*acc, mul_rn(g, d));
  return !(below || above);
}

struct LsqBwdGeometry {
  int64_t K;       // elements per channel
  int64_t inner;   // run length (K when per tensor)
  int64_t C;
  int64_t chunks;  // E = ceil(K / kChunk)
  bool vec;        // units are contiguous and 16-byte aligned: inner % 8 == 0 (or C == 1) and aligned tensors
};

ZSQ_HD LsqBwdGeometry lsq_bwd_geometry(int64_t n, int64_t inner, int64_t C, bool aligned) {
  LsqBwdGeometry g;
  g.C = C;
  g.K = n / C;
  g.inner = C == 1 ? g.K : inner;
  g.chunks = (g.K + kChunk - 1) / kChunk;
  g.vec = aligned && (C == 1 || g.inner % kUnit == 0);
  return g;
}

// Threads per block of the backward: a function of K only (so are the sums).
inline int lsq_bwd_threads(int64_t K) {
  const int64_t units = (K + kUnit - 1) / kUnit;
  if (units >= kBlock) return kBlock;
  return int((units + 31) / 32 * 32);
}

// What thread `tid` of `nthreads` adds for chunk j of channel c (writing grad_x on the way). Units of 8
// consecutive k; a unit of the vec path is 8 contiguous, aligned elements (a partial one only at the end
// of a per-tensor run); the other path walks element by element across run boundaries.
template <class T>
ZSQ_HD float lsq_bwd_thread(const T* grad, const T* x, T* grad_x, const LsqArgs& a, const LsqBwdGeometry& g,
                            int64_t c, int64_t j, int tid, int nthreads) {
  const float iv = ldf(a.inv + c), lo = a.qmin, hi = a.qmax;
  const int64_t k1 = (j + 1) * kChunk < g.K ? (j + 1) * kChunk : g.K;
  const int64_t row = g.C * g.inner, base = c * g.inner;
  float acc = 0.0f;
  for (int64_t k = j * kChunk + int64_t(tid) * kUnit; k < k1; k += int64_t(nthreads) * kUnit) {
    const int cnt = k1 - k < kUnit ? int(k1 - k) : kUnit;
    int64_t r = 0, t = k;
    if (g.K != g.inner) divmod(k, g.inner, r, t);
    int64_t o = r * row + base + t;
    if (g.vec) {
      Unit<T> gr, xv;
      gr.load(grad, o, cnt, true);
      xv.load(x, o, cnt, true);
      unsigned bits = 0;
      ZSQ_UNROLL
      for (int e = 0; e < kUnit; ++e)
        if (e < cnt) bits |= unsigned(lsq_bwd_elem(gr.get(e), xv.get(e), iv, lo, hi, &acc)) << e;
      gr.keep(bits);
      gr.store(grad_x, o, cnt, true);
    } else {
      ZSQ_UNROLL
      for (int e = 0; e < kUnit; ++e) {
        if (e < cnt) {
          const uint32_t graw = Unit<T>::load_raw(grad + o);
          const float xf = Storage<T>::to_float(Unit<T>::load_raw(x + o));
          const bool pass = lsq_bwd_elem(Storage<T>::to_float(graw), xf, iv, lo, hi, &acc);
          Unit<T>::store_raw(grad_x + o, pass ? graw : 0u);
          if (++t == g.inner) {
            t = 0;
            o += row - g.inner + 1;
          } else {
            ++o;
          }
        }
      }
    }
  }
  return acc;
}

// grid.x = C * G. G == chunks: block (c, j) writes partial[c * chunks + j]. G == 1: block c walks every
// chunk and writes grad_step[c] (the finishing order of lsq_finish_kernel, see the top of this file).
template <class T>
__global__ void __launch_bounds__(kBlock) lsq_bwd_kernel(const T* __restrict__ grad, const T* __restrict__ x,
                                                         T* __restrict__ grad_x, LsqArgs a, LsqBwdGeometry g, int64_t G,
                                                         float* __restrict__ partial, float* __restrict__ grad_step,
                                                         float grad_scale) {
  __shared__ float red[kWarps];
  const int64_t c = int64_t(blockIdx.x) / G;
  float fin = 0.0f;  // G == 1: lane l of warp 0 folds chunk sums l, l + 32, ...
  for (int64_t j = int64_t(blockIdx.x) - c * G; j < g.chunks; j += G) {
    const float sum = block_sum(lsq_bwd_thread<T>(grad, x, grad_x, a, g, c, j, threadIdx.x, blockDim.x), red);
    if (G == 1) {
      if (int64_t(threadIdx.x) == (j & 31)) fin = add_rn(fin, sum);
    } else if (threadIdx.x == 0) {
      partial[c * g.chunks + j] = sum;
    }
  }
  if (G == 1 && threadIdx.x < 32) {
    fin = warp_sum(fin);
    if (threadIdx.x == 0) grad_step[c] = mul_rn(fin, grad_scale);
  }
}

// One warp per channel: grad_step[c] = grad_scale * sum_j partial[c * E + j], in the fixed order above.
__global__ void __launch_bounds__(kBlock) lsq_finish_kernel(const float* __restrict__ partial,
                                                            float* __restrict__ grad_step, int64_t C, int64_t E,
                                                            float grad_scale) {
  const int64_t c = (int64_t(blockIdx.x) * blockDim.x + threadIdx.x) >> 5;
  const int lane = threadIdx.x & 31;
  if (c >= C) return;  // warp-uniform
  float fin = 0.0f;
  for (int64_t j = lane; j < E; j += 32) fin = add_rn(fin, __ldg(partial + c * E + j));
  fin = warp_sum(fin);
  if (lane == 0) grad_step[c] = mul_rn(fin, grad_scale);
}

template <class T>
__global__ void __launch_bounds__(kBlock) lsq_fwd_kernel(const T* __restrict__ x, T* __restrict__ out, int64_t n,
                                                         LsqArgs a, bool vec) {
  const int64_t units = (n + kUnit - 1) / kUnit;
  for (int64_t u = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; u < units; u += int64_t(gridDim.x) * blockDim.x)
    lsq_fwd_unit<T>(x, out, n, a, vec, u);
}

template <class T>
void launch_fwd(const void* x, void* out, int64_t n, const LsqArgs& a, cudaStream_t s) {
  const bool vec = aligned16(x) && aligned16(out);
  lsq_fwd_kernel<T><<<grid_for((n + kUnit - 1) / kUnit), kBlock, 0, s>>>(static_cast<const T*>(x),
                                                                        static_cast<T*>(out), n, a, vec);
}

template <class T>
void launch_bwd(const void* grad, const void* x, void* grad_x, float* grad_step, int64_t n, const LsqArgs& a,
                float grad_scale, cudaStream_t s) {
  const LsqBwdGeometry g = lsq_bwd_geometry(n, a.inner, a.C, aligned16(grad) && aligned16(x) && aligned16(grad_x));
  const int threads = lsq_bwd_threads(g.K);
  float* partial = nullptr;
  int64_t G = 1;
  if (g.chunks > 1) {
    if (cudaMallocAsync(reinterpret_cast<void**>(&partial), size_t(g.C * g.chunks) * sizeof(float), s) == cudaSuccess) {
      G = g.chunks;
    } else {
      (void)cudaGetLastError();  // handled: fall back to one block per channel (same bits)
      partial = nullptr;
    }
  }
  lsq_bwd_kernel<T><<<unsigned(g.C * G), threads, 0, s>>>(static_cast<const T*>(grad), static_cast<const T*>(x),
                                                          static_cast<T*>(grad_x), a, g, G, partial, grad_step,
                                                          grad_scale);
  if (G > 1) {
    lsq_finish_kernel<<<unsigned((g.C * 32 + kBlock - 1) / kBlock), kBlock, 0, s>>>(partial, grad_step, g.C, g.chunks,
                                                                                   grad_scale);
    cudaFreeAsync(partial, s);
  }
}

}  // namespace zsqfast::cuda_detail

namespace zsqfast::cuda {
namespace d = zsqfast::cuda_detail;

void lsq_fwd(DType dt, const void* x, void* out, int64_t n, const float* step, const float* inv_step, int64_t inner,
             int64_t C, float qmin, float qmax, void* stream) {
  if (n <= 0) return;
  const d::LsqArgs a{step, inv_step, C == 1 ? 1 : inner, C, qmin, qmax};
  const auto s = static_cast<cudaStream_t>(stream);
  switch (dt) {
    case DType::F32: d::launch_fwd<float>(x, out, n, a, s); break;
    case DType::F16: d::launch_fwd<__half>(x, out, n, a, s); break;
    case DType::BF16: d::launch_fwd<__nv_bfloat16>(x, out, n, a, s); break;
  }
}

void lsq_bwd(DType dt, const void* grad, const void* x, void* grad_x, float* grad_step, int64_t n, const float* step,
             const float* inv_step, int64_t inner, int64_t C, float qmin, float qmax, float grad_scale, void* stream) {
  const auto s = static_cast<cudaStream_t>(stream);
  if (n <= 0) {  // no elements: every channel's sum is empty
    if (C > 0) cudaMemsetAsync(grad_step, 0, size_t(C) * sizeof(float), s);
    return;
  }
  const d::LsqArgs a{step, inv_step, C == 1 ? 1 : inner, C, qmin, qmax};
  switch (dt) {
    case DType::F32: d::launch_bwd<float>(grad, x, grad_x, grad_step, n, a, grad_scale, s); break;
    case DType::F16: d::launch_bwd<__half>(grad, x, grad_x, grad_step, n, a, grad_scale, s); break;
    case DType::BF16: d::launch_bwd<__nv_bfloat16>(grad, x, grad_x, grad_step, n, a, grad_scale, s); break;
  }
}

}  // namespace zsqfast::cuda
