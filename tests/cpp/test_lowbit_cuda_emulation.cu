// Host emulation of csrc/cuda/lowbit_gemm.cu (no GPU; nothing is launched). Runs, for every CTA of a launch,
// the kernel's own __host__ __device__ tile loader (every thread's 16-byte copies into the 2 shared stages),
// fragment loaders (every lane, every MMA step) and accumulator coordinates, with the tensor-core MMA
// emulated from the PTX ISA's fragment tables (mma.m16n8k32 .u8 and mma.m16n8k64 .u4, coded here
// independently of the kernel), then checks against a naive integer GEMM of the codes:
//   * the u8 path on nibble-packed (2..4-bit) and byte (5..8-bit) weights, small and large tiles;
//   * the int4 path on activations written by the kernel's own quant_byte in the half-block layout;
//   * quant_byte (codes, padding, row sums) and epilogue_value (int64 zero-point correction, fp32 scale
//     and bias) against a direct evaluation of the reference formulas.
// Shapes: M = 1, odd N, K not a multiple of 128, several CTAs in both grid dimensions.
// Build: nvcc -std=c++17 -I csrc -gencode arch=compute_80,code=compute_80 tests/cpp/test_lowbit_cuda_emulation.cu
// Exit code 0 = pass.
#include <cmath>
#include <cstdio>
#include <cstring>
#include <random>
#include <vector>

#include "cuda/lowbit_gemm.cu"
#include "emulation_check.h"

using namespace zsqfast::cuda_detail;

namespace {

std::mt19937 rng(1234);
int64_t pad_k(int64_t K) { return (K + 127) / 128 * 128; }

// zsqfast.pack_lowbit: rows padded to K_pad; bits <= 4 half-block nibbles, else bytes
std::vector<uint8_t> pack(const std::vector<int>& u, int64_t rows, int64_t K, bool nibbles) {
  const int64_t kp = pad_k(K), ld = nibbles ? kp / 2 : kp;
  std::vector<uint8_t> p(rows * ld, 0);
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t k = 0; k < K; ++k) {
      const int c = u[r * K + k];
      if (!nibbles) p[r * ld + k] = uint8_t(c);
      else p[r * ld + (k / 128) * 64 + (k % 64)] |= uint8_t(((k % 128) < 64 ? c : c << 4));
    }
  return p;
}

// ---- PTX fragment tables (the spec, element by element) ----
// u8 m16n8k32: A (row, k) -> lane (row % 8) * 4 + (k % 16) / 4, register (row >= 8) + 2 (k >= 16), byte k % 4.
// B (k, n) -> lane 4 n + (k % 16) / 4, register k >= 16, byte k % 4.
// u4 m16n8k64: A (row, k) -> lane (row % 8) * 4 + (k % 32) / 8, register (row >= 8) + 2 (k >= 32), nibble k % 8.
// B (k, n) -> lane 4 n + (k % 32) / 8, register k >= 32, nibble k % 8.
// C (row, col) -> lane (row % 8) * 4 + col / 2, register 2 (row >= 8) + col % 2.
int elem(uint32_t reg, int idx, bool u4) { return u4 ? int((reg >> (4 * idx)) & 15u) : int((reg >> (8 * idx)) & 255u); }

void mma_emulated(bool u4, const uint32_t a[32][4], const uint32_t b[32][2], int32_t c[32][4]) {
  const int kk = u4 ? 64 : 32, half = kk / 2, per = u4 ? 8 : 4;
  for (int row = 0; row < 16; ++row)
    for (int col = 0; col < 8; ++col) {
      int64_t s = 0;
      for (int k = 0; k < kk; ++k) {
        const int la = (row % 8) * 4 + (k % half) / per, ra = (row >= 8) + 2 * (k >= half);
        const int lb = 4 * col + (k % half) / per, rb = k >= half;
        s += int64_t(elem(a[la][ra], k % per, u4)) * elem(b[lb][rb], k % per, u4);
      }
      c[(row % 8) * 4 + col / 2][2 * (row >= 8) + col % 2] += int32_t(s);
    }
}

