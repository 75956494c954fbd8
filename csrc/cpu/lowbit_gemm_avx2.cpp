// AVX2 kernels of the CPU low-bit GEMM (design: lowbit_gemm.cpp; shared internals: lowbit_impl.h).
#include <immintrin.h>

#include <cmath>

#include "lowbit_impl.h"

#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c")
namespace zsqfast::cpu::lowbit::avx2 {
namespace {

inline __m256i dot4(__m256i acc, __m256i a, __m256i w) {  // acc + sum of 4 (u8 a) x (s8 w) products a lane
  return _mm256_add_epi32(acc, _mm256_madd_epi16(_mm256_maddubs_epi16(a, w), _mm256_set1_epi16(1)));
}

inline __m256i ld(const void* p) { return _mm256_loadu_si256(static_cast<const __m256i*>(p)); }

inline int32_t hsum(__m256i v) {
  __m128i s = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
  s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0x4E));
  s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0xB1));
  return _mm_cvtsi128_si32(s);
}

// tile columns [c0, c0 + 16) of MR rows.
template <int MR>
void ukr(const uint8_t* a, int64_t lda, const uint8_t* panel, int64_t k4n, int c0, int32_t* tile) {
  __m256i acc[MR][2];
  for (int r = 0; r < MR; ++r) acc[r][0] = acc[r][1] = _mm256_setzero_si256();
  for (int64_t q = 0; q < k4n; ++q) {
    const uint8_t* b = panel + (q * NR + c0) * 4;
    const __m256i b0 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(b));
    const __m256i b1 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(b + 32));
    for (int r = 0; r < MR; ++r) {
      int32_t v;
      std::memcpy(&v, a + r * lda + q * 4, 4);
      const __m256i av = _mm256_set1_epi32(v);
      acc[r][0] = dot4(acc[r][0], av, b0);
      acc[r][1] = dot4(acc[r][1], av, b1);
    }
  }
  for (int r = 0; r < MR; ++r) {
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(tile + r * NR + c0), acc[r][0]);
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(tile + r * NR + c0 + 8), acc[r][1]);
  }
}

void finish(const Ctx& x, int64_t m0, int64_t mr, int64_t n0, int64_t nr, int32_t* tile) {
  const Gemm& g = x.g;
  if (g.w_bits == 8)
    for (int64_t r = 0; r < mr; ++r)
      for (int j = 0; j < NR; ++j) tile[r * NR + j] += 128 * x.A.rowsum[size_t(m0 + r)];
  if (!g.y) {
    for (int64_t r = 0; r < mr; ++r) std::memcpy(g.acc + (m0 + r) * g.N + n0, tile + r * NR, size_t(nr) * 4);
    return;
  }
  if (!x.narrow || g.y_trans) return finish_scalar(x, m0, mr, n0, nr, tile);
  for (int64_t r = 0; r < mr; ++r) {
    const int64_t m = m0 + r;
    const __m256i ra = _mm256_set1_epi32(x.A.rowsum[size_t(m)]), za = _mm256_set1_epi32(g.za[x.pick(m)]);
    const __m256 sa = _mm256_set1_ps(g.sa[x.pick(m)]);
    int64_t j = 0;
    for (; j + 8 <= nr; j += 8) {
      const int64_t n = n0 + j;
      __m256i c = ld(tile + r * NR + j);
      c = _mm256_sub_epi32(c, _mm256_mullo_epi32(ld(g.zw + n), ra));
      c = _mm256_add_epi32(c, _mm256_mullo_epi32(ld(x.d32.data() + n), za));
      __m256 y = _mm256_mul_ps(_mm256_cvtepi32_ps(c), _mm256_mul_ps(sa, _mm256_loadu_ps(g.sw + n)));
      if (g.bias) y = _mm256_add_ps(y, _mm256_loadu_ps(g.bias + n));
      _mm256_storeu_ps(g.y + m * g.ldy + n, y);
    }
    if (j < nr) finish_scalar(x, m, 1, n0 + j, nr - j, tile + r * NR + j);
  }
}

void gemm(const Ctx& x) {
  const Gemm& g = x.g;
  const int64_t Kp = x.A.lda, M = x.A.M, np = (g.N + NR - 1) / NR;
  const int threads = threads_for(np);
#pragma omp parallel num_threads(threads) if (threads > 1)
  {
    std::vector<uint8_t> panel(static_cast<size_t>(Kp * NR)), tmp(static_cast<size_t>(Kp));
    alignas(32) int32_t tile[4 * NR];
#pragma omp for schedule(static)
    for (int64_t p = 0; p < np; ++p) {
      const int64_t n0 = p * NR, nr = std::min<int64_t>(NR, g.N - n0);
      relayout(g, n0, Kp, panel.data(), tmp.data());
      for (int64_t m0 = 0; m0 < M; m0 += 4) {
        const uint8_t* a = x.A.codes.data() + m0 * Kp;
        for (int c0 = 0; c0 < NR; c0 += 16) ukr<4>(a, Kp, panel.data(), Kp / 4, c0, tile);
        finish(x, m0, std::min<int64_t>(4, M - m0), n0, nr, tile);
      }
    }
  }
}

