// Implicit-GEMM low-bit convolution on AVX-512 VNNI, NHWC (math: zsqfast/ops/lowbit_conv2d.py).
//
// Taken by lowbit_conv2d for groups == 1, exact padding (no padding, or 0 <= za <= 2^ab - 1) and an epilogue
// whose exact result fits int32 (see narrow_epilogue); everything else keeps lowbit_conv2d.cpp's paths.
//   1. Codes once per call, NHWC: X[pixel][c] = clamp(rne(x * inv) + za, 0, 2^ab - 1) for c < C, 0 for
//      C <= c < Cs (Cs = C rounded up to 16), read from NCHW (16 x 16 byte transposes) or NHWC input (8-bit
//      weights only: a per-pixel code sum S[pixel]).
//   2. Weights in the implicit-GEMM order k' = t Cs + c (tap t = i kw + j; PyTorch's order is k = c kh kw + t),
//      as panels [Kc/4][NR][4] of s8 CENTRED codes uw - zw (|.| <= 127 up to 7 bits; 8 bits: uw - 128), pad
//      channels 0. Built once per weight CONTENT: a cache keyed by the packed pointer and verified by comparing
//      the packed bytes and zero points on every call (exact: a changed or reallocated weight is never served
//      stale).
//   3. GEMM over M = B Ho Wo output pixels (rows in NHWC order), row blocks of 8: X is spatially padded (the
//      ring holds the code za, 0 in the pad channels), so row r's tap t is at corner[r] + offset[t]; the
//      microkernel broadcasts 4 codes of each row and multiplies them with the panel (vpdpbusd); no im2col. Threads split the row blocks
//      (N only when there are too few of them).
//   4. Fused epilogue (int32: exact since the result fits), y NHWC: with acc = sum ua (uw - zw),
//      c = sum (ua - za)(uw - zw) = acc + za (K zw - cw) (no activation row sums), y = fp32(c) fp32(sa sw) + bias.
//      8 bits: acc = sum ua (uw - 128), c = acc + 128 ra - zw ra + za (K zw - cw), ra = sum_t S[tap pixel]
//      (C za for a padded tap).
#ifdef _OPENMP
#include <omp.h>
#endif
#include <immintrin.h>

#include <algorithm>
#include <cstring>
#include <memory>
#include <mutex>
#include <unordered_map>

#include "lowbit_conv.h"
#include "lowbit_impl.h"