// The kernel's CTA loop on the host: returns acc (M, N).
template <class Tile>
std::vector<int32_t> emulate_gemm(const std::vector<uint8_t>& a, int64_t lda, const std::vector<uint8_t>& w,
                                  int64_t ldw, int64_t M, int64_t N, int64_t K) {
  const int64_t kp = pad_k(K), blocks = kp / 128;
  std::vector<int32_t> out(M * N, -7);
  std::vector<uint8_t> smem(2 * Tile::kStageBytes);
  for (int64_t bx = 0; bx * Tile::BM < M; ++bx)      // blockIdx.x: M tiles
    for (int64_t by = 0; by * Tile::BN < N; ++by) {  // blockIdx.y: N tiles
      const int64_t m0 = bx * Tile::BM, n0 = by * Tile::BN;
      constexpr int W = Tile::WM * Tile::WN;
      static int32_t acc[W][Tile::MI][Tile::NI][32][4];
      std::memset(acc, 0, sizeof acc);
      for (int64_t kb = 0; kb < blocks; ++kb) {
        uint8_t* st = smem.data() + (kb & 1) * Tile::kStageBytes;
        std::memset(st, 0xCD, Tile::kStageBytes);  // garbage where the loader writes nothing
        for (int tid = 0; tid < Tile::kThreads; ++tid) {
          load_tile<Tile::BM, Tile::kABytes, Tile::kSA>(st, a.data(), lda, m0, M, kb, tid, Tile::kThreads);
          load_tile<Tile::BN, Tile::kBBytes, Tile::kSB>(st + Tile::BM * Tile::kSA, w.data(), ldw, n0, N, kb, tid,
                                                        Tile::kThreads);
        }
        for (int warp = 0; warp < W; ++warp) {
          const int wm = warp / Tile::WN, wn = warp % Tile::WN;
          const uint8_t* As = st + (wm * Tile::MI * 16) * Tile::kSA;
          const uint8_t* Bs = st + Tile::BM * Tile::kSA + (wn * Tile::NI * 8) * Tile::kSB;
          for (int s = 0; s < Tile::kSteps; ++s)
            for (int i = 0; i < Tile::MI; ++i)
              for (int j = 0; j < Tile::NI; ++j) {
                uint32_t fa[32][4], fb[32][2];
                for (int lane = 0; lane < 32; ++lane) {
                  frag_a<Tile>(As + i * 16 * Tile::kSA, lane, s, fa[lane]);
                  frag_b<Tile>(Bs + j * 8 * Tile::kSB, lane, s, fb[lane]);
                }
                mma_emulated(Tile::A_U4, fa, fb, acc[warp][i][j]);
              }
        }
      }
      for (int warp = 0; warp < W; ++warp) {
        const int wm = warp / Tile::WN, wn = warp % Tile::WN;
        for (int i = 0; i < Tile::MI; ++i)
          for (int j = 0; j < Tile::NI; ++j)
            for (int lane = 0; lane < 32; ++lane)
              for (int r = 0; r < 4; ++r) {
                int row, col;
                acc_coord(lane, r, row, col);
                const int64_t m = m0 + (wm * Tile::MI + i) * 16 + row, n = n0 + (wn * Tile::NI + j) * 8 + col;
                if (m < M && n < N) out[m * N + n] = acc[warp][i][j][lane][r];
              }
      }
    }
  return out;
}

std::vector<int> random_codes(int64_t n, int bits) {
  std::uniform_int_distribution<int> d(0, (1 << bits) - 1);
  std::vector<int> v(n);
  for (auto& x : v) x = d(rng);
  return v;
}

std::vector<int64_t> naive(const std::vector<int>& ua, const std::vector<int>& uw, int64_t M, int64_t N, int64_t K) {
  std::vector<int64_t> c(M * N, 0);
  for (int64_t m = 0; m < M; ++m)
    for (int64_t n = 0; n < N; ++n)
      for (int64_t k = 0; k < K; ++k) c[m * N + n] += int64_t(ua[m * K + k]) * uw[n * K + k];
  return c;
}

// u8 path (the raw lowbit_gemm and the 5..8-bit / sm_90 linear): activation bytes in natural order.
template <class Tile>
void check_u8(int64_t M, int64_t N, int64_t K, int a_bits, int w_bits) {
  const auto ua = random_codes(M * K, a_bits), uw = random_codes(N * K, w_bits);
  const auto ap = pack(ua, M, K, false), wp = pack(uw, N, K, w_bits <= 4);
  const int64_t kp = pad_k(K);
  const auto got = emulate_gemm<Tile>(ap, kp, wp, w_bits <= 4 ? kp / 2 : kp, M, N, K);
  const auto want = naive(ua, uw, M, N, K);
  for (int64_t i = 0; i < M * N; ++i)
    CHECK(got[i] == want[i], "u8 BM=%d BN=%d M=%lld N=%lld K=%lld W%dA%d: acc[%lld] = %d, want %lld", Tile::BM,
          Tile::BN, (long long)M, (long long)N, (long long)K, w_bits, a_bits, (long long)i, got[i], (long long)want[i]);
}

