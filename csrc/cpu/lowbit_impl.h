// Internals of the CPU low-bit GEMM shared by its translation units (lowbit_gemm.cpp: engine, scalar path;
// lowbit_gemm_vnni.cpp and lowbit_gemm_avx2.cpp: the SIMD kernels). See lowbit_gemm.cpp for the design.
#pragma once
#include <algorithm>
#include <cstring>
#include <vector>

#include "isa.h"
#include "lowbit.h"

namespace zsqfast::cpu::lowbit {


inline constexpr int NR = 32;          // weight panel columns
inline constexpr int MR = 8;           // rows of the VNNI register block (the blocked form of Acts)
constexpr int kRowPad = 8;      // activation rows are allocated in multiples of the largest row block
constexpr int64_t kGemvRows = 4;

enum class Path { Scalar, Avx2, Vnni };

inline Path path_for(int a_bits, int w_bits) {
  const Isa isa = active_isa();
  if (isa == Isa::Avx512Vnni) return Path::Vnni;
  if (isa == Isa::Scalar) return Path::Scalar;
  const int64_t amax = (1 << a_bits) - 1, wmax = w_bits == 8 ? 128 : (1 << w_bits) - 1;
  return 2 * amax * wmax <= 32767 ? Path::Avx2 : Path::Scalar;
}

// Precomputed per-call epilogue terms.
struct Ctx {
  const Gemm& g;
  const Acts& A;
  bool narrow;
  std::vector<int64_t> d64;  // K zw - cw
  std::vector<int32_t> d32;  // the same, wrapped to int32 (used when narrow)
  std::vector<int32_t> zd32;  // per tensor: za d32 (wrapped), the row-independent epilogue term
  std::vector<float> s;       // per tensor: fp32(sa * sw)
  Ctx(const Gemm& g_, const Acts& A_) : g(g_), A(A_), narrow(true) {
    if (!g.y) return;
    narrow = narrow_epilogue(g, g.per_token ? A.M : 1);
    d64.resize(size_t(g.N));
    d32.resize(size_t(g.N));
    for (int64_t n = 0; n < g.N; ++n) {
      d64[size_t(n)] = g.K * int64_t(g.zw[n]) - int64_t(g.cw[n]);
      d32[size_t(n)] = int32_t(uint32_t(uint64_t(d64[size_t(n)])));
    }
    if (g.per_token) return;
    zd32.resize(size_t(g.N));
    s.resize(size_t(g.N));
    for (int64_t n = 0; n < g.N; ++n) {
      zd32[size_t(n)] = int32_t(uint32_t(g.za[0]) * uint32_t(d32[size_t(n)]));
      s[size_t(n)] = g.sa[0] * g.sw[n];
    }
  }
  int64_t pick(int64_t m) const { return g.per_token ? m : 0; }
  // The exact epilogue of one element (128-bit integers: no overflow whatever the zero points).
  float one(int64_t m, int64_t n, int32_t acc) const {
    const __int128 c = __int128(acc) - __int128(g.zw[n]) * A.rowsum[size_t(m)] +
                       __int128(g.za[pick(m)]) * d64[size_t(n)];
    const float s = g.sa[pick(m)] * g.sw[n];
    const float y = float(c) * s;
    return g.bias ? y + g.bias[n] : y;
  }
};

// tile[r * NR + j] holds acc of row m0 + r, column n0 + j: write acc (raw) or y, scalar.
inline void finish_scalar(const Ctx& x, int64_t m0, int64_t mr, int64_t n0, int64_t nr, const int32_t* tile) {
  for (int64_t r = 0; r < mr; ++r)
    for (int64_t j = 0; j < nr; ++j) {
      const int32_t a = tile[r * NR + j];
      if (x.g.y) x.g.y[x.g.y_trans ? (n0 + j) * x.g.ldy + m0 + r : (m0 + r) * x.g.ldy + n0 + j] = x.one(m0 + r, n0 + j, a);
      else x.g.acc[(m0 + r) * x.g.N + n0 + j] = a;
    }
}

// Codes of weight row n (Kp of them) in kernel form: u8 codes, 8-bit ones xor 0x80 when `shift8` (as s8).
inline void unpack_row(const Gemm& g, int64_t n, int64_t Kp, uint8_t* out, bool shift8) {
  unpack_codes(g.w + n * row_bytes(g.w_bits, Kp), g.w_bits, Kp, out, (shift8 && g.w_bits == 8) ? 0x80 : 0);
}

// Weight panel of columns [n0, n0 + NR): panel[(q * NR + j) * 4 + i] = code(n0 + j, 4 q + i) (s8 form);
// columns past N are zero.
inline void relayout(const Gemm& g, int64_t n0, int64_t Kp, uint8_t* panel, uint8_t* tmp) {
  uint32_t* P = reinterpret_cast<uint32_t*>(panel);
  for (int j = 0; j < NR; ++j) {
    if (n0 + j < g.N) unpack_row(g, n0 + j, Kp, tmp, true);
    else std::memset(tmp, 0, size_t(Kp));
    const uint32_t* q4 = reinterpret_cast<const uint32_t*>(tmp);
    for (int64_t q = 0; q < Kp / 4; ++q) P[q * NR + j] = q4[q];
  }
}

// The GEMV driver (M <= kGemvRows): blocks of 4 weight rows spread over the threads; K::block<M> computes the
// (M x 4) tile, K::finish writes it.
template <class K>
void gemv_rows(const Ctx& x) {
  const int64_t M = x.A.M, nb = (x.g.N + 3) / 4;
  const int threads = threads_for((nb + 15) / 16);
#pragma omp parallel for schedule(static) num_threads(threads) if (threads > 1)
  for (int64_t i = 0; i < nb; ++i) {
    alignas(64) int32_t tile[kGemvRows * NR];
    switch (M) {
      case 1: K::template block<1>(x, 4 * i, tile); break;
      case 2: K::template block<2>(x, 4 * i, tile); break;
      case 3: K::template block<3>(x, 4 * i, tile); break;
      default: K::template block<4>(x, 4 * i, tile); break;
    }
    K::finish(x, M, 4 * i, std::min<int64_t>(4, x.g.N - 4 * i), tile);
  }
}

inline void scalar_run(const Ctx& x) {
  const Gemm& g = x.g;
  const int64_t Kp = x.A.lda, M = x.A.M;
  const int threads = threads_for(g.N);
#pragma omp parallel num_threads(threads) if (threads > 1)
  {
    std::vector<uint8_t> codes(static_cast<size_t>(Kp));
    std::vector<int32_t> tile(size_t(M) * NR);
#pragma omp for schedule(static)
    for (int64_t n = 0; n < g.N; ++n) {
      unpack_row(g, n, Kp, codes.data(), false);
      for (int64_t m = 0; m < M; ++m) {
        const uint8_t* a = x.A.codes.data() + m * Kp;
        int32_t s = 0;
        for (int64_t k = 0; k < g.K; ++k) s += int32_t(a[k]) * int32_t(codes[size_t(k)]);
        tile[size_t(m) * NR] = s;
      }
      finish_scalar(x, 0, M, n, 1, tile.data());
    }
  }
}


// The SIMD kernels (lowbit_gemm_vnni.cpp, lowbit_gemm_avx2.cpp): GEMM (M > kGemvRows), GEMV, one row's codes
// (quantize_row: codes k < Kp, zero from K on, code k at out[(k / 4) * stride + k % 4]; false on a NaN).
#define ZSQ_LOWBIT_ISA(ns)                                                                                  \
  namespace ns {                                                                                            \
  void run_gemm(const Ctx& x);                                                                              \
  void run_gemv(const Ctx& x);                                                                              \
  bool quantize_row(const float* x, int64_t K, int64_t Kp, float inv, int32_t za, int bits, uint8_t* out,      \
                    int64_t stride, int32_t* rowsum);                                                         \
  }
ZSQ_LOWBIT_ISA(vnni)
ZSQ_LOWBIT_ISA(avx2)
#undef ZSQ_LOWBIT_ISA

}  // namespace zsqfast::cpu::lowbit