#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx512vnni,avx2,fma,f16c")
namespace zsqfast::cpu::lowbit {
namespace {

#include "vnni_ops.inc"

// 16 codes of 16 floats (lanes outside `m` give code 0); NaN lanes flagged in *nan.
struct Quant {
  __m512 inv, za, hi, zero;
  Quant(float iv, int32_t z, int bits)
      : inv(_mm512_set1_ps(iv)), za(_mm512_set1_ps(float(z))), hi(_mm512_set1_ps(float((1 << bits) - 1))),
        zero(_mm512_setzero_ps()) {}
  __m128i operator()(const float* x, __mmask16 m, __mmask16* nan) const {  // same fp32 steps as quantize()
    const __m512 xv = _mm512_maskz_loadu_ps(m, x);
    *nan |= _mm512_cmp_ps_mask(xv, xv, _CMP_UNORD_Q);
    __m512 v = _mm512_mul_ps(xv, inv);
    v = _mm512_add_ps(_mm512_roundscale_ps(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC), za);
    return _mm512_cvtepi32_epi8(_mm512_maskz_mov_epi32(m, _mm512_cvtps_epi32(_mm512_min_ps(hi, _mm512_max_ps(v, zero)))));
  }
};

// In-register transpose of 16 x 16 bytes: byte j of r[i] -> byte i of r[j] (unpack stages of 8, 16, 32, 64 bits).
inline void transpose16(__m128i r[16]) {
  __m128i a[16], b[16], c[16];
  for (int i = 0; i < 8; ++i) {  // a[2i] / a[2i + 1]: rows 2i, 2i + 1 interleaved, columns 0-7 / 8-15
    a[2 * i] = _mm_unpacklo_epi8(r[2 * i], r[2 * i + 1]);
    a[2 * i + 1] = _mm_unpackhi_epi8(r[2 * i], r[2 * i + 1]);
  }
  for (int i = 0; i < 4; ++i) {  // b[4i + g]: rows 4i .. 4i + 3 of columns 4g .. 4g + 3
    b[4 * i] = _mm_unpacklo_epi16(a[4 * i], a[4 * i + 2]);
    b[4 * i + 1] = _mm_unpackhi_epi16(a[4 * i], a[4 * i + 2]);
    b[4 * i + 2] = _mm_unpacklo_epi16(a[4 * i + 1], a[4 * i + 3]);
    b[4 * i + 3] = _mm_unpackhi_epi16(a[4 * i + 1], a[4 * i + 3]);
  }
  for (int h = 0; h < 2; ++h)  // c[8h + q]: rows 8h .. 8h + 7 of columns 2q, 2q + 1
    for (int g = 0; g < 4; ++g) {
      c[8 * h + 2 * g] = _mm_unpacklo_epi32(b[8 * h + g], b[8 * h + 4 + g]);
      c[8 * h + 2 * g + 1] = _mm_unpackhi_epi32(b[8 * h + g], b[8 * h + 4 + g]);
    }
  for (int q = 0; q < 8; ++q) {
    r[2 * q] = _mm_unpacklo_epi64(c[q], c[8 + q]);
    r[2 * q + 1] = _mm_unpackhi_epi64(c[q], c[8 + q]);
  }
}

inline int64_t sum16(__m128i v) {  // sum of 16 bytes
  const __m128i s = _mm_sad_epu8(v, _mm_setzero_si128());
  return _mm_cvtsi128_si64(s) + _mm_extract_epi64(s, 1);
}

// Codes of images [b0, b1) into X (and, when S, the per-pixel sums). NCHW input: blocks of 16 channels x 16
// pixels quantized along the planes and transposed; NHWC input: pixel by pixel. Then the pad ring.
bool quantize_nhwc(const ImplicitConv& c, const Geo& G, int64_t b0, int64_t b1, const uint8_t* padrow, uint8_t* X,
                   int32_t* S) {
  const Quant qz(c.inv, c.za, c.a_bits);
  const int64_t HW = c.H * c.W, Cs = G.Cs;
  __mmask16 nan = 0;
  for (int64_t b = b0; b < b1; ++b) {
    const float* xb = c.x + b * c.C * HW;
    if (c.x_nhwc && c.C == Cs && !S) {  // image rows are contiguous runs of W C codes: one flat loop a row
      for (int64_t h = 0; h < c.H; ++h) {
        const float* xr = xb + h * c.W * c.C;
        uint8_t* o = X + G.pix(b, h + c.ph, c.pw) * Cs;
        const int64_t n = c.W * c.C;  // a multiple of 16
        int64_t k = 0;
        for (; k + 64 <= n; k += 64) {
          const __m128i q0 = qz(xr + k, 0xFFFF, &nan), q1 = qz(xr + k + 16, 0xFFFF, &nan);
          const __m128i q2 = qz(xr + k + 32, 0xFFFF, &nan), q3 = qz(xr + k + 48, 0xFFFF, &nan);
          _mm_storeu_si128(reinterpret_cast<__m128i*>(o + k), q0);
          _mm_storeu_si128(reinterpret_cast<__m128i*>(o + k + 16), q1);
          _mm_storeu_si128(reinterpret_cast<__m128i*>(o + k + 32), q2);
          _mm_storeu_si128(reinterpret_cast<__m128i*>(o + k + 48), q3);
        }
        for (; k < n; k += 16) _mm_storeu_si128(reinterpret_cast<__m128i*>(o + k), qz(xr + k, 0xFFFF, &nan));
      }
    } else if (c.x_nhwc) {
      for (int64_t h = 0; h < c.H; ++h)
        for (int64_t w = 0; w < c.W; ++w) {
          const int64_t o = G.pix(b, h + c.ph, w + c.pw);
          const float* xp = xb + (h * c.W + w) * c.C;
          int64_t sum = 0;
          for (int64_t c0 = 0; c0 < Cs; c0 += 16) {
            const __m128i q = qz(xp + c0, lanes(c.C - c0), &nan);
            _mm_storeu_si128(reinterpret_cast<__m128i*>(X + o * Cs + c0), q);
            if (S) sum += sum16(q);
          }
          if (S) S[o] = int32_t(sum);
        }
    } else {
      for (int64_t p0 = 0; p0 < HW; p0 += 16) {
        const __mmask16 mp = lanes(HW - p0);
        const int64_t np = std::min<int64_t>(16, HW - p0);
        int64_t dst[16];
        for (int i = 0; i < np; ++i) dst[i] = G.pix(b, (p0 + i) / c.W + c.ph, (p0 + i) % c.W + c.pw);
        int32_t sums[16] = {};
        for (int64_t c0 = 0; c0 < Cs; c0 += 16) {
          __m128i r[16];
          for (int i = 0; i < 16; ++i)
            r[i] = c0 + i < c.C ? qz(xb + (c0 + i) * HW + p0, mp, &nan) : _mm_setzero_si128();
          transpose16(r);
          for (int i = 0; i < np; ++i) {
            _mm_storeu_si128(reinterpret_cast<__m128i*>(X + dst[i] * Cs + c0), r[i]);
            if (S) sums[i] += int32_t(sum16(r[i]));
          }
        }
        if (S)
          for (int i = 0; i < np; ++i) S[dst[i]] = sums[i];
      }
    }
    auto fill = [&](int64_t h, int64_t w0, int64_t w1) {  // pad pixels [w0, w1) of padded row h
      for (int64_t w = w0; w < w1; ++w) {
        std::memcpy(X + G.pix(b, h, w) * Cs, padrow, size_t(Cs));
        if (S) S[G.pix(b, h, w)] = int32_t(c.C * c.za);
      }
    };
    for (int64_t h = 0; h < G.Hp; ++h) {
      if (h < c.ph || h >= c.ph + c.H) {
        fill(h, 0, G.Wp);
      } else {
        fill(h, 0, c.pw);
        fill(h, c.pw + c.W, G.Wp);
      }
    }
  }
  return nan == 0;
}

// ---------------------------------------------------------------------------------------- weight panels
struct Panels {
  std::vector<uint8_t> packed;  // the packed bytes and zero points these panels were built from (both
  std::vector<int32_t> zw;      // compared on every lookup)
  std::vector<uint8_t> data;    // np panels of [Kc/4][NR][4] s8
  int64_t bytes() const { return int64_t(packed.size() + 4 * zw.size() + data.size()); }
  bool same(const ImplicitConv& c) const {
    return std::memcmp(packed.data(), c.w, packed.size()) == 0 && std::memcmp(zw.data(), c.w_zero, 4 * zw.size()) == 0;
  }
};

struct Key {
  const void* w;
  int64_t OC, K, C, kh, kw, bits;
  bool operator==(const Key& o) const {
    return w == o.w && OC == o.OC && K == o.K && C == o.C && kh == o.kh && kw == o.kw && bits == o.bits;
  }
};
struct KeyHash {
  size_t operator()(const Key& k) const {
    size_t h = std::hash<const void*>()(k.w);
    for (int64_t v : {k.OC, k.K, k.C, k.kh, k.kw, k.bits}) h = h * 1000003u ^ std::hash<int64_t>()(v);
    return h;
  }
};
constexpr int64_t kCacheBytes = int64_t(256) << 20;  // all entries together; over it the cache starts afresh

std::shared_ptr<const Panels> build_panels(const ImplicitConv& c, int64_t Cs, int nr, int64_t packed_bytes) {
  auto P = std::make_shared<Panels>();
  P->packed.assign(c.w, c.w + packed_bytes);
  P->zw.assign(c.w_zero, c.w_zero + c.OC);
  const int64_t T = c.kh * c.kw, Kc = T * Cs, np = (c.OC + nr - 1) / nr, Kp = padded_k(c.K);
  const int64_t rb = row_bytes(c.w_bits, Kp);
  P->data.assign(size_t(np * Kc * nr), 0);
  std::vector<uint8_t> u(static_cast<size_t>(Kp));
  for (int64_t n = 0; n < c.OC; ++n) {
    // s8 weight: uw - zw (|.| <= 127 up to 7 bits: no row sums needed), 8 bits: uw - 128 (uw ^ 0x80)
    const int32_t z = c.w_bits == 8 ? 128 : c.w_zero[n];
    const uint8_t* row = c.w + n * rb;
    unpack_codes(row, c.w_bits, Kp, u.data());
    uint8_t* panel = P->data.data() + (n / nr) * Kc * nr + (n % nr) * 4;
    for (int64_t t = 0; t < T; ++t)
      for (int64_t ch = 0; ch < c.C; ++ch) {
        const int64_t kk = t * Cs + ch;
        panel[(kk / 4) * nr * 4 + kk % 4] = uint8_t(int8_t(int32_t(u[size_t(ch * T + t)]) - z));
      }
  }
  return P;
}

std::shared_ptr<const Panels> panels_for(const ImplicitConv& c, int64_t Cs, int nr) {
  static std::mutex mu;
  static std::unordered_map<Key, std::shared_ptr<const Panels>, KeyHash> cache;
  static int64_t total = 0;
  const int64_t bytes = c.OC * row_bytes(c.w_bits, padded_k(c.K));
  const Key key{c.w, c.OC, c.K, c.C, c.kh, c.kw, c.w_bits};
  std::shared_ptr<const Panels> hit;
  {
    std::lock_guard<std::mutex> lock(mu);
    auto it = cache.find(key);
    if (it != cache.end()) hit = it->second;
  }
  if (hit && hit->same(c)) return hit;
  auto fresh = build_panels(c, Cs, nr, bytes);
  std::lock_guard<std::mutex> lock(mu);
  auto it = cache.find(key);
  if (it != cache.end()) {
    total -= it->second->bytes();
    cache.erase(it);
  }
  if (total + fresh->bytes() > kCacheBytes) {
    cache.clear();  // entries in use stay alive through their shared_ptr
    total = 0;
  }
  cache.emplace(key, fresh);
  total += fresh->bytes();
  return fresh;
}

// ------------------------------------------------------------------------------------------------- GEMM
constexpr int kRows = 8;  // output pixels of a register block

// tile (8 x 16 NV) = the row block's codes x panel: row r's tap t at base[r] + off[t] (Cs = 4 cq codes).
template <int NV>
__attribute__((noinline)) void ukr(const uint8_t* const* base, const int64_t* off, int64_t T, int64_t cq,
                                   const uint8_t* panel, int32_t* tile) {
  __m512i acc[kRows][NV];
  for (int r = 0; r < kRows; ++r)
    for (int v = 0; v < NV; ++v) acc[r][v] = _mm512_setzero_si512();
  for (int64_t t = 0; t < T; ++t) {
    const uint8_t* a[kRows];
    for (int r = 0; r < kRows; ++r) a[r] = base[r] + off[t];
    for (int64_t q = 0; q < cq; ++q, panel += NV * 64) {
      __m512i b[NV];
      for (int v = 0; v < NV; ++v) b[v] = _mm512_loadu_si512(panel + v * 64);
#pragma GCC unroll 8
      for (int r = 0; r < kRows; ++r) {
        const __m512i av = bcast4(a[r] + 4 * q);
        for (int v = 0; v < NV; ++v) acc[r][v] = dpbusd(acc[r][v], av, b[v]);
      }
    }
  }
  for (int r = 0; r < kRows; ++r)
    for (int v = 0; v < NV; ++v) _mm512_storeu_si512(tile + r * NV * 16 + v * 16, acc[r][v]);
}

struct Epi {  // per-call epilogue terms (lowbit_impl.h's Ctx, per tensor)
  std::vector<int32_t> zd;  // wrap(za (K zw - cw))
  std::vector<float> s;     // fp32(sa * sw)
  Epi(const ImplicitConv& c) : zd(size_t(c.OC)), s(size_t(c.OC)) {
    for (int64_t n = 0; n < c.OC; ++n) {
      const int64_t d = c.K * int64_t(c.w_zero[n]) - int64_t(c.w_colsum[n]);
      zd[size_t(n)] = int32_t(uint32_t(c.za) * uint32_t(uint64_t(d)));
      s[size_t(n)] = c.sa * c.w_scale[n];
    }
  }
};

template <int NV>
void finish(const ImplicitConv& c, const Epi& e, int64_t m0, int64_t mr, int64_t n0, const int32_t* ra,
            const int32_t* tile) {
  const int64_t nr = std::min<int64_t>(NV * 16, c.OC - n0);
  for (int64_t j = 0; j < nr; j += 16) {  // the column terms once, then the rows
    const __mmask16 k = lanes(nr - j);
    const int64_t n = n0 + j;
    const __m512i zd = _mm512_maskz_loadu_epi32(k, e.zd.data() + n);
    const __m512 sc = _mm512_maskz_loadu_ps(k, e.s.data() + n);
    const __m512 bias = c.bias ? _mm512_maskz_loadu_ps(k, c.bias + n) : _mm512_setzero_ps();
    const __m512i zw = c.w_bits == 8 ? _mm512_maskz_loadu_epi32(k, c.w_zero + n) : _mm512_setzero_si512();
    for (int64_t r = 0; r < mr; ++r) {
      __m512i v = _mm512_add_epi32(_mm512_loadu_si512(tile + r * NV * 16 + j), zd);
      if (c.w_bits == 8)  // acc holds sum ua (uw - 128): + 128 ra - zw ra
        v = _mm512_sub_epi32(_mm512_add_epi32(v, _mm512_set1_epi32(128 * ra[r])),
                             _mm512_mullo_epi32(zw, _mm512_set1_epi32(ra[r])));
      __m512 y = _mm512_mul_ps(_mm512_cvtepi32_ps(v), sc);
      if (c.bias) y = _mm512_add_ps(y, bias);
      _mm512_mask_storeu_ps(c.y + (m0 + r) * c.OC + n, k, y);
    }
  }
}

struct Rows {  // the window corners (padded coordinates) and row sums of one row block
  const uint8_t* base[kRows];
  int32_t ra[kRows];
};

struct Taps {  // per call: byte offset of each tap from the window's corner, and in pixels (for S)
  int64_t off[64], poff[64];
  Taps(const ImplicitConv& c, const Geo& G) {
    for (int64_t i = 0; i < c.kh; ++i)
      for (int64_t j = 0; j < c.kw; ++j) {
        poff[i * c.kw + j] = i * c.dh * G.Wp + j * c.dw;
        off[i * c.kw + j] = poff[i * c.kw + j] * G.Cs;
      }
  }
};

struct Cursor {  // output pixel (b, oh, ow) of row m, advanced row by row (no divisions per block)
  int64_t b, oh, ow;
  Cursor(const ImplicitConv& c, int64_t m) : b(m / (c.Ho * c.Wo)), oh(m % (c.Ho * c.Wo) / c.Wo), ow(m % c.Wo) {}
};

// rows m0 .. m0 + 7 (cur: the pixel of m0, left at m0 + 8)
void setup_rows(const ImplicitConv& c, const Geo& G, const Taps& tp, const uint8_t* X, const int32_t* S, int64_t m0,
                Cursor& cur, Rows& R) {
  const int64_t M = c.B * c.Ho * c.Wo, T = c.kh * c.kw;
  int64_t &b = cur.b, &oh = cur.oh, &ow = cur.ow;
  for (int r = 0; r < kRows; ++r) {
    if (m0 + r >= M) {  // past the last pixel: any window inside the buffer (the row is not stored)
      R.base[r] = X;
      R.ra[r] = 0;
      continue;
    }
    const int64_t corner = G.pix(b, oh * c.sh, ow * c.sw);
    R.base[r] = X + corner * G.Cs;
    int64_t s = 0;
    if (S)
      for (int64_t t = 0; t < T; ++t) s += S[corner + tp.poff[t]];
    R.ra[r] = int32_t(s);
    if (++ow == c.Wo) {
      ow = 0;
      if (++oh == c.Ho) oh = 0, ++b;
    }
  }
}

template <int NV>
void gemm(const ImplicitConv& c, const Geo& G, const uint8_t* X, const int32_t* S, const uint8_t* panels) {
  constexpr int64_t NR = NV * 16;
  const int64_t T = c.kh * c.kw, Kc = T * G.Cs, M = c.B * c.Ho * c.Wo, nblk = (M + kRows - 1) / kRows;
  const int64_t np = (c.OC + NR - 1) / NR;
  const int64_t kPanels = std::clamp<int64_t>((int64_t(512) << 10) / (Kc * NR), 1, np), ng = (np + kPanels - 1) / kPanels;
  const Epi e(c);
  const Taps tp(c, G);
  const int threads = threads_for(nblk);
  const bool split_n = threads > 1 && nblk < 4 * threads && ng >= threads;
#pragma omp parallel num_threads(threads) if (threads > 1)
  {
    int tid = 0, nth = 1;
#ifdef _OPENMP
    tid = omp_get_thread_num();
    nth = omp_get_num_threads();
#endif
    auto R = std::make_unique<Rows>();
    alignas(64) int32_t tile[kRows * NR];
    const int64_t g0 = split_n ? ng * tid / nth : 0, g1 = split_n ? ng * (tid + 1) / nth : ng;
    const int64_t i0 = split_n ? 0 : nblk * tid / nth, i1 = split_n ? nblk : nblk * (tid + 1) / nth;
    for (int64_t pg = g0; pg < g1; ++pg) {
      Cursor cur(c, std::min(i0 * kRows, M - 1));
      for (int64_t i = i0; i < i1; ++i) {
        const int64_t m0 = i * kRows, mr = std::min<int64_t>(kRows, M - m0);
        setup_rows(c, G, tp, X, S, m0, cur, *R);
        for (int64_t p = pg * kPanels; p < std::min(np, (pg + 1) * kPanels); ++p) {
          ukr<NV>(R->base, tp.off, T, G.Cs / 4, panels + p * Kc * NR, tile);
          finish<NV>(c, e, m0, mr, p * NR, R->ra, tile);
        }
      }
    }
  }
}

}  // namespace
}  // namespace zsqfast::cpu::lowbit
#pragma GCC pop_options

