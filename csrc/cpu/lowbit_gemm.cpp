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
// one shift per 64 bytes, see zsqfast/ops/lowbit_pack.py); larger M re-lays panels of 32 weight columns into
// [K/4][32][4] (L2-resident, once per call) and reuses them across all rows with a register-blocked microkernel
// (8 x 32 int32 accumulators on AVX-512, 4 x 16 on AVX2) that broadcasts 4 activation bytes. On the VNNI path
// lowbit_linear quantizes the activations straight into that microkernel's row-block order (quantize_rows).
// NaN activations are detected in the quantization pass (the entries return false).
#ifdef _OPENMP
#include <omp.h>
#endif

#include <algorithm>
#include <cmath>
#include <cstring>

#include "../kernels.h"
#include "lowbit_impl.h"

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

bool int32_exact(int64_t K, int a_bits, const int32_t* za, int64_t n_za, int w_bits, const int32_t* zw, int64_t N) {
  const int64_t qa = (int64_t(1) << a_bits) - 1, qw = (int64_t(1) << w_bits) - 1;
  int64_t da = 0, dw = 0;
  for (int64_t i = 0; i < n_za; ++i) da = std::max<int64_t>({da, std::llabs(za[i]), std::llabs(qa - za[i])});
  for (int64_t n = 0; n < N; ++n) dw = std::max<int64_t>({dw, std::llabs(zw[n]), std::llabs(qw - zw[n])});
  return (long double)(K) * da * dw < 2147483648.0L;
}

bool narrow_epilogue(const Gemm& g, int64_t n_za) {
  return int32_exact(g.K, g.a_bits, g.za, n_za, g.w_bits, g.zw, g.N);
}

bool blocked_gemm(int a_bits, int w_bits, int64_t M) {
  return path_for(a_bits, w_bits) == Path::Vnni && M > kGemvRows;
}

bool quantize_rows(const float* x, int64_t ldx, int64_t M, int64_t K, const float* inv, const int32_t* za,
                   bool per_token, int bits, Acts& acts, bool blocked) {
  const int64_t Kp = padded_k(K), rows = (M + kRowPad - 1) / kRowPad * kRowPad;
  acts.M = M;
  acts.lda = Kp;
  acts.ldk = 0;
  acts.kmajor = false;
  acts.blocked = blocked;
  acts.codes.clear();
  acts.codes.resize(size_t(rows * Kp));  // uninitialized: every code below is written, the pad rows zeroed
  const int64_t pad_from = blocked ? M / MR * MR : M;  // a partial last register block is zeroed whole
  std::memset(acts.codes.data() + pad_from * Kp, 0, size_t((rows - pad_from) * Kp));
  acts.rowsum.assign(size_t(M), 0);
  const Isa isa = active_isa();
  const int threads = threads_for(std::max<int64_t>(1, M * K / 65536));
  bool ok = true;
#pragma omp parallel for schedule(static) num_threads(threads) if (threads > 1) reduction(&& : ok)
  for (int64_t m = 0; m < M; ++m) {
    const float iv = inv[per_token ? m : 0];
    const int32_t z = za[per_token ? m : 0];
    const float* xr = x + m * ldx;
    uint8_t* out = blocked ? acts.codes.data() + (m / MR) * MR * Kp + (m % MR) * 4 : acts.row(m);
    const int64_t stride = blocked ? MR * 4 : 4;
    int32_t* rs = &acts.rowsum[size_t(m)];
    if (isa >= Isa::Avx512) {
      ok = vnni::quantize_row(xr, K, Kp, iv, z, bits, out, stride, rs) && ok;
    } else if (isa == Isa::Avx2) {
      ok = avx2::quantize_row(xr, K, Kp, iv, z, bits, out, stride, rs) && ok;
    } else {
      const float fh = float((1 << bits) - 1);
      int32_t s = 0;
      for (int64_t k = 0; k < Kp; ++k) {
        ok = ok && !(k < K && std::isnan(xr[k]));
        const float v = k < K ? std::nearbyint(xr[k] * iv) + float(z) : 0.0f;
        const int32_t q = int32_t(v > 0.0f ? (v < fh ? v : fh) : 0.0f);
        out[(k >> 2) * stride + (k & 3)] = uint8_t(q);
        s += q;
      }
      *rs = s;
    }
  }
  return ok;
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
  if (path == Path::Vnni) return gemv ? vnni::run_gemv(x) : vnni::run_gemm(x);
  if (path == Path::Avx2) return gemv ? avx2::run_gemv(x) : avx2::run_gemm(x);
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

bool lowbit_linear(const float* x, const uint8_t* w, int w_bits, int64_t M, int64_t N, int64_t K,
                   const float* w_scale, const int32_t* w_zero, const int32_t* w_colsum, const float* a_scale,
                   const float* a_inv_scale, const int32_t* a_zero, bool per_token, int a_bits, const float* bias,
                   float* y) {
  // The activation codes live in a per-thread buffer kept between calls (M x K_pad bytes, e.g. 4 MiB at M = 1024,
  // K = 4096; released after a call that needed more than 16 MiB): no page faults and no allocation per call.
  const lowbit::ThreadLimit limit(lowbit::threads_for_macs(double(M) * double(N) * double(K)));
  thread_local lowbit::Acts acts;
  struct Release {
    lowbit::Acts& a;
    ~Release() {
      if (a.codes.capacity() > (size_t(16) << 20)) a = lowbit::Acts();
    }
  } release{acts};
  if (!lowbit::quantize_rows(x, K, M, K, a_inv_scale, a_zero, per_token, a_bits, acts,
                             lowbit::blocked_gemm(a_bits, w_bits, M)))
    return false;
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
  return true;
}

}  // namespace zsqfast::cpu
