// CUDA fake quantization (compile-checked here; the unit functions also run on the host in
// tests/cpp/test_cuda_emulation.cu).
//
// Forward: grid-stride over units of 8 elements (see common.cuh). Per unit one thread loads 16 or 32 bytes,
// computes q = rne(x * inv) + zp, out = (clamp(q, qmin, qmax) - zp) * scale in fp32, stores, and writes the
// unit's mask byte itself (bit e = element 8u+e inside the grid; bits past n stay 0), so no two threads ever
// touch one mask byte and no ballot is needed. Channel per element c = (o / inner) % C: one divmod per unit,
// then a cursor (per tensor and inner % 8 == 0 load the parameters once per unit).
// Backward: out = bit ? grad : 0 as a bit mask on the raw words (exact for -0, NaN, any dtype).
#include "common.cuh"

namespace zsqfast::cuda_detail {

struct FqArgs {
  const float* scale;
  const float* inv;
  const float* zp;
  int64_t inner, C;
  float qmin, qmax;
};

// One element: returns the dequantized value; *inside = qmin <= q <= qmax (false for NaN).
ZSQ_HD float fq_elem(float x, float s, float iv, float z, float lo, float hi, bool* inside) {
  const float q = add_rn(rne(mul_rn(x, iv)), z);
  *inside = q >= lo && q <= hi;
  return mul_rn(sub_rn(clamp_nan(q, lo, hi), z), s);
}

template <class T>
ZSQ_HD void fq_fwd_unit(const T* x, T* out, uint8_t* mask, int64_t n, const FqArgs& a, bool vec, int64_t u) {
  const int64_t o = u * kUnit;
  const int cnt = n - o < kUnit ? int(n - o) : kUnit;
  Unit<T> v;
  v.load(x, o, cnt, vec);
  unsigned bits = 0;
  if (unit_is_one_channel(a.inner, a.C)) {
    const int64_t c = unit_channel(o, a.inner, a.C);
    const float s = ldf(a.scale + c), iv = ldf(a.inv + c), z = ldf(a.zp + c);
    ZSQ_UNROLL
    for (int e = 0; e < kUnit; ++e) {
      bool in;
      v.set(e, fq_elem(v.get(e), s, iv, z, a.qmin, a.qmax, &in));
      bits |= unsigned(in && e < cnt) << e;
    }
  } else {
    ChannelCursor cur(o, a.inner, a.C);
    ZSQ_UNROLL
    for (int e = 0; e < kUnit; ++e) {
      if (e < cnt) {
        bool in;
        v.set(e, fq_elem(v.get(e), ldf(a.scale + cur.c), ldf(a.inv + cur.c), ldf(a.zp + cur.c), a.qmin, a.qmax, &in));
        bits |= unsigned(in) << e;
        cur.next(a.inner, a.C);
      }
    }
  }
  v.store(out, o, cnt, vec);
  if (mask != nullptr) mask[u] = uint8_t(bits);
}

template <class T>
ZSQ_HD void fq_bwd_unit(const T* grad, const uint8_t* mask, T* out, int64_t n, bool vec, int64_t u) {
  const int64_t o = u * kUnit;
  const int cnt = n - o < kUnit ? int(n - o) : kUnit;
  Unit<T> v;
  v.load(grad, o, cnt, vec);
#ifdef __CUDA_ARCH__
  v.keep(__ldg(mask + u));
#else
  v.keep(mask[u]);
#endif
  v.store(out, o, cnt, vec);
}

template <class T>
__global__ void __launch_bounds__(kBlock) fake_quant_fwd_kernel(const T* __restrict__ x, T* __restrict__ out,
                                                                uint8_t* __restrict__ mask, int64_t n, FqArgs a,
                                                                bool vec) {
  const int64_t units = (n + kUnit - 1) / kUnit;
  for (int64_t u = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; u < units; u += int64_t(gridDim.x) * blockDim.x)
    fq_fwd_unit<T>(x, out, mask, n, a, vec, u);
}

template <class T>
__global__ void __launch_bounds__(kBlock) fake_quant_bwd_kernel(const T* __restrict__ grad,
                                                                const uint8_t* __restrict__ mask, T* __restrict__ out,
                                                                int64_t n, bool vec) {
  const int64_t units = (n + kUnit - 1) / kUnit;
  for (int64_t u = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; u < units; u += int64_t(gridDim.x) * blockDim.x)
    fq_bwd_unit<T>(grad, mask, out, n, vec, u);
}

template <class T>
void launch_fwd(const void* x, void* out, uint8_t* mask, int64_t n, const FqArgs& a, cudaStream_t s) {
  const bool vec = aligned16(x) && aligned16(out);
  fake_quant_fwd_kernel<T><<<grid_for((n + kUnit - 1) / kUnit), kBlock, 0, s>>>(
      static_cast<const T*>(x), static_cast<T*>(out), mask, n, a, vec);
}

template <class T>
void launch_bwd(const void* grad, const uint8_t* mask, void* out, int64_t n, cudaStream_t s) {
  const bool vec = aligned16(grad) && aligned16(out);
  fake_quant_bwd_kernel<T><<<grid_for((n + kUnit - 1) / kUnit), kBlock, 0, s>>>(static_cast<const T*>(grad), mask,
                                                                               static_cast<T*>(out), n, vec);
}

}  // namespace zsqfast::cuda_detail

namespace zsqfast::cuda {
namespace d = zsqfast::cuda_detail;

void fake_quant_fwd(DType dt, const void* x, void* out, uint8_t* mask, int64_t n, const float* scale,
                    const float* inv_scale, const float* zero_point, int64_t inner, int64_t C, float qmin, float qmax,
                    void* stream) {
  if (n <= 0) return;
  const d::FqArgs a{scale, inv_scale, zero_point, C == 1 ? 1 : inner, C, qmin, qmax};
  const auto s = static_cast<cudaStream_t>(stream);
  switch (dt) {
    case DType::F32: d::launch_fwd<float>(x, out, mask, n, a, s); break;
    case DType::F16: d::launch_fwd<__half>(x, out, mask, n, a, s); break;
    case DType::BF16: d::launch_fwd<__nv_bfloat16>(x, out, mask, n, a, s); break;
  }
}

void fake_quant_bwd(DType dt, const void* grad, const uint8_t* mask, void* out, int64_t n, void* stream) {
  if (n <= 0) return;
  const auto s = static_cast<cudaStream_t>(stream);
  switch (dt) {  // raw bits: bf16 and fp16 share the 2-byte kernel
    case DType::F32: d::launch_bwd<float>(grad, mask, out, n, s); break;
    case DType::F16:
    case DType::BF16: d::launch_bwd<__half>(grad, mask, out, n, s); break;
  }
}

}  // namespace zsqfast::cuda