namespace zsqfast::cpu::lowbit {

bool implicit_conv_applies(const ImplicitConv& c, int64_t groups) {
  if (active_isa() != Isa::Avx512Vnni || groups != 1 || c.kh * c.kw > 64) return false;
  const int64_t qa = (int64_t(1) << c.a_bits) - 1, qw = (int64_t(1) << c.w_bits) - 1;
  if ((c.ph || c.pw) && (c.za < 0 || c.za > qa)) return false;  // padding must be the code za
  // the s8 weight panels hold uw - zw for uw in 0..qw (8 bits: uw - 128): below 8 bits zw must keep that
  // in -128..127 (a zero point outside the code range, e.g. an all-positive channel's, may not)
  for (int64_t n = 0; n < c.OC; ++n)
    if (c.w_bits < 8 && (c.w_zero[n] > 128 || qw - c.w_zero[n] > 127)) return false;
  return int32_exact(c.K, c.a_bits, &c.za, 1, c.w_bits, c.w_zero, c.OC);  // the exact result fits int32
}

bool codes_nhwc(const ImplicitConv& c, const Geo& G, uint8_t* X, int32_t* S) {
  std::vector<uint8_t> padrow(size_t(G.Cs), 0);  // a padded pixel: the code za of 0.0, 0 in the pad channels
  std::memset(padrow.data(), int(c.za), size_t(c.C));
  const int threads = threads_for(c.B);
  const int64_t chunks = c.B >= threads ? c.B : 1;  // images in parallel (one image: one thread)
  bool ok = true;
#pragma omp parallel for schedule(static) num_threads(threads) if (threads > 1 && chunks > 1) reduction(&& : ok)
  for (int64_t b = 0; b < chunks; ++b)
    ok = quantize_nhwc(c, G, chunks == 1 ? 0 : b, chunks == 1 ? c.B : b + 1, padrow.data(), X, S) && ok;
  return ok;
}

bool implicit_conv(const ImplicitConv& c) {
  const Geo G(c);
  CodeBuffer buf(c, G, c.w_bits == 8);  // pixel code sums: only 8-bit weights need row sums
  if (!codes_nhwc(c, G, buf.X, buf.S)) return false;
  const int nr = c.OC <= 16 ? 16 : 32;
  const auto panels = panels_for(c, G.Cs, nr);
  if (nr == 16) gemm<1>(c, G, buf.X, buf.S, panels->data.data());
  else gemm<2>(c, G, buf.X, buf.S, panels->data.data());
  return true;
}

namespace {
thread_local std::vector<uint8_t, NoInit<uint8_t>> t_codes;  // reused between calls (no page faults)
thread_local std::vector<int32_t, NoInit<int32_t>> t_sums;
}  // namespace

CodeBuffer::CodeBuffer(const ImplicitConv& c, const Geo& G, bool sums) {
  const int64_t npix = c.B * G.Hp * G.Wp;
  t_codes.resize(size_t(npix * G.Cs));
  t_sums.resize(sums ? size_t(npix) : 0);
  X = t_codes.data();  // (thread_local: the pointers, not the names, go into the parallel regions)
  S = sums ? t_sums.data() : nullptr;
}

CodeBuffer::~CodeBuffer() {
  if (t_codes.capacity() > (size_t(64) << 20)) {  // do not keep a huge code buffer alive between calls
    t_codes = {};
    t_sums = {};
  }
}

}  // namespace zsqfast::cpu::lowbit
