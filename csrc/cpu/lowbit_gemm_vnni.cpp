// AVX-512 VNNI kernels of the CPU low-bit GEMM (design: lowbit_gemm.cpp; shared internals: lowbit_impl.h).
#include <immintrin.h>

#include <cmath>

#include "lowbit_impl.h"

#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx512vnni,avx2,fma,f16c")
namespace zsqfast::cpu::lowbit::vnni {
namespace {

#include "vnni_ops.inc"

// MR = 8 rows of the register block (16 accumulators). No K blocking: each row block runs the whole K against
// the L2-resident panel (Kp x NR bytes, 128 KiB at K = 4096) with its accumulators in registers; measured as
// fast as or faster than 512-deep K blocks with tile round trips (M = 1024, K = N = 4096). Panels go in groups
// of up to 4 (512 KiB of L2 at most, at least one group a thread), each row block running against all of them
// in turn: A streams from L3 once a group (measured ~3 % faster than one panel at a time at K = N = 4096).

// tile (R x NR) = packed A block ([k4n][MR][4] bytes, rows < R used) x panel ([k4n][NR][4]).
template <int R>
__attribute__((noinline)) void ukr(const uint8_t* a, const uint8_t* panel, int64_t k4n, int32_t* tile) {
  __m512i acc[R][2];
#pragma GCC unroll 12
  for (int r = 0; r < R; ++r) acc[r][0] = acc[r][1] = _mm512_setzero_si512();
  for (int64_t q = 0; q < k4n; ++q) {
    const __m512i b0 = _mm512_loadu_si512(panel + q * NR * 4), b1 = _mm512_loadu_si512(panel + q * NR * 4 + 64);
#pragma GCC unroll 12
    for (int r = 0; r < R; ++r) {
      const __m512i av = bcast4(a + q * MR * 4 + r * 4);
      acc[r][0] = dpbusd(acc[r][0], av, b0);
      acc[r][1] = dpbusd(acc[r][1], av, b1);
    }
  }
#pragma GCC unroll 12
  for (int r = 0; r < R; ++r) {
    _mm512_storeu_si512(tile + r * NR, acc[r][0]);
    _mm512_storeu_si512(tile + r * NR + 16, acc[r][1]);
  }
}

// 16 consecutive codes-quads (64 codes, chunk t of the row: codes 64 t .. 64 t + 63) of weight row `row`, s8 form.
inline __m512i chunk(const uint8_t* row, int bits, int64_t t) {
  if (bits <= 4) {  // chunk t = low (t even) or high (t odd) nibbles of the 64 bytes of block t / 2
    const __m512i v = _mm512_loadu_si512(row + (t >> 1) * 64);
    return _mm512_and_si512((t & 1) ? _mm512_srli_epi16(v, 4) : v, _mm512_set1_epi8(0x0F));
  }
  const __m512i v = _mm512_loadu_si512(row + t * 64);
  return bits == 8 ? _mm512_xor_si512(v, _mm512_set1_epi8(char(0x80))) : v;
}

// relayout() with 16 x 16 transposes of 4-byte groups (rows j0 .. j0 + 15, groups q0 .. q0 + 15 at a time).
void relayout16(const Gemm& g, int64_t n0, int64_t Kp, uint8_t* panel) {
  const int64_t rb = row_bytes(g.w_bits, Kp);
  for (int j0 = 0; j0 < NR; j0 += 16)
    for (int64_t t = 0; t < Kp / 64; ++t) {
      __m512i r[16], u[16];
      for (int i = 0; i < 16; ++i)
        r[i] = n0 + j0 + i < g.N ? chunk(g.w + (n0 + j0 + i) * rb, g.w_bits, t) : _mm512_setzero_si512();
      for (int i = 0; i < 16; i += 2) {
        u[i] = _mm512_unpacklo_epi32(r[i], r[i + 1]);
        u[i + 1] = _mm512_unpackhi_epi32(r[i], r[i + 1]);
      }
      for (int i = 0; i < 16; i += 4) {  // r[i + c]: rows i .. i+3, group 4 L + c in lane L
        r[i] = _mm512_unpacklo_epi64(u[i], u[i + 2]);
        r[i + 1] = _mm512_unpackhi_epi64(u[i], u[i + 2]);
        r[i + 2] = _mm512_unpacklo_epi64(u[i + 1], u[i + 3]);
        r[i + 3] = _mm512_unpackhi_epi64(u[i + 1], u[i + 3]);
      }
      for (int c = 0; c < 4; ++c) {
        const __m512i v0 = _mm512_shuffle_i32x4(r[c], r[4 + c], 0x88), w0 = _mm512_shuffle_i32x4(r[c], r[4 + c], 0xDD);
        const __m512i v1 = _mm512_shuffle_i32x4(r[8 + c], r[12 + c], 0x88);
        const __m512i w1 = _mm512_shuffle_i32x4(r[8 + c], r[12 + c], 0xDD);
        uint8_t* out = panel + ((t * 16) * NR + j0) * 4;
        _mm512_storeu_si512(out + (c)*NR * 4, _mm512_shuffle_i32x4(v0, v1, 0x88));
        _mm512_storeu_si512(out + (8 + c) * NR * 4, _mm512_shuffle_i32x4(v0, v1, 0xDD));
        _mm512_storeu_si512(out + (4 + c) * NR * 4, _mm512_shuffle_i32x4(w0, w1, 0x88));
        _mm512_storeu_si512(out + (12 + c) * NR * 4, _mm512_shuffle_i32x4(w0, w1, 0xDD));
      }
    }
}

// y[(n0 + j) * ldy + m0 + r] = ft[r * NR + j]: 8 x 8 transposes when the block has 8 rows.
void store_transposed(const Gemm& g, const float* ft, int64_t m0, int64_t mr, int64_t n0, int64_t nr) {
  if (mr != 8) {
    for (int64_t j = 0; j < nr; ++j)
      for (int64_t r = 0; r < mr; ++r) g.y[(n0 + j) * g.ldy + m0 + r] = ft[r * NR + j];
    return;
  }
  for (int64_t j0 = 0; j0 < nr; j0 += 8) {
    __m256 v[8], t[8];
    for (int r = 0; r < 8; ++r) v[r] = _mm256_load_ps(ft + r * NR + j0);
    for (int r = 0; r < 8; r += 2) {
      t[r] = _mm256_unpacklo_ps(v[r], v[r + 1]);
      t[r + 1] = _mm256_unpackhi_ps(v[r], v[r + 1]);
    }
    for (int h = 0; h < 8; h += 4) {
      v[h] = _mm256_shuffle_ps(t[h], t[h + 2], 0x44);
      v[h + 1] = _mm256_shuffle_ps(t[h], t[h + 2], 0xEE);
      v[h + 2] = _mm256_shuffle_ps(t[h + 1], t[h + 3], 0x44);
      v[h + 3] = _mm256_shuffle_ps(t[h + 1], t[h + 3], 0xEE);
    }
    for (int c = 0; c < 4; ++c) {  // column c from v[c] (rows 0-3) and v[4 + c] (rows 4-7); c + 4 from the high lanes
      const __m256 lo = _mm256_permute2f128_ps(v[c], v[4 + c], 0x20), hi = _mm256_permute2f128_ps(v[c], v[4 + c], 0x31);
      if (j0 + c < nr) _mm256_storeu_ps(g.y + (n0 + j0 + c) * g.ldy + m0, lo);
      if (j0 + c + 4 < nr) _mm256_storeu_ps(g.y + (n0 + j0 + c + 4) * g.ldy + m0, hi);
    }
  }
}

void finish(const Ctx& x, int64_t m0, int64_t mr, int64_t n0, int64_t nr, int32_t* tile) {
  const Gemm& g = x.g;
  if (g.w_bits == 8)
    for (int64_t r = 0; r < mr; ++r) {
      const __m512i c = _mm512_set1_epi32(128 * x.A.rowsum[size_t(m0 + r)]);
      for (int j = 0; j < NR; j += 16)
        _mm512_storeu_si512(tile + r * NR + j, _mm512_add_epi32(_mm512_loadu_si512(tile + r * NR + j), c));
    }
  if (!g.y) {
    for (int64_t r = 0; r < mr; ++r)
      for (int64_t j = 0; j < nr; j += 16) {
        const __mmask16 k = nr - j >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << (nr - j)) - 1);
        _mm512_mask_storeu_epi32(g.acc + (m0 + r) * g.N + n0 + j, k, _mm512_loadu_si512(tile + r * NR + j));
      }
    return;
  }
  if (!x.narrow) return finish_scalar(x, m0, mr, n0, nr, tile);
  alignas(64) float ft[MR * NR];  // y_trans: the rows of y, stored transposed below
  for (int64_t r = 0; r < mr; ++r) {
    const int64_t m = m0 + r;
    const __m512i ra = _mm512_set1_epi32(x.A.rowsum[size_t(m)]), za = _mm512_set1_epi32(g.za[x.pick(m)]);
    const __m512 sa = _mm512_set1_ps(g.sa[x.pick(m)]);
    for (int64_t j = 0; j < nr; j += 16) {
      const __mmask16 k = nr - j >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << (nr - j)) - 1);
      const int64_t n = n0 + j;
      __m512i c = _mm512_loadu_si512(tile + r * NR + j);
      c = _mm512_sub_epi32(c, _mm512_mullo_epi32(_mm512_maskz_loadu_epi32(k, g.zw + n), ra));
      const __m512i zd = g.per_token ? _mm512_mullo_epi32(_mm512_maskz_loadu_epi32(k, x.d32.data() + n), za)
                                     : _mm512_maskz_loadu_epi32(k, x.zd32.data() + n);
      const __m512 s = g.per_token ? _mm512_mul_ps(sa, _mm512_maskz_loadu_ps(k, g.sw + n)) : _mm512_maskz_loadu_ps(k, x.s.data() + n);
      c = _mm512_add_epi32(c, zd);
      __m512 y = _mm512_mul_ps(_mm512_cvtepi32_ps(c), s);
      if (g.bias) y = _mm512_add_ps(y, _mm512_maskz_loadu_ps(k, g.bias + n));
      if (g.y_trans) _mm512_store_ps(ft + r * NR + j, y);
      else _mm512_mask_storeu_ps(g.y + m * g.ldy + n, k, y);
    }
  }
  if (g.y_trans) store_transposed(g, ft, m0, mr, n0, nr);
}

