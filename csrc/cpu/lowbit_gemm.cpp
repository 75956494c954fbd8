// CPU low-bit integer GEMM: unsigned activation codes (u8) x packed unsigned weight codes, int32 accumulation,
// fused zero-point correction and dequantize + bias epilogue. Math: zsqfast/ops/lowbit_gemm.py.
//
// Kernels (runtime ISA dispatch, see isa.h):
//   AVX-512 VNNI  vpdpbusd (u8 activations x s8 weights -> int32, 4 products a lane). Codes of <= 7 bits are
//                 valid s8 as they are; 8-bit weight codes are stored as w ^ 0x80 = w - 128 and corrected by
//                 128 * rowsum(a).
//   AVX2          vpmaddubsw + vpmaddwd (the same u8 x s8 form through saturating int16 pair sums): exact when
//                 2 * amax * |w|max <= 32767, i.e. every combination but A8W7, A8W8 and A7W8 (those run scalar).
//   scalar        plain int32 loops (the fallback and the reference of the two above).
// Shapes: M <= kGemvRows runs a streaming GEMV (packed weights read once, unpacked in registers: one AND and
// one shift per 64 bytes, see zsqfast/ops/lowbit_pack.py); larger M re-lays a panel of 32 weight columns into
// [K/4][32][4] (L2-resident) and reuses it across all rows with a register-blocked microkernel (8 x 32 int32
// accumulators on AVX-512, 4 x 16 on AVX2) that broadcasts 4 activation bytes.
#include <immintrin.h>
#ifdef _OPENMP
#include <omp.h>
#endif

#include <algorithm>
#include <cmath>
#include <cstring>

#include "../kernels.h"
#include "isa.h"
#include "lowbit.h"