template <int MM>
void gemv_block(const Ctx& x, int64_t n0, int32_t* tile) {
  const Gemm& g = x.g;
  const int64_t Kp = x.A.lda, rb = row_bytes(g.w_bits, Kp);
  const uint8_t* rows[4];
  for (int j = 0; j < 4; ++j) rows[j] = g.w + std::min(n0 + j, g.N - 1) * rb;
  __m256i acc[4][MM];
  for (int j = 0; j < 4; ++j)
    for (int m = 0; m < MM; ++m) acc[j][m] = _mm256_setzero_si256();
  const __m256i lo4 = _mm256_set1_epi8(0x0F), x80 = _mm256_set1_epi8(char(g.w_bits == 8 ? 0x80 : 0));
  for (int64_t b = 0; b < Kp / kBlockK; ++b)
    for (int h = 0; h < 64; h += 32) {  // codes b*128 + h + [0, 32) and b*128 + 64 + h + [0, 32)
      __m256i alo[MM], ahi[MM];
      for (int m = 0; m < MM; ++m) {
        alo[m] = ld(x.A.codes.data() + m * Kp + b * kBlockK + h);
        ahi[m] = ld(x.A.codes.data() + m * Kp + b * kBlockK + 64 + h);
      }
      for (int j = 0; j < 4; ++j) {
        __m256i wl, wh;
        if (g.w_bits <= 4) {
          const __m256i v = ld(rows[j] + b * 64 + h);
          wl = _mm256_and_si256(v, lo4);
          wh = _mm256_and_si256(_mm256_srli_epi16(v, 4), lo4);
        } else {
          wl = _mm256_xor_si256(ld(rows[j] + b * kBlockK + h), x80);
          wh = _mm256_xor_si256(ld(rows[j] + b * kBlockK + 64 + h), x80);
        }
        for (int m = 0; m < MM; ++m) acc[j][m] = dot4(dot4(acc[j][m], alo[m], wl), ahi[m], wh);
      }
    }
  for (int m = 0; m < MM; ++m)
    for (int j = 0; j < 4; ++j) tile[m * NR + j] = hsum(acc[j][m]);
}

struct Gemv {
  template <int MM> static void block(const Ctx& x, int64_t n0, int32_t* tile) { gemv_block<MM>(x, n0, tile); }
  static void finish(const Ctx& x, int64_t mr, int64_t n0, int64_t nr, int32_t* tile) { avx2::finish(x, 0, mr, n0, nr, tile); }
};
void gemv(const Ctx& x) { gemv_rows<Gemv>(x); }

bool quantize(const float* x, int64_t K, int64_t Kp, float inv, int32_t za, int bits, uint8_t* out, int64_t stride,
              int32_t* rowsum) {
  const __m256 vinv = _mm256_set1_ps(inv), vza = _mm256_set1_ps(float(za)), hi = _mm256_set1_ps(float((1 << bits) - 1));
  const __m256 zero = _mm256_setzero_ps();
  __m256i sum = _mm256_setzero_si256();
  __m256 nan = _mm256_setzero_ps();
  int64_t k = 0;
  alignas(32) int32_t q8[8];
  const auto at = [&](int64_t i) -> uint8_t& { return out[(i >> 2) * stride + (i & 3)]; };
  for (; k + 8 <= K; k += 8) {
    const __m256 xv = _mm256_loadu_ps(x + k);
    nan = _mm256_or_ps(nan, _mm256_cmp_ps(xv, xv, _CMP_UNORD_Q));
    __m256 v = _mm256_mul_ps(xv, vinv);
    v = _mm256_add_ps(_mm256_round_ps(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC), vza);
    const __m256i q = _mm256_cvtps_epi32(_mm256_min_ps(hi, _mm256_max_ps(v, zero)));
    sum = _mm256_add_epi32(sum, q);
    _mm256_store_si256(reinterpret_cast<__m256i*>(q8), q);
    for (int i = 0; i < 8; ++i) at(k + i) = uint8_t(q8[i]);
  }
  int32_t s = hsum(sum);
  bool ok = _mm256_movemask_ps(nan) == 0;
  const float fh = float((1 << bits) - 1);
  for (; k < K; ++k) {
    ok &= !std::isnan(x[k]);
    const float v = std::nearbyint(x[k] * inv) + float(za);
    const int32_t q = int32_t(v > 0.0f ? (v < fh ? v : fh) : 0.0f);
    at(k) = uint8_t(q);
    s += q;
  }
  for (; k < Kp; ++k) at(k) = 0;
  *rowsum = s;
  return ok;
}

}  // namespace

void run_gemm(const Ctx& x) { gemm(x); }
void run_gemv(const Ctx& x) { gemv(x); }
bool quantize_row(const float* x, int64_t K, int64_t Kp, float inv, int32_t za, int bits, uint8_t* out, int64_t stride,
                  int32_t* rowsum) {
  return quantize(x, K, Kp, inv, za, bits, out, stride, rowsum);
}

}  // namespace zsqfast::cpu::lowbit::avx2
#pragma GCC pop_options
