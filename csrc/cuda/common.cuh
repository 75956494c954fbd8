// Shared pieces of the CUDA kernels (csrc/cuda/*.cu). No torch headers: a kernel file compiles in seconds.
//
// Work unit: 8 consecutive elements of memory order (a "unit"), the elements of one STE-mask byte. A full,
// 16-byte-aligned unit moves as one 16-byte access (2-byte dtypes) or two (fp32); the tail unit and
// misaligned tensors (views with a storage offset) take a per-element path. Values travel as raw 32-bit
// words (one fp32 element, or two 16-bit elements, low half first), so a select (STE) copies bits.
//
// Everything a thread does to one unit is a __host__ __device__ function: tests/cpp/test_cuda_emulation.cu
// runs the same code on the host (no GPU needed) against a naive loop. Host and device agree because every
// rounding step is explicit: __fmul_rn/__fadd_rn on the device (no FMA contraction), plain float operations
// on the host (the host compiler does not contract under -std=c++17/20), rintf = round half to even.
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <cstring>

#include "../kernels.h"

#define ZSQ_HD __host__ __device__ __forceinline__
#ifdef __CUDA_ARCH__
#define ZSQ_UNROLL _Pragma("unroll")
#else
#define ZSQ_UNROLL
#endif

namespace zsqfast::cuda_detail {

constexpr int kUnit = 8;        // elements per unit (one mask byte)
constexpr int kBlock = 256;     // threads of the elementwise kernels (and at most of lsq_bwd)
constexpr int kWarps = kBlock / 32;
constexpr int64_t kChunk = 16384;  // lsq_bwd: elements of one channel per block-chunk (fixed: deterministic sums)
static_assert(kChunk % (kUnit * kBlock) == 0, "a chunk is whole block sweeps");

// ---- fp32 arithmetic with one rounding per operation (no FMA contraction) ----
ZSQ_HD float mul_rn(float a, float b) {
#ifdef __CUDA_ARCH__
  return __fmul_rn(a, b);
#else
  return a * b;
#endif
}
ZSQ_HD float add_rn(float a, float b) {
#ifdef __CUDA_ARCH__
  return __fadd_rn(a, b);
#else
  return a + b;
#endif
}
ZSQ_HD float sub_rn(float a, float b) {
#ifdef __CUDA_ARCH__
  return __fsub_rn(a, b);
#else
  return a - b;
#endif
}
ZSQ_HD float rne(float v) { return rintf(v); }  // round half to even (cvt.rni.f32.f32 on the device)
// clamp that propagates NaN (both comparisons are false for NaN); qmin <= qmax
ZSQ_HD float clamp_nan(float v, float lo, float hi) { return v < lo ? lo : (v > hi ? hi : v); }

// ---- read-only global loads (the non-coherent path on the device) ----
ZSQ_HD float ldf(const float* p) {
#ifdef __CUDA_ARCH__
  return __ldg(p);
#else
  return *p;
#endif
}
ZSQ_HD uint4 ld16(const void* p) {  // p is 16-byte aligned
#ifdef __CUDA_ARCH__
  return __ldg(static_cast<const uint4*>(p));
#else
  uint4 v;
  std::memcpy(&v, p, sizeof v);
  return v;
#endif
}
ZSQ_HD void st16(void* p, uint4 v) {
#ifdef __CUDA_ARCH__
  *static_cast<uint4*>(p) = v;
#else
  std::memcpy(p, &v, sizeof v);
#endif
}

// ---- storage types: raw bits <-> fp32 ----
template <class T> struct Storage;
template <> struct Storage<float> {
  using Raw = uint32_t;
  ZSQ_HD static float to_float(uint32_t r) {
#ifdef __CUDA_ARCH__
    return __uint_as_float(r);
#else
    float f;
    std::memcpy(&f, &r, 4);
    return f;
#endif
  }
  ZSQ_HD static uint32_t from_float(float f) {
#ifdef __CUDA_ARCH__
    return __float_as_uint(f);
#else
    uint32_t r;
    std::memcpy(&r, &f, 4);
    return r;
#endif
  }
};
template <> struct Storage<__half> {
  using Raw = uint16_t;
  ZSQ_HD static float to_float(uint32_t r) {
    __half_raw h;
    h.x = static_cast<unsigned short>(r);
    return __half2float(__half(h));
  }
  ZSQ_HD static uint32_t from_float(float f) { return __half_raw(__float2half_rn(f)).x; }
};
template <> struct Storage<__nv_bfloat16> {
  using Raw = uint16_t;
  ZSQ_HD static float to_float(uint32_t r) {
    __nv_bfloat16_raw h;
    h.x = static_cast<unsigned short>(r);
    return __bfloat162float(__nv_bfloat16(h));
  }
  ZSQ_HD static uint32_t from_float(float f) { return __nv_bfloat16_raw(__float2bfloat16_rn(f)).x; }
};

// One unit as raw 32-bit words: 8 for fp32, 4 for the 16-bit types.
template <class T> struct Unit {
  static constexpr int kWords = int(sizeof(T)) * kUnit / 4;
  static constexpr int kVec = kWords / 4;  // 16-byte accesses per unit
  uint32_t w[kWords];

  ZSQ_HD uint32_t raw(int e) const {
    if constexpr (sizeof(T) == 4) return w[e];
    else return (w[e >> 1] >> (16 * (e & 1))) & 0xffffu;
  }
  ZSQ_HD void set_raw(int e, uint32_t r) {
    if constexpr (sizeof(T) == 4) {
      w[e] = r;
    } else {
      const int sh = 16 * (e & 1);
      w[e >> 1] = (w[e >> 1] & ~(0xffffu << sh)) | (r << sh);
    }
  }
  ZSQ_HD float get(int e) const { return Storage<T>::to_float(raw(e)); }
  ZSQ_HD void set(int e, float v) { set_raw(e, Storage<T>::from_float(v)); }
  // Keep the elements whose bit is set in `bits`, zero the others (bit patterns, so -0, NaN pass unchanged).
  ZSQ_HD void keep(unsigned bits) {
    ZSQ_UNROLL
    for (int i = 0; i < kWords; ++i) {
      if constexpr (sizeof(T) == 4) {
        w[i] = ((bits >> i) & 1u) ? w[i] : 0u;
      } else {
        const uint32_t m = (((bits >> (2 * i)) & 1u) ? 0x0000ffffu : 0u) | (((bits >> (2 * i + 1)) & 1u) ? 0xffff0000u : 0u);
        w[i] &= m;
      }
    }
  }

  // Elements o .. o+cnt-1 (contiguous). vec: the tensor is 16-byte aligned (then a full unit is too).
  ZSQ_HD void load(const T* base, int64_t o, int cnt, bool vec) {
    if (vec && cnt == kUnit) {
      ZSQ_UNROLL
      for (int i = 0; i < kVec; ++i) {
        const uint4 v = ld16(base + o + i * (16 / int(sizeof(T))));
        w[4 * i] = v.x, w[4 * i + 1] = v.y, w[4 * i + 2] = v.z, w[4 * i + 3] = v.w;
      }
    } else {
      ZSQ_UNROLL
      for (int i = 0; i < kWords; ++i) w[i] = 0;
      ZSQ_UNROLL
      for (int e = 0; e < kUnit; ++e)
        if (e < cnt) set_raw(e, load_raw(base + o + e));
    }
  }
  ZSQ_HD void store(T* base, int64_t o, int cnt, bool vec) const {
    if (vec && cnt == kUnit) {
      ZSQ_UNROLL
      for (int i = 0; i < kVec; ++i)
        st16(base + o + i * (16 / int(sizeof(T))), make_uint4(w[4 * i], w[4 * i + 1], w[4 * i + 2], w[4 * i + 3]));
    } else {
      ZSQ_UNROLL
      for (int e = 0; e < kUnit; ++e)
        if (e < cnt) store_raw(base + o + e, raw(e));
    }
  }

  ZSQ_HD static uint32_t load_raw(const T* p) {
    using Raw = typename Storage<T>::Raw;
#ifdef __CUDA_ARCH__
    return __ldg(reinterpret_cast<const Raw*>(p));
#else
    Raw r;
    std::memcpy(&r, p, sizeof r);
    return r;
#endif
  }
  ZSQ_HD static void store_raw(T* p, uint32_t r) {
    using Raw = typename Storage<T>::Raw;
    const Raw v = static_cast<Raw>(r);
#ifdef __CUDA_ARCH__
    *reinterpret_cast<Raw*>(p) = v;
#else
    std::memcpy(static_cast<void*>(p), &v, sizeof v);
#endif
  }
};

// q = a / b, r = a % b for 0 <= a, 1 <= b; 32-bit division when both fit (the common case).
ZSQ_HD void divmod(int64_t a, int64_t b, int64_t& q, int64_t& r) {
  if (((a | b) >> 31) == 0) {
    const uint32_t q32 = uint32_t(a) / uint32_t(b);
    q = q32;
    r = int64_t(uint32_t(a) - q32 * uint32_t(b));
  } else {
    q = a / b;
    r = a - q * b;
  }
}

// Channel walk for a run of consecutive memory offsets: t = o % inner, c = (o / inner) % C.
struct ChannelCursor {
  int64_t t, c;
  ZSQ_HD ChannelCursor(int64_t o, int64_t inner, int64_t C) {
    int64_t q, unused;
    divmod(o, inner, q, t);
    divmod(q, C, unused, c);
  }
  ZSQ_HD void next(int64_t inner, int64_t C) {
    if (++t == inner) {
      t = 0;
      if (++c == C) c = 0;
    }
  }
};

// Channel of a whole unit starting at o (a multiple of 8), when every element of it shares one channel:
// per tensor, or inner % 8 == 0 (runs of a channel then start and end on unit boundaries).
ZSQ_HD bool unit_is_one_channel(int64_t inner, int64_t C) { return C == 1 || (inner % kUnit) == 0; }
ZSQ_HD int64_t unit_channel(int64_t o, int64_t inner, int64_t C) {
  if (C == 1) return 0;
  int64_t q, r;
  divmod(o, inner, q, r);
  divmod(q, C, q, r);
  return r;
}

inline bool aligned16(const void* p) { return (reinterpret_cast<uintptr_t>(p) & 15u) == 0; }

// Grid of a grid-stride kernel over `work` items with kBlock threads: at most ~2 waves of resident blocks.
inline unsigned grid_for(int64_t work) {
  int dev = 0, sms = 0;
  if (cudaGetDevice(&dev) != cudaSuccess || cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev) != cudaSuccess ||
      sms <= 0) {
    sms = 132;  // the launch itself will report the error
  }
  const int64_t cap = int64_t(sms) * (2048 / kBlock) * 2;
  const int64_t need = (work + kBlock - 1) / kBlock;
  return unsigned(need < 1 ? 1 : (need < cap ? need : cap));
}

// ---- warp / block sums with a fixed combination order (deterministic) ----
// XOR butterfly: every lane ends with the same bits (IEEE addition is commutative).
__device__ __forceinline__ float warp_sum(float v) {
  ZSQ_UNROLL
  for (int s = 16; s > 0; s >>= 1) v = add_rn(v, __shfl_xor_sync(0xffffffffu, v, s));
  return v;
}
// Sum over the block (blockDim.x a multiple of 32, at most kBlock); the result is valid in every lane of
// warp 0. Reusable back to back (ends with a barrier).
__device__ __forceinline__ float block_sum(float v, float* red) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  v = warp_sum(v);
  if (lane == 0) red[warp] = v;
  __syncthreads();
  float t = 0.0f;
  if (warp == 0) t = warp_sum(lane < int(blockDim.x >> 5) ? red[lane] : 0.0f);
  __syncthreads();
  return t;
}

}  // namespace zsqfast::cuda_detail