void gemm(const Ctx& x) {
  const Gemm& g = x.g;
  const int64_t Kp = x.A.lda, M = x.A.M, np = (g.N + NR - 1) / NR;
  const int64_t kPanels = std::clamp<int64_t>(std::min<int64_t>((int64_t(512) << 10) / (Kp * NR), np / threads_for(np)), 1, 4);
  const int64_t ng = (np + kPanels - 1) / kPanels;
  const int threads = threads_for(ng);
  // A in register-block order: block i, group q, row r -> packed[(i * Kp / 4 + q) * MR * 4 + r * 4 .. + 4]
  const int64_t nblk = (M + MR - 1) / MR;
  std::vector<uint8_t, NoInit<uint8_t>> own(x.A.blocked ? 0 : size_t(nblk * MR * Kp));
  const uint8_t* packed = x.A.blocked ? x.A.codes.data() : own.data();  // blocked: quantized in this order
  const int pthreads = x.A.blocked ? 1 : threads_for(std::max<int64_t>(1, M * Kp / 65536));
#pragma omp parallel for schedule(static) num_threads(pthreads) if (pthreads > 1)
  for (int64_t i = 0; i < (x.A.blocked ? 0 : nblk); ++i) {
    if (x.A.kmajor) {  // 4 K-rows x 8 pixels -> 8 x 4 bytes: a byte transpose of 32 bytes per group
      const int64_t ld = x.A.ldk;
      for (int64_t q = 0; q < Kp / 4; ++q) {
        const uint8_t* s0 = x.A.codes.data() + 4 * q * ld + i * MR;
        const __m128i r0 = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(s0));
        const __m128i r1 = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(s0 + ld));
        const __m128i r2 = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(s0 + 2 * ld));
        const __m128i r3 = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(s0 + 3 * ld));
        const __m128i a = _mm_unpacklo_epi8(r0, r1), b = _mm_unpacklo_epi8(r2, r3);
        uint8_t* d = own.data() + (i * Kp / 4 + q) * MR * 4;
        _mm_storeu_si128(reinterpret_cast<__m128i*>(d), _mm_unpacklo_epi16(a, b));
        _mm_storeu_si128(reinterpret_cast<__m128i*>(d + 16), _mm_unpackhi_epi16(a, b));
      }
      continue;
    }
    for (int r = 0; r < MR; ++r) {
      const uint32_t* src = reinterpret_cast<const uint32_t*>(x.A.codes.data() + (i * MR + r) * Kp);
      uint32_t* dst = reinterpret_cast<uint32_t*>(own.data() + i * MR * Kp) + r;
      for (int64_t q = 0; q < Kp / 4; ++q) dst[q * MR] = src[q];
    }
  }