namespace zsqfast::cpu::lowbit {
namespace {

constexpr int NR = 32;          // weight panel columns
constexpr int kRowPad = 8;      // activation rows are allocated in multiples of the largest row block
constexpr int64_t kGemvRows = 4;

enum class Path { Scalar, Avx2, Vnni };

Path path_for(int a_bits, int w_bits) {
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
  Ctx(const Gemm& g_, const Acts& A_) : g(g_), A(A_), narrow(true) {
    if (!g.y) return;
    narrow = narrow_epilogue(g, g.per_token ? A.M : 1);
    d64.resize(size_t(g.N));
    d32.resize(size_t(g.N));
    for (int64_t n = 0; n < g.N; ++n) {
      d64[size_t(n)] = g.K * int64_t(g.zw[n]) - int64_t(g.cw[n]);
      d32[size_t(n)] = int32_t(uint32_t(uint64_t(d64[size_t(n)])));
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
void finish_scalar(const Ctx& x, int64_t m0, int64_t mr, int64_t n0, int64_t nr, const int32_t* tile) {
  for (int64_t r = 0; r < mr; ++r)
    for (int64_t j = 0; j < nr; ++j) {
      const int32_t a = tile[r * NR + j];
      if (x.g.y) x.g.y[x.g.y_trans ? (n0 + j) * x.g.ldy + m0 + r : (m0 + r) * x.g.ldy + n0 + j] = x.one(m0 + r, n0 + j, a);
      else x.g.acc[(m0 + r) * x.g.N + n0 + j] = a;
    }
}

int64_t row_bytes(int bits, int64_t Kp) { return bits <= 4 ? Kp / 2 : Kp; }

// Codes of weight row n (Kp of them) in kernel form: u8 codes, 8-bit ones xor 0x80 when `shift8` (as s8).
void unpack_row(const Gemm& g, int64_t n, int64_t Kp, uint8_t* out, bool shift8) {
  const uint8_t* row = g.w + n * row_bytes(g.w_bits, Kp);
  if (g.w_bits >= 5) {
    const uint8_t x = (shift8 && g.w_bits == 8) ? 0x80 : 0;
    for (int64_t k = 0; k < Kp; ++k) out[k] = row[k] ^ x;
    return;
  }
  for (int64_t b = 0; b < Kp / kBlockK; ++b)
    for (int j = 0; j < 64; ++j) {
      const uint8_t v = row[b * 64 + j];
      out[b * kBlockK + j] = v & 15;
      out[b * kBlockK + 64 + j] = v >> 4;
    }
}

// Weight panel of columns [n0, n0 + NR): panel[(q * NR + j) * 4 + i] = code(n0 + j, 4 q + i) (s8 form);
// columns past N are zero.
void relayout(const Gemm& g, int64_t n0, int64_t Kp, uint8_t* panel, uint8_t* tmp) {
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

void scalar_run(const Ctx& x) {
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

}  // namespace
}  // namespace zsqfast::cpu::lowbit

// ------------------------------------------------------------------------------------------ AVX-512 VNNI
#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx512vnni,avx2,fma,f16c")
namespace zsqfast::cpu::lowbit::vnni {
namespace {

inline __m512i bcast4(const uint8_t* p) {
  int32_t v;
  std::memcpy(&v, p, 4);
  return _mm512_set1_epi32(v);
}

constexpr int MR = 8;         // rows of the register block (16 accumulators: measured 1.8x faster on Zen 4
                              // than 12 x 32 with 24 accumulators, 365 vs 200 GMAC/s a core, L1-resident)
constexpr int64_t kKc = 512;  // K block of the panel (KC x NR bytes = 16 KiB: L1-resident)

// tile (R x NR) = packed A block ([k4n][MR][4] bytes, rows < R used) x panel ([k4n][NR][4]).
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
      acc[r][0] = _mm512_dpbusd_epi32(acc[r][0], av, b0);
      acc[r][1] = _mm512_dpbusd_epi32(acc[r][1], av, b1);
    }
  }
#pragma GCC unroll 12
  for (int r = 0; r < R; ++r) {
    _mm512_storeu_si512(tile + r * NR, acc[r][0]);
    _mm512_storeu_si512(tile + r * NR + 16, acc[r][1]);
  }
}

// tile (rows [0, mr)) = or += (K blocking) the register block over k4n groups.
void block(const uint8_t* a, const uint8_t* panel, int64_t k4n, int64_t mr, int32_t* tile, bool add) {
  alignas(64) int32_t part[MR * NR];
  int32_t* out = add ? part : tile;
  if (mr > 4) ukr<8>(a, panel, k4n, out);
  else ukr<4>(a, panel, k4n, out);
  if (add)
    for (int64_t i = 0; i < mr * NR; i += 16)
      _mm512_storeu_si512(tile + i, _mm512_add_epi32(_mm512_loadu_si512(tile + i), _mm512_loadu_si512(part + i)));
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
      c = _mm512_add_epi32(c, _mm512_mullo_epi32(_mm512_maskz_loadu_epi32(k, x.d32.data() + n), za));
      __m512 y = _mm512_mul_ps(_mm512_cvtepi32_ps(c), _mm512_mul_ps(sa, _mm512_maskz_loadu_ps(k, g.sw + n)));
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
  const int threads = threads_for(np);
  // A in register-block order: block i, group q, row r -> packed[(i * Kp / 4 + q) * MR * 4 + r * 4 .. + 4]
  const int64_t nblk = (M + MR - 1) / MR;
  std::vector<uint8_t> packed(static_cast<size_t>(nblk * MR * Kp));
  const int pthreads = threads_for(std::max<int64_t>(1, M * Kp / 65536));
#pragma omp parallel for schedule(static) num_threads(pthreads) if (pthreads > 1)
  for (int64_t i = 0; i < nblk; ++i) {
    if (x.A.kmajor) {  // 4 K-rows x 8 pixels -> 8 x 4 bytes: a byte transpose of 32 bytes per group
      const int64_t ld = x.A.ldk;
      for (int64_t q = 0; q < Kp / 4; ++q) {
        const uint8_t* s0 = x.A.codes.data() + 4 * q * ld + i * MR;
        const __m128i r0 = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(s0));
        const __m128i r1 = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(s0 + ld));
        const __m128i r2 = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(s0 + 2 * ld));
        const __m128i r3 = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(s0 + 3 * ld));
        const __m128i a = _mm_unpacklo_epi8(r0, r1), b = _mm_unpacklo_epi8(r2, r3);
        uint8_t* d = packed.data() + (i * Kp / 4 + q) * MR * 4;
        _mm_storeu_si128(reinterpret_cast<__m128i*>(d), _mm_unpacklo_epi16(a, b));
        _mm_storeu_si128(reinterpret_cast<__m128i*>(d + 16), _mm_unpackhi_epi16(a, b));
      }
      continue;
    }
    for (int r = 0; r < MR; ++r) {
      const uint32_t* src = reinterpret_cast<const uint32_t*>(x.A.codes.data() + (i * MR + r) * Kp);
      uint32_t* dst = reinterpret_cast<uint32_t*>(packed.data() + i * MR * Kp) + r;
      for (int64_t q = 0; q < Kp / 4; ++q) dst[q * MR] = src[q];
    }
  }
#pragma omp parallel num_threads(threads) if (threads > 1)
  {
    std::vector<uint8_t> panel(static_cast<size_t>(Kp * NR));
    std::vector<int32_t> tiles(static_cast<size_t>(nblk * MR * NR));
#pragma omp for schedule(static)
    for (int64_t p = 0; p < np; ++p) {
      const int64_t n0 = p * NR, nr = std::min<int64_t>(NR, g.N - n0);
      relayout16(g, n0, Kp, panel.data());
      for (int64_t k0 = 0; k0 < Kp; k0 += kKc) {  // a KC x NR slice of the panel stays in L1 across row blocks
        const int64_t q0 = k0 / 4, k4n = std::min<int64_t>(kKc, Kp - k0) / 4;
        for (int64_t m0 = 0; m0 < M; m0 += MR) {
          const int64_t mr = std::min<int64_t>(MR, M - m0);
          const uint8_t* a = packed.data() + m0 * Kp + q0 * MR * 4;
          const uint8_t* b = panel.data() + q0 * NR * 4;
          int32_t* tile = tiles.data() + m0 * NR;
          block(a, b, k4n, mr, tile, k0 > 0);
          if (k0 + kKc >= Kp) finish(x, m0, mr, n0, nr, tile);
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
      for (int m = 0; m < MM; ++m) acc[j][m] = _mm512_dpbusd_epi32(_mm512_dpbusd_epi32(acc[j][m], alo[m], wl), ahi[m], wh);
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

void quantize(const float* x, int64_t K, float inv, int32_t za, int bits, uint8_t* out, int32_t* rowsum) {
  const __m512 vinv = _mm512_set1_ps(inv), vza = _mm512_set1_ps(float(za)), hi = _mm512_set1_ps(float((1 << bits) - 1));
  const __m512 zero = _mm512_setzero_ps();
  __m512i sum = _mm512_setzero_si512();
  for (int64_t k = 0; k < K; k += 16) {
    const __mmask16 m = K - k >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << (K - k)) - 1);
    __m512 v = _mm512_mul_ps(_mm512_maskz_loadu_ps(m, x + k), vinv);
    v = _mm512_add_ps(_mm512_roundscale_ps(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC), vza);
    const __m512i q = _mm512_maskz_mov_epi32(m, _mm512_cvtps_epi32(_mm512_min_ps(hi, _mm512_max_ps(v, zero))));
    sum = _mm512_add_epi32(sum, q);
    _mm512_mask_cvtepi32_storeu_epi8(out + k, m, q);
  }
  *rowsum = _mm512_reduce_add_epi32(sum);
}

}  // namespace
}  // namespace zsqfast::cpu::lowbit::vnni
#pragma GCC pop_options

// ------------------------------------------------------------------------------------------------- AVX2
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

void quantize(const float* x, int64_t K, float inv, int32_t za, int bits, uint8_t* out, int32_t* rowsum) {
  const __m256 vinv = _mm256_set1_ps(inv), vza = _mm256_set1_ps(float(za)), hi = _mm256_set1_ps(float((1 << bits) - 1));
  const __m256 zero = _mm256_setzero_ps();
  __m256i sum = _mm256_setzero_si256();
  int64_t k = 0;
  alignas(32) int32_t q8[8];
  for (; k + 8 <= K; k += 8) {
    __m256 v = _mm256_mul_ps(_mm256_loadu_ps(x + k), vinv);
    v = _mm256_add_ps(_mm256_round_ps(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC), vza);
    const __m256i q = _mm256_cvtps_epi32(_mm256_min_ps(hi, _mm256_max_ps(v, zero)));
    sum = _mm256_add_epi32(sum, q);
    _mm256_store_si256(reinterpret_cast<__m256i*>(q8), q);
    for (int i = 0; i < 8; ++i) out[k + i] = uint8_t(q8[i]);
  }
  int32_t s = hsum(sum);
  const float fh = float((1 << bits) - 1);
  for (; k < K; ++k) {
    const float v = std::nearbyint(x[k] * inv) + float(za);
    const int32_t q = int32_t(v > 0.0f ? (v < fh ? v : fh) : 0.0f);
    out[k] = uint8_t(q);
    s += q;
  }
  *rowsum = s;
}

}  // namespace
}  // namespace zsqfast::cpu::lowbit::avx2
#pragma GCC pop_options

