// Host emulation of csrc/cuda/lowbit_gemm.cu (no GPU; nothing is launched). Runs, for every group and CTA of
// a launch built by the launchers' own gemm_args / linear_args, the kernel's __host__ __device__ code: the
// quantizer's per-thread row part (quant_row_part), group_view, the tile loader (every thread's 16-byte
// copies into the 2 shared stages), the fragment loaders (every lane, every MMA step), the accumulator
// coordinates and the epilogue, with the tensor-core MMA emulated from the PTX ISA's fragment tables
// (mma.m16n8k32 .u8 and mma.m16n8k64 .u4, coded here independently of the kernel); checks against naive
// integer math:
//   * the raw GEMM (u8 path) on nibble-packed (2..4-bit) and byte (5..8-bit) weights, small and large tiles;
//   * lowbit_linear end to end on the int4 path (sm_8x) and the u8 path (sm_90), bit-exact fp32 outputs;
//   * the grouped GEMM of a convolution (grouped, depthwise K = 9);
//   * quant_byte (ties, +-Inf, NaN, padding) and epilogue_value (int64 zero-point correction, fp32 scale
//     and bias) on their own.
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

// The kernel's grid on the host for the launch arguments `all` (gemm_args / linear_args): every group
// (blockIdx.z, through group_view), every CTA, every thread's tile copies, every lane's fragments; stores
// the int32 accumulators, or (EPI) epilogue_value, as the kernel does.
template <class Tile, bool EPI>
void emulate(const LbArgs& all, int64_t groups) {
  const int64_t blocks = all.K_pad / 128;
  std::vector<uint8_t> smem(2 * Tile::kStageBytes);
  constexpr int W = Tile::WM * Tile::WN;
  static int32_t acc[W][Tile::MI][Tile::NI][32][4];
  for (int64_t gz = 0; gz < groups; ++gz) {
    const LbArgs args = group_view(all, gz);
    for (int64_t bx = 0; bx * Tile::BM < args.M; ++bx)      // blockIdx.x: M tiles
      for (int64_t by = 0; by * Tile::BN < args.N; ++by) {  // blockIdx.y: N tiles
        const int64_t m0 = bx * Tile::BM, n0 = by * Tile::BN;
        std::memset(acc, 0, sizeof acc);
        for (int64_t kb = 0; kb < blocks; ++kb) {
          uint8_t* st = smem.data() + (kb & 1) * Tile::kStageBytes;
          std::memset(st, 0xCD, Tile::kStageBytes);  // garbage where the loader writes nothing
          for (int tid = 0; tid < Tile::kThreads; ++tid) {
            load_tile<Tile::BM, Tile::kABytes, Tile::kSA>(st, args.a, args.lda, m0, args.M, kb, tid, Tile::kThreads);
            load_tile<Tile::BN, Tile::kBBytes, Tile::kSB>(st + Tile::BM * Tile::kSA, args.w, args.ldw, n0, args.N, kb,
                                                          tid, Tile::kThreads);
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
                  if (m >= args.M || n >= args.N) continue;
                  if (EPI) static_cast<float*>(args.out)[m * args.ldo + n] = epilogue_value(acc[warp][i][j][lane][r], m, n, args.K, args.e);
                  else static_cast<int32_t*>(args.out)[m * args.ldo + n] = acc[warp][i][j][lane][r];
                }
        }
      }
  }
}

std::vector<int> random_codes(int64_t n, int bits) {
  std::uniform_int_distribution<int> d(0, (1 << bits) - 1);
  std::vector<int> v(n);
  for (auto& x : v) x = d(rng);
  return v;
}

// The raw GEMM (u8 path) through gemm_args, against a naive integer GEMM.
template <class Tile>
void check_gemm(int64_t M, int64_t N, int64_t K, int a_bits, int w_bits) {
  const auto ua = random_codes(M * K, a_bits), uw = random_codes(N * K, w_bits);
  const auto ap = pack(ua, M, K, false), wp = pack(uw, N, K, w_bits <= 4);
  std::vector<int32_t> got(M * N, -7);
  emulate<Tile, false>(gemm_args(ap.data(), wp.data(), got.data(), M, N, K, w_bits), 1);
  for (int64_t m = 0; m < M; ++m)
    for (int64_t n = 0; n < N; ++n) {
      int64_t want = 0;
      for (int64_t k = 0; k < K; ++k) want += int64_t(ua[m * K + k]) * uw[n * K + k];
      CHECK(got[m * N + n] == want, "gemm BM=%d BN=%d M=%lld N=%lld K=%lld W%dA%d: acc[%lld, %lld] = %d, want %lld",
            Tile::BM, Tile::BN, (long long)M, (long long)N, (long long)K, w_bits, a_bits, (long long)m, (long long)n,
            got[m * N + n], (long long)want);
    }
}