// int4 path: activations quantized by the kernel's quant_byte<true> (half-block nibbles) from floats that
// are exactly code * 0.5 - 1 (scale 0.5, zero point 2), so the expected codes are known.
template <class Tile>
void check_u4(int64_t M, int64_t N, int64_t K, int a_bits, int w_bits) {
  const auto ua = random_codes(M * K, a_bits), uw = random_codes(N * K, w_bits);
  std::vector<float> x(M * K);
  for (int64_t i = 0; i < M * K; ++i) x[i] = float(ua[i]) * 0.5f - 1.0f;
  const int64_t kp = pad_k(K);
  std::vector<uint8_t> ap(M * kp / 2);
  for (int64_t m = 0; m < M; ++m) {
    int sum = 0, want_sum = 0;
    for (int64_t i = 0; i < kp / 2; ++i)
      ap[m * kp / 2 + i] = quant_byte<true>(x.data() + m * K, i, K, 2.0f, 2.0f, float((1 << a_bits) - 1), sum);
    for (int64_t k = 0; k < K; ++k) want_sum += ua[m * K + k];
    CHECK(sum == want_sum, "quant_byte<true> row sum %d, want %d", sum, want_sum);
  }
  CHECK(ap == pack(ua, M, K, true), "quant_byte<true> bytes differ from pack_lowbit's layout (M=%lld K=%lld)",
        (long long)M, (long long)K);
  const auto got = emulate_gemm<Tile>(ap, kp / 2, pack(uw, N, K, true), kp / 2, M, N, K);
  const auto want = naive(ua, uw, M, N, K);
  for (int64_t i = 0; i < M * N; ++i)
    CHECK(got[i] == want[i], "u4 BM=%d BN=%d M=%lld N=%lld K=%lld W%dA%d: acc[%lld] = %d, want %lld", Tile::BM,
          Tile::BN, (long long)M, (long long)N, (long long)K, w_bits, a_bits, (long long)i, got[i], (long long)want[i]);
}

void check_quant_codes() {
  // ties, the grid ends, +-Inf, NaN (-> 0), padding
  const float xs[] = {0.25f, 0.75f, -0.25f, 1.25f, 100.f, -100.f, INFINITY, -INFINITY, NAN, 3.0f, 3.5f};
  const int K = int(sizeof xs / sizeof xs[0]);
  const float inv = 2.0f, za = 3.0f, qmax = 15.0f;
  int sum = 0, want_sum = 0;
  for (int i = 0; i < 128; ++i) {
    const uint8_t b = quant_byte<false>(xs, i, K, inv, za, qmax, sum);
    int want = 0;
    if (i < K) {
      const float q = std::nearbyint(xs[i] * inv) + za;  // round half to even (default rounding mode)
      want = std::isnan(q) ? 0 : int(std::fmin(std::fmax(q, 0.0f), qmax));
    }
    want_sum += want;
    CHECK(b == want, "quant_byte<false>(%g) = %d, want %d", double(i < K ? xs[i] : 0.f), b, want);
  }
  CHECK(sum == want_sum, "quant_byte<false> sum %d, want %d", sum, want_sum);
}

void check_epilogue() {
  std::uniform_int_distribution<int> z(-20, 300), a(0, 1 << 30);
  std::uniform_real_distribution<float> f(0.001f, 2.0f);
  for (int t = 0; t < 2000; ++t) {
    const int32_t acc = a(rng), ra = a(rng) >> 8, cw = a(rng) >> 8, za = z(rng), zw = z(rng);
    const int64_t K = 1 + (a(rng) >> 12);
    const float sa = f(rng), sw = f(rng), bias = f(rng) - 1.0f;
    const bool with_bias = t & 1;
    const LbEpilogue e{&ra, &cw, &za, &zw, &sa, &sw, with_bias ? &bias : nullptr, false};
    const float got = epilogue_value(acc, 0, 0, K, e);
    // reference: c = sum (ua - za)(uw - zw) as an exact integer, then fp32 steps
    const long double c = (long double)acc - (long double)zw * ra - (long double)za * cw + (long double)K * za * zw;
    const float s = sa * sw;
    float want = float(c) * s;
    if (with_bias) want = want + bias;
    CHECK(std::memcmp(&got, &want, 4) == 0, "epilogue %.9g, want %.9g", double(got), double(want));
  }
}

}  // namespace

int main() {
  check_quant_codes();
  check_epilogue();
  for (int bits : {2, 3, 4}) {
    check_u8<SmallU8W4>(1, 37, 77, 8, bits);
    check_u8<LargeU8W4>(70, 131, 300, 8, bits);
    check_u4<SmallU4>(5, 129, 200, bits, bits);
    check_u4<LargeU4>(67, 70, 257, bits, 4);
  }
  for (int bits : {5, 8}) {
    check_u8<SmallU8W8>(3, 9, 130, bits, bits);
    check_u8<LargeU8W8>(65, 67, 129, 8, bits);
  }
  std::printf("lowbit cuda emulation: %d checks, %d failures\n", g_checks, g_failures);
  return g_failures == 0 ? 0 : 1;
}