// --------------------------------------------------------------------------------------- engine, entries
namespace zsqfast::cpu::lowbit {

int threads_for(int64_t items) {
#ifdef _OPENMP
  if (omp_in_parallel()) return 1;
#endif
  return int(std::max<int64_t>(1, std::min<int64_t>(num_threads(), items)));
}

void Acts::resize(int64_t M_, int64_t K) {
  M = M_;
  lda = padded_k(K);
  codes.assign(size_t((M + kRowPad - 1) / kRowPad * kRowPad * lda), 0);
  rowsum.assign(size_t(M), 0);
  ldk = 0;
  kmajor = false;
}

void Acts::resize_kmajor(int64_t M_, int64_t K) {
  M = M_;
  lda = padded_k(K);
  ldk = (M + 7) / 8 * 8;
  codes.assign(size_t(lda * ldk), 0);
  rowsum.assign(size_t(M), 0);
  kmajor = true;
}

bool narrow_epilogue(const Gemm& g, int64_t n_za) {
  const int64_t qa = (int64_t(1) << g.a_bits) - 1, qw = (int64_t(1) << g.w_bits) - 1;
  int64_t da = 0, dw = 0;
  for (int64_t i = 0; i < n_za; ++i) da = std::max<int64_t>({da, std::llabs(g.za[i]), std::llabs(qa - g.za[i])});
  for (int64_t n = 0; n < g.N; ++n) dw = std::max<int64_t>({dw, std::llabs(g.zw[n]), std::llabs(qw - g.zw[n])});
  return (long double)(g.K) * da * dw < 2147483648.0L;
}

void quantize_rows(const float* x, int64_t ldx, int64_t M, int64_t K, const float* inv, const int32_t* za,
                   bool per_token, int bits, Acts& acts) {
  acts.resize(M, K);
  const Isa isa = active_isa();
  const int threads = threads_for(std::max<int64_t>(1, M * K / 65536));
#pragma omp parallel for schedule(static) num_threads(threads) if (threads > 1)
  for (int64_t m = 0; m < M; ++m) {
    const float iv = inv[per_token ? m : 0];
    const int32_t z = za[per_token ? m : 0];
    const float* xr = x + m * ldx;
    uint8_t* out = acts.row(m);
    if (isa >= Isa::Avx512) {
      vnni::quantize(xr, K, iv, z, bits, out, &acts.rowsum[size_t(m)]);
    } else if (isa == Isa::Avx2) {
      avx2::quantize(xr, K, iv, z, bits, out, &acts.rowsum[size_t(m)]);
    } else {
      const float fh = float((1 << bits) - 1);
      int32_t s = 0;
      for (int64_t k = 0; k < K; ++k) {
        const float v = std::nearbyint(xr[k] * iv) + float(z);
        const int32_t q = int32_t(v > 0.0f ? (v < fh ? v : fh) : 0.0f);
        out[k] = uint8_t(q);
        s += q;
      }
      acts.rowsum[size_t(m)] = s;
    }
  }
}

void run(const Gemm& g, const Acts& acts) {
  if (acts.M <= 0 || g.N <= 0) return;
  const Path path = path_for(g.a_bits, g.w_bits);
  const bool gemv = acts.M <= kGemvRows;
  if (acts.kmajor && (path != Path::Vnni || gemv)) {  // only the VNNI GEMM packs K-major codes: transpose
    Acts rm;
    rm.resize(acts.M, acts.lda);
    for (int64_t k = 0; k < acts.lda; ++k)
      for (int64_t m = 0; m < acts.M; ++m) rm.row(m)[k] = acts.codes[size_t(k * acts.ldk + m)];
    rm.rowsum = acts.rowsum;
    return run(g, rm);
  }
  const Ctx x(g, acts);
  if (path == Path::Vnni) return gemv ? vnni::gemv(x) : vnni::gemm(x);
  if (path == Path::Avx2) return gemv ? avx2::gemv(x) : avx2::gemm(x);
  scalar_run(x);
}

}  // namespace zsqfast::cpu::lowbit

