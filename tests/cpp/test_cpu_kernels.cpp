// C++-level test of the CPU kernels (no torch: raw arrays). zsqfast::cpu::fake_quant_fwd on every ISA level this
// CPU has (zsqfast::cpu::force_isa) against a naive scalar loop, for fp32 / fp16 / bf16 storage, per tensor and
// per channel, sizes that cross vector, chunk and channel-run boundaries, with ties, NaN, +-Inf and -0 in the
// input: outputs bit for bit (NaN: any NaN), mask bytes exactly (padding bits 0), nothing written past n.
// Built and registered with ctest by CMakeLists.txt. Exit code 0 = pass.
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <random>
#include <vector>

#include "kernels.h"

using namespace zsqfast;

namespace {

// Storage conversions of the naive loop: round to nearest even, as torch's .to(dtype).
uint16_t f32_to_bf16(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  if (std::isnan(f)) return uint16_t((u >> 16) | 0x40);
  u += 0x7fffu + ((u >> 16) & 1u);
  return uint16_t(u >> 16);
}
float bf16_to_f32(uint16_t h) {
  const uint32_t u = uint32_t(h) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}
uint16_t f32_to_f16(float f) {  // _Float16 (GCC >= 12 on x86-64): IEEE conversion, round to nearest even
  const _Float16 h = static_cast<_Float16>(f);
  uint16_t r;
  std::memcpy(&r, &h, 2);
  return r;
}
float f16_to_f32(uint16_t r) {
  _Float16 h;
  std::memcpy(&h, &r, 2);
  return static_cast<float>(h);
}

struct Elem {
  DType dt;
  const char* name;
  size_t size;
  float load(const std::vector<uint8_t>& buf, int64_t i) const {
    if (dt == DType::F32) {
      float f;
      std::memcpy(&f, &buf[i * 4], 4);
      return f;
    }
    uint16_t r;
    std::memcpy(&r, &buf[i * 2], 2);
    return dt == DType::F16 ? f16_to_f32(r) : bf16_to_f32(r);
  }
  void store(std::vector<uint8_t>& buf, int64_t i, float v) const {
    if (dt == DType::F32) {
      std::memcpy(&buf[i * 4], &v, 4);
      return;
    }
    const uint16_t r = dt == DType::F16 ? f32_to_f16(v) : f32_to_bf16(v);
    std::memcpy(&buf[i * 2], &r, 2);
  }
};

float naive(float x, float s, float inv, float zp, float lo, float hi, bool* inside) {
  const float q = std::nearbyint(x * inv) + zp;  // default rounding mode: half to even
  *inside = q >= lo && q <= hi;
  const float qc = q < lo ? lo : (q > hi ? hi : q);
  return (qc - zp) * s;
}

}  // namespace

int main() {
  std::mt19937 rng(0);
  std::normal_distribution<float> nd(0.0f, 2.0f);
  std::uniform_int_distribution<int> pick(0, 15), tie(-40, 40);
  int failures = 0, runs = 0, isas_run = 0;
  const Elem elems[] = {{DType::F32, "f32", 4}, {DType::F16, "f16", 2}, {DType::BF16, "bf16", 2}};
  const char* isas[] = {"scalar", "avx2", "avx512", "avx512_vnni"};
  const struct { int64_t n, inner, C; } cases[] = {{1, 1, 1},       {17, 1, 1},        {100003, 1, 1},
                                                   {70 * 4608, 4608, 70}, {3 * 20 * 1155, 1155, 20},
                                                   {2 * 9 * 31 * 300, 1, 300}, {1001, 7, 13}, {64 * 33, 64, 33}};
  for (const char* isa : isas) {
    if (!cpu::force_isa(isa)) continue;  // this CPU lacks it
    ++isas_run;
    cpu::set_num_threads(2);
    for (const Elem& el : elems) {
      for (const auto& c : cases) {
        for (int with_mask = 0; with_mask < 2; ++with_mask) {
          const float qmin = with_mask ? 0.0f : -8.0f, qmax = with_mask ? 15.0f : 7.0f;
          std::vector<uint8_t> x(c.n * el.size), out(c.n * el.size + 64, 0xA5);
          std::vector<float> s(c.C), inv(c.C), zp(c.C);
          for (int64_t k = 0; k < c.C; ++k) {
            s[k] = k % 2 ? 0.0625f : 0.125f + 0.01f * float(k);  // powers of two make exact ties
            inv[k] = 1.0f / s[k];
            zp[k] = with_mask ? float(k % 5) : 0.0f;
          }
          for (int64_t o = 0; o < c.n; ++o) {
            const int p = pick(rng);
            el.store(x, o, p == 0 ? NAN : p == 1 ? INFINITY : p == 2 ? -INFINITY : p == 3 ? -0.0f
                           : p < 8 ? (float(tie(rng)) + 0.5f) * 0.0625f : nd(rng));
          }
          const int64_t nbytes = (c.n + 7) / 8;
          std::vector<uint8_t> mask(nbytes + 8, 0xCC);
          cpu::fake_quant_fwd(el.dt, x.data(), out.data(), with_mask ? mask.data() : nullptr, c.n, s.data(),
                              inv.data(), zp.data(), c.inner, c.C, qmin, qmax);
          ++runs;
          bool ok = true;
          std::vector<uint8_t> want_mask(nbytes, 0), scratch(4);
          for (int64_t o = 0; o < c.n && ok; ++o) {
            const int64_t ch = (o / c.inner) % c.C;
            bool inside;
            const float want_f = naive(el.load(x, o), s[ch], inv[ch], zp[ch], qmin, qmax, &inside);
            std::vector<uint8_t>& want = scratch;
            el.store(want, 0, want_f);
            if (inside) want_mask[o >> 3] |= uint8_t(1u << (o & 7));
            const float got_f = el.load(out, o);
            const bool same = std::memcmp(&want[0], &out[o * el.size], el.size) == 0 ||
                              (std::isnan(want_f) && std::isnan(got_f));
            if (!same) {
              std::printf("FAIL isa=%s %s n=%lld inner=%lld C=%lld at %lld: x=%g got %g want %g\n", isa, el.name,
                          (long long)c.n, (long long)c.inner, (long long)c.C, (long long)o, el.load(x, o), got_f,
                          el.load(want, 0));
              ok = false;
            }
          }
          for (size_t b = c.n * el.size; b < out.size() && ok; ++b) {
            if (out[b] != 0xA5) {
              std::printf("FAIL isa=%s %s n=%lld: wrote past n\n", isa, el.name, (long long)c.n);
              ok = false;
            }
          }
          for (int64_t b = 0; with_mask && b < nbytes + 8 && ok; ++b) {
            const uint8_t want = b < nbytes ? want_mask[b] : 0xCC;
            if (mask[b] != want) {
              std::printf("FAIL isa=%s %s n=%lld inner=%lld C=%lld: mask byte %lld got %02x want %02x\n", isa,
                          el.name, (long long)c.n, (long long)c.inner, (long long)c.C, (long long)b, mask[b], want);
              ok = false;
            }
          }
          failures += !ok;
        }
      }
    }
  }
  cpu::force_isa("auto");
  std::printf("test_cpu_kernels: %d ISA levels, %d runs, %d failed\n", isas_run, runs, failures);
  return failures == 0 && isas_run > 0 ? 0 : 1;
}