// lowbit_linear / the grouped GEMM of a convolution, end to end as the launcher runs it: quant_row_part for
// every (row, group, thread) (the kernel's grid), linear_args, the GEMM grid with the epilogue. x holds
// exactly code * 0.5 - 1 (inverse scale 2, zero point 2), so the codes are known; the expected output is the
// reference formula c = sum (ua - za)(uw - zw) exact, y = fp32(c) * fp32(sa sw) + bias.
template <class Tile>
void check_linear(int64_t M, int64_t Ntot, int64_t K, int a_bits, int w_bits, int64_t G, bool bias) {
  const int64_t N = Ntot / G, kp = pad_k(K);
  const auto ua = random_codes(M * G * K, a_bits), uw = random_codes(Ntot * K, w_bits);
  std::vector<float> x(M * G * K), sw(Ntot), b(Ntot), y(M * Ntot, -7.f);
  for (int64_t i = 0; i < M * G * K; ++i) x[i] = float(ua[i]) * 0.5f - 1.0f;
  std::vector<int32_t> zw(Ntot), cw(Ntot, 0), rowsum(M * G);
  std::uniform_real_distribution<float> f(0.01f, 0.2f);
  for (int64_t n = 0; n < Ntot; ++n) {
    sw[n] = f(rng), b[n] = f(rng) - 0.1f, zw[n] = int32_t(rng() % (1u << w_bits));
    for (int64_t k = 0; k < K; ++k) cw[n] += uw[n * K + k];
  }
  const bool int4 = Tile::A_U4;
  std::vector<uint8_t> codes(M * G * (int4 ? kp / 2 : kp), 0xEE);
  const float sa = 0.5f, inv = 2.0f, qmax = float((1 << a_bits) - 1);
  const int32_t za = 2;
  for (int64_t r = 0; r < M * G; ++r) {  // quantizer grid: row r = m G + g, kLbQuantThreads threads
    int sum = 0;
    for (int tid = 0; tid < kLbQuantThreads; ++tid)
      sum += int4 ? quant_row_part<true>(x.data(), codes.data(), K, kp, r, inv, float(za), qmax, tid, kLbQuantThreads)
                  : quant_row_part<false>(x.data(), codes.data(), K, kp, r, inv, float(za), qmax, tid, kLbQuantThreads);
    rowsum[r] = sum;
  }
  const LbEpilogue e{rowsum.data(), cw.data(), &za, zw.data(), &sa, sw.data(), bias ? b.data() : nullptr, false, G};
  emulate<Tile, true>(linear_args(codes.data(), pack(uw, Ntot, K, w_bits <= 4).data(), y.data(), M, Ntot, K, w_bits,
                                  int4, G, e), G);
  for (int64_t m = 0; m < M; ++m)
    for (int64_t n = 0; n < Ntot; ++n) {
      const int64_t g = n / N;
      int64_t c = 0;
      for (int64_t k = 0; k < K; ++k) c += int64_t(ua[(m * G + g) * K + k] - za) * (uw[n * K + k] - zw[n]);
      float want = float(c) * (sa * sw[n]);
      if (bias) want = want + b[n];
      const float got = y[m * Ntot + n];
      CHECK(std::memcmp(&got, &want, 4) == 0, "linear %s BM=%d BN=%d M=%lld N=%lld K=%lld G=%lld W%dA%d: y[%lld, %lld] "
            "= %.9g, want %.9g", int4 ? "u4" : "u8", Tile::BM, Tile::BN, (long long)M, (long long)Ntot, (long long)K,
            (long long)G, w_bits, a_bits, (long long)m, (long long)n, double(got), double(want));
    }
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
    check_gemm<SmallU8W4>(1, 37, 77, 8, bits);
    check_gemm<LargeU8W4>(70, 131, 300, 8, bits);
    check_linear<SmallU4>(5, 129, 200, bits, bits, 1, true);   // int4 path (sm_8x)
    check_linear<LargeU4>(67, 70, 257, bits, 4, 1, false);
    check_linear<SmallU8W4>(3, 33, 130, bits, bits, 1, true);  // u8 path (sm_90)
    check_linear<LargeU8W4>(66, 65, 150, 4, bits, 1, true);
  }
  for (int bits : {5, 8}) {
    check_gemm<SmallU8W8>(3, 9, 130, bits, bits);
    check_gemm<LargeU8W8>(65, 67, 129, 8, bits);
    check_linear<LargeU8W8>(65, 33, 140, bits, bits, 1, true);
  }
  // grouped GEMM (convolutions): grouped, depthwise (K = 9), both paths
  check_linear<LargeU4>(70, 12, 27, 4, 4, 3, true);
  check_linear<LargeU8W4>(70, 16, 9, 4, 4, 16, true);
  check_linear<SmallU4>(9, 24, 9, 3, 3, 8, false);
  check_linear<LargeU8W8>(33, 12, 50, 8, 8, 2, true);
  std::printf("lowbit cuda emulation: %d checks, %d failures\n", g_checks, g_failures);
  return g_failures == 0 ? 0 : 1;
}