#pragma omp parallel num_threads(threads) if (threads > 1)
  {
    std::vector<uint8_t> panels(static_cast<size_t>(kPanels * Kp * NR));
    alignas(64) int32_t tile[MR * NR];
#pragma omp for schedule(static)
    for (int64_t pg = 0; pg < ng; ++pg) {
      const int64_t p0 = pg * kPanels, pn = std::min<int64_t>(kPanels, np - p0);
      for (int64_t p = 0; p < pn; ++p) relayout16(g, (p0 + p) * NR, Kp, panels.data() + p * Kp * NR);
      for (int64_t m0 = 0; m0 < M; m0 += MR) {  // the row block (MR x Kp bytes) stays in L1 across the panels
        const int64_t mr = std::min<int64_t>(MR, M - m0);
        for (int64_t p = 0; p < pn; ++p) {
          const int64_t n0 = (p0 + p) * NR;
          if (mr > 4) ukr<8>(packed + m0 * Kp, panels.data() + p * Kp * NR, Kp / 4, tile);
          else ukr<4>(packed + m0 * Kp, panels.data() + p * Kp * NR, Kp / 4, tile);
          finish(x, m0, mr, n0, std::min<int64_t>(NR, g.N - n0), tile);
        }
      }
    }
  }
}

// Rows [0, MM) against weight rows [n0, n0 + 4): packed weights streamed once, unpacked in registers.
template <int MM>
void gemv_block(const Ctx& x, int64_t n0, int32_t* tile) {
  const Gemm& g = x.g;
  const int64_t Kp = x.A.lda, rb = row_bytes(g.w_bits, Kp);
  const uint8_t* rows[4];
  for (int j = 0; j < 4; ++j) rows[j] = g.w + std::min(n0 + j, g.N - 1) * rb;
  __m512i acc[4][MM];
  for (int j = 0; j < 4; ++j)
    for (int m = 0; m < MM; ++m) acc[j][m] = _mm512_setzero_si512();
  const __m512i lo4 = _mm512_set1_epi8(0x0F), x80 = _mm512_set1_epi8(char(g.w_bits == 8 ? 0x80 : 0));
  for (int64_t b = 0; b < Kp / kBlockK; ++b) {
    __m512i alo[MM], ahi[MM];
    for (int m = 0; m < MM; ++m) {
      alo[m] = _mm512_loadu_si512(x.A.codes.data() + m * Kp + b * kBlockK);
      ahi[m] = _mm512_loadu_si512(x.A.codes.data() + m * Kp + b * kBlockK + 64);
    }
    for (int j = 0; j < 4; ++j) {
      __m512i wl, wh;
      if (g.w_bits <= 4) {
        const __m512i v = _mm512_loadu_si512(rows[j] + b * 64);
        wl = _mm512_and_si512(v, lo4);
        wh = _mm512_and_si512(_mm512_srli_epi16(v, 4), lo4);
      } else {
        wl = _mm512_xor_si512(_mm512_loadu_si512(rows[j] + b * kBlockK), x80);
        wh = _mm512_xor_si512(_mm512_loadu_si512(rows[j] + b * kBlockK + 64), x80);
      }
      for (int m = 0; m < MM; ++m) acc[j][m] = dpbusd(dpbusd(acc[j][m], alo[m], wl), ahi[m], wh);
    }
  }
  for (int m = 0; m < MM; ++m)
    for (int j = 0; j < 4; ++j) tile[m * NR + j] = _mm512_reduce_add_epi32(acc[j][m]);
}