namespace zsqfast::cpu {

void lowbit_gemm(const uint8_t* a, const uint8_t* w, int w_bits, int64_t M, int64_t N, int64_t K, int32_t* acc) {
  lowbit::Acts acts;
  acts.resize(M, K);
  for (int64_t m = 0; m < M; ++m) {
    std::memcpy(acts.row(m), a + m * K, size_t(K));
    int32_t s = 0;
    for (int64_t k = 0; k < K; ++k) s += a[m * K + k];
    acts.rowsum[size_t(m)] = s;
  }
  lowbit::Gemm g{w, w_bits, 8, N, K};
  g.acc = acc;
  lowbit::run(g, acts);
}

void lowbit_linear(const float* x, const uint8_t* w, int w_bits, int64_t M, int64_t N, int64_t K,
                   const float* w_scale, const int32_t* w_zero, const int32_t* w_colsum, const float* a_scale,
                   const float* a_inv_scale, const int32_t* a_zero, bool per_token, int a_bits, const float* bias,
                   float* y) {
  lowbit::Acts acts;
  lowbit::quantize_rows(x, K, M, K, a_inv_scale, a_zero, per_token, a_bits, acts);
  lowbit::Gemm g{w, w_bits, a_bits, N, K};
  g.y = y;
  g.ldy = N;
  g.sw = w_scale;
  g.zw = w_zero;
  g.cw = w_colsum;
  g.bias = bias;
  g.sa = a_scale;
  g.za = a_zero;
  g.per_token = per_token;
  lowbit::run(g, acts);
}

}  // namespace zsqfast::cpu
