// C++-level test of the CPU kernels (no torch): every ISA level this CPU has against a naive scalar loop,
// bit for bit, on sizes that cross vector, chunk and channel-run boundaries. Exit code 0 = pass.
#include <cmath>
#include <cstdio>
#include <cstring>
#include <random>
#include <vector>

#include "kernels.h"

using namespace zsqfast;

static float naive(float x, float s, float inv, float zp, float lo, float hi, bool* inside) {
  const float q = std::nearbyint(x * inv) + zp;
  *inside = q >= lo && q <= hi;
  const float qc = q < lo ? lo : (q > hi ? hi : q);
  return (qc - zp) * s;
}

int main() {
  std::mt19937 rng(0);
  std::normal_distribution<float> nd(0.0f, 2.0f);
  int failures = 0, runs = 0;
  const char* isas[] = {"scalar", "avx2", "avx512", "avx512_vnni"};
  const struct { int64_t n, inner, C; } cases[] = {{1, 1, 1}, {17, 1, 1}, {100003, 1, 1}, {70 * 4608, 4608, 70},
                                                   {3 * 20 * 1155, 1155, 20}, {2 * 9 * 31 * 300, 1, 300}, {1000, 7, 13}};
  for (const char* isa : isas) {
    if (!cpu::force_isa(isa)) continue;
    cpu::set_num_threads(2);
    for (const auto& c : cases) {
      std::vector<float> x(c.n), out(c.n), s(c.C), inv(c.C), zp(c.C);
      for (auto& v : x) v = nd(rng);
      for (int64_t k = 0; k < c.C; ++k) { s[k] = 0.125f + 0.01f * k; inv[k] = 1.0f / s[k]; zp[k] = float(k % 5); }
      x[0] = NAN;
      std::vector<uint8_t> mask((c.n + 7) / 8);
      cpu::fake_quant_fwd(DType::F32, x.data(), out.data(), mask.data(), c.n, s.data(), inv.data(), zp.data(),
                          c.inner, c.C, 0.0f, 15.0f);
      ++runs;
      for (int64_t o = 0; o < c.n; ++o) {
        const int64_t ch = (o / c.inner) % c.C;
        bool inside;
        const float want = naive(x[o], s[ch], inv[ch], zp[ch], 0.0f, 15.0f, &inside);
        const bool bit = (mask[o >> 3] >> (o & 7)) & 1;
        const bool same = (std::isnan(want) && std::isnan(out[o])) || std::memcmp(&want, &out[o], 4) == 0 || want == out[o];
        if (!same || bit != inside) {
          std::printf("FAIL isa=%s n=%lld inner=%lld C=%lld at %lld: got %g want %g mask %d/%d\n", isa, (long long)c.n,
                      (long long)c.inner, (long long)c.C, (long long)o, out[o], want, bit, inside);
          ++failures;
          break;
        }
      }
    }
  }
  cpu::force_isa("auto");
  std::printf("%d passed, %d failed\n", runs - failures, failures);
  return failures == 0 ? 0 : 1;
}