struct Gemv {
  template <int MM> static void block(const Ctx& x, int64_t n0, int32_t* tile) { gemv_block<MM>(x, n0, tile); }
  static void finish(const Ctx& x, int64_t mr, int64_t n0, int64_t nr, int32_t* tile) { vnni::finish(x, 0, mr, n0, nr, tile); }
};
void gemv(const Ctx& x) { gemv_rows<Gemv>(x); }

bool quantize(const float* x, int64_t K, int64_t Kp, float inv, int32_t za, int bits, uint8_t* out, int64_t stride,
              int32_t* rowsum) {
  const __m512 vinv = _mm512_set1_ps(inv), vza = _mm512_set1_ps(float(za)), hi = _mm512_set1_ps(float((1 << bits) - 1));
  const __m512 zero = _mm512_setzero_ps();
  __m512i sum = _mm512_setzero_si512();
  __mmask16 nan = 0;
  for (int64_t k = 0; k < Kp; k += 16) {
    const __mmask16 m = K - k >= 16 ? __mmask16(0xFFFF) : K > k ? __mmask16((1u << (K - k)) - 1) : __mmask16(0);
    _mm_prefetch(reinterpret_cast<const char*>(x + k) + 4096, _MM_HINT_T0);  // x streams from memory: 4 KiB ahead
    const __m512 xv = _mm512_maskz_loadu_ps(m, x + k);
    nan |= _mm512_cmp_ps_mask(xv, xv, _CMP_UNORD_Q);
    __m512 v = _mm512_mul_ps(xv, vinv);
    v = _mm512_add_ps(_mm512_roundscale_ps(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC), vza);
    const __m512i q = _mm512_maskz_mov_epi32(m, _mm512_cvtps_epi32(_mm512_min_ps(hi, _mm512_max_ps(v, zero))));
    sum = _mm512_add_epi32(sum, q);
    const __m128i b = _mm512_cvtepi32_epi8(q);  // 16 codes = 4 groups of 4
    uint8_t* o = out + (k / 4) * stride;
    if (stride == 4) {
      _mm_storeu_si128(reinterpret_cast<__m128i*>(o), b);
    } else {
      const int32_t g[4] = {_mm_extract_epi32(b, 0), _mm_extract_epi32(b, 1), _mm_extract_epi32(b, 2),
                            _mm_extract_epi32(b, 3)};
      for (int i = 0; i < 4; ++i) std::memcpy(o + i * stride, g + i, 4);
    }
  }
  *rowsum = _mm512_reduce_add_epi32(sum);
  return nan == 0;
}

}  // namespace

void run_gemm(const Ctx& x) { gemm(x); }
void run_gemv(const Ctx& x) { gemv(x); }
bool quantize_row(const float* x, int64_t K, int64_t Kp, float inv, int32_t za, int bits, uint8_t* out, int64_t stride,
                  int32_t* rowsum) {
  return quantize(x, K, Kp, inv, za, bits, out, stride, rowsum);
}

}  // namespace zsqfast::cpu::lowbit::vnni
#pragma GCC pop_options
