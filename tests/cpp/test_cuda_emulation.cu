// Host emulation of the CUDA kernels (no GPU needed; nothing is launched). The per-unit and per-thread
// functions of csrc/cuda/*.cu are __host__ __device__: this runs them for every unit / (block, thread) of a
// launch and checks, against a naive per-element loop:
//   fake_quant fwd/bwd, lsq fwd, lsq bwd grad_x: bit for bit (outputs and mask bytes, padding bits 0),
//     nothing written outside [0, n), on 16-byte-aligned (vector path) and misaligned (scalar path) buffers;
//   lsq bwd grad_step: the kernels' exact reduction tree (warp butterflies, fixed chunking) vs an fp64 sum,
//     and bit-identical between the vector and the scalar path.
// Build: nvcc -std=c++17 -I csrc -gencode arch=compute_80,code=compute_80 tests/cpp/test_cuda_emulation.cu
// Exit code 0 = pass.
#include <cmath>
#include <cstdio>
#include <cstring>
#include <random>
#include <vector>

#include "cuda/fake_quant.cu"
#include "cuda/lsq.cu"
#include "emulation_check.h"

using namespace zsqfast::cuda_detail;

namespace {

template <class T> const char* dtype_name();
template <> const char* dtype_name<float>() { return "f32"; }
template <> const char* dtype_name<__half>() { return "f16"; }
template <> const char* dtype_name<__nv_bfloat16>() { return "bf16"; }

// A buffer of n elements at `off` elements past a 16-byte boundary, with guard elements around it.
template <class T> struct Buf {
  static constexpr int kGuard = 16;
  std::vector<unsigned char> mem;
  T* p;
  int64_t n;
  Buf(int64_t n_, int off) : mem((n_ + 2 * kGuard) * sizeof(T) + 64, 0xA5), n(n_) {
    uintptr_t a = (reinterpret_cast<uintptr_t>(mem.data()) + 15) & ~uintptr_t(15);
    p = reinterpret_cast<T*>(a) + kGuard + off;
  }
  uint32_t raw(int64_t i) const { return Unit<T>::load_raw(p + i); }
  void set_raw(int64_t i, uint32_t r) { Unit<T>::store_raw(p + i, r); }
  float get(int64_t i) const { return Storage<T>::to_float(raw(i)); }
  void set(int64_t i, float v) { set_raw(i, Storage<T>::from_float(v)); }
  bool guards_intact() const {
    const unsigned char* lo = reinterpret_cast<const unsigned char*>(p - kGuard);
    const unsigned char* hi = reinterpret_cast<const unsigned char*>(p + n);
    for (size_t i = 0; i < kGuard * sizeof(T); ++i)
      if (lo[i] != 0xA5 || hi[i] != 0xA5) return false;
    return true;
  }
};

struct Geo {
  int64_t outer, C, inner;
  int64_t n() const { return outer * C * inner; }
};

std::mt19937 rng(1234);

// Inputs with ties, NaN, +-Inf, -0, values far outside the grid.
template <class T> void fill_x(Buf<T>& x, const std::vector<float>& s) {
  std::normal_distribution<float> nd(0.0f, 3.0f);
  std::uniform_int_distribution<int> pick(0, 19), k(-40, 40);
  for (int64_t i = 0; i < x.n; ++i) {
    const float sc = s[i % s.size()];
    float v;
    switch (pick(rng)) {
      case 0: v = NAN; break;
      case 1: v = INFINITY; break;
      case 2: v = -INFINITY; break;
      case 3: v = -0.0f; break;
      case 4: case 5: case 6: v = (float(k(rng)) + 0.5f) * 0.0625f; break;  // ties when scale is a power of 2
      default: v = nd(rng) * sc * 4.0f;
    }
    x.set(i, v);
  }
}

template <class T> void fill_grad(Buf<T>& g) {
  std::normal_distribution<float> nd(0.0f, 1.0f);
  std::uniform_int_distribution<int> pick(0, 49);
  for (int64_t i = 0; i < g.n; ++i) {
    const int p = pick(rng);
    g.set(i, p == 0 ? -0.0f : (p == 1 ? NAN : nd(rng)));
  }
}

struct Params {
  std::vector<float> s, inv, zp;
  float qmin, qmax;
};

Params make_params(int64_t C, float qmin, float qmax, bool pow2) {
  Params p;
  p.qmin = qmin, p.qmax = qmax;
  for (int64_t c = 0; c < C; ++c) {
    const float s = pow2 ? std::ldexp(1.0f, -int(2 + c % 4)) : 0.013f * float(1 + c % 7) + 0.001f * float(c);
    p.s.push_back(s);
    p.inv.push_back(1.0f / s);  // torch.reciprocal: one rounding
    p.zp.push_back(qmin == 0.0f ? float(c % 5) : 0.0f);
  }
  return p;
}

// Raw-bit equality of two storage values.
template <class T> bool same(const Buf<T>& a, const Buf<T>& b, int64_t i) { return a.raw(i) == b.raw(i); }

template <class T> void test_fake_quant(const Geo& g, int off, const Params& P) {
  const int64_t n = g.n();
  if (n <= 0) return;
  const size_t units = size_t(n + 7) / 8;
  const int64_t inner = g.C == 1 ? 1 : g.inner;
  Buf<T> x(n, off), out(n, off), want(n, 0);
  fill_x(x, P.s);
  std::vector<uint8_t> mask(units + 4, 0xCC), want_mask(units, 0);
  for (int64_t o = 0; o < n; ++o) {  // naive
    const int64_t c = (o / inner) % g.C;
    const float q = rintf(x.get(o) * P.inv[c]) + P.zp[c];
    const float qc = q < P.qmin ? P.qmin : (q > P.qmax ? P.qmax : q);
    want.set(o, (qc - P.zp[c]) * P.s[c]);
    if (q >= P.qmin && q <= P.qmax) want_mask[o >> 3] |= uint8_t(1u << (o & 7));
  }
  const FqArgs a{P.s.data(), P.inv.data(), P.zp.data(), inner, g.C, P.qmin, P.qmax};
  const bool vec = aligned16(x.p) && aligned16(out.p);
  CHECK(vec == (off == 0), "alignment detection");
  for (int64_t u = 0; u < int64_t(units); ++u) fq_fwd_unit<T>(x.p, out.p, mask.data(), n, a, vec, u);
  for (int64_t o = 0; o < n; ++o)
    CHECK(same(out, want, o), "fake_quant fwd %s n=%lld C=%lld inner=%lld off=%d at %lld: x=%g got %g want %g",
          dtype_name<T>(), (long long)n, (long long)g.C, (long long)inner, off, (long long)o, x.get(o), out.get(o),
          want.get(o));
  CHECK(out.guards_intact(), "fake_quant fwd wrote outside [0, n)");
  for (size_t b = 0; b < units; ++b)
    CHECK(mask[b] == want_mask[b], "mask byte %lld: got %02x want %02x", (long long)b, mask[b], want_mask[b]);
  CHECK(mask[units] == 0xCC, "mask written past ceil(n/8)");

  // backward on the same mask (with a few more bits cleared / set randomly, padding stays 0)
  std::vector<uint8_t> m2(units);
  for (size_t b = 0; b < units; ++b) m2[b] = uint8_t(rng());
  if (n % 8) m2[units - 1] &= uint8_t((1u << (n % 8)) - 1);
  Buf<T> grad(n, off), gx(n, off);
  fill_grad(grad);
  const bool vb = aligned16(grad.p) && aligned16(gx.p);
  for (int64_t u = 0; u < int64_t(units); ++u) fq_bwd_unit<T>(grad.p, m2.data(), gx.p, n, vb, u);
  for (int64_t o = 0; o < n; ++o) {
    const uint32_t w = ((m2[o >> 3] >> (o & 7)) & 1) ? grad.raw(o) : 0u;
    CHECK(gx.raw(o) == w, "fake_quant bwd %s at %lld", dtype_name<T>(), (long long)o);
  }
  CHECK(gx.guards_intact(), "fake_quant bwd wrote outside [0, n)");
}

template <class T> void test_lsq_fwd(const Geo& g, int off, const Params& P) {
  const int64_t n = g.n();
  const int64_t inner = g.C == 1 ? 1 : g.inner;
  Buf<T> x(n, off), out(n, off), want(n, 0);
  fill_x(x, P.s);
  for (int64_t o = 0; o < n; ++o) {
    const int64_t c = (o / inner) % g.C;
    const float r = rintf(x.get(o) * P.inv[c]);
    want.set(o, (r < P.qmin ? P.qmin : (r > P.qmax ? P.qmax : r)) * P.s[c]);
  }
  const LsqArgs a{P.s.data(), P.inv.data(), inner, g.C, P.qmin, P.qmax};
  const bool vec = aligned16(x.p) && aligned16(out.p);
  for (int64_t u = 0; u < (n + 7) / 8; ++u) lsq_fwd_unit<T>(x.p, out.p, n, a, vec, u);
  for (int64_t o = 0; o < n; ++o)
    CHECK(same(out, want, o), "lsq fwd %s n=%lld C=%lld inner=%lld off=%d at %lld: got %g want %g", dtype_name<T>(),
          (long long)n, (long long)g.C, (long long)inner, off, (long long)o, out.get(o), want.get(o));
  CHECK(out.guards_intact(), "lsq fwd wrote outside [0, n)");
}

// The device reductions, lane by lane.
float warp_sum_host(const float* v32) {
  float v[32];
  std::memcpy(v, v32, sizeof v);
  for (int s = 16; s > 0; s >>= 1) {
    float t[32];
    for (int l = 0; l < 32; ++l) t[l] = v[l] + v[l ^ s];
    std::memcpy(v, t, sizeof v);
  }
  for (int l = 1; l < 32; ++l)
    if (std::memcmp(&v[l], &v[0], 4) != 0 && !(std::isnan(v[l]) && std::isnan(v[0]))) std::abort();  // lanes agree
  return v[0];
}
float block_sum_host(const std::vector<float>& acc) {
  const int warps = int(acc.size()) / 32;
  float red[32] = {};
  for (int w = 0; w < warps; ++w) red[w] = warp_sum_host(&acc[32 * w]);
  return warp_sum_host(red);
}

// Runs the backward as the kernels do (chunk sums, then the finishing fold); returns grad_step.
template <class T>
std::vector<float> run_lsq_bwd(const Buf<T>& grad, const Buf<T>& x, Buf<T>& gx, const Geo& g, const Params& P,
                               float grad_scale) {
  const int64_t n = g.n();
  const LsqArgs a{P.s.data(), P.inv.data(), g.C == 1 ? 1 : g.inner, g.C, P.qmin, P.qmax};
  const LsqBwdGeometry geo = lsq_bwd_geometry(n, a.inner, a.C, aligned16(grad.p) && aligned16(x.p) && aligned16(gx.p));
  const int threads = lsq_bwd_threads(geo.K);
  std::vector<float> grad_step(g.C);
  for (int64_t c = 0; c < g.C; ++c) {
    float lanes[32] = {};
    for (int64_t j = 0; j < geo.chunks; ++j) {
      std::vector<float> acc(threads);
      for (int t = 0; t < threads; ++t) acc[t] = lsq_bwd_thread<T>(grad.p, x.p, gx.p, a, geo, c, j, t, threads);
      lanes[j & 31] = lanes[j & 31] + block_sum_host(acc);
    }
    grad_step[c] = warp_sum_host(lanes) * grad_scale;
  }
  return grad_step;
}

template <class T> void test_lsq_bwd(const Geo& g, const Params& P) {
  const int64_t n = g.n();
  const int64_t inner = g.C == 1 ? 1 : g.inner;
  const float grad_scale = 0.37f;
  std::vector<float> results[2];
  Buf<T> want(n, 0);
  std::vector<double> ref(g.C, 0.0), mag(g.C, 0.0);
  std::vector<bool> has_nan(g.C, false);
  Buf<T> x0(n, 0), g0(n, 0);
  fill_x(x0, P.s);
  fill_grad(g0);
  for (int64_t o = 0; o < n; ++o) {
    const int64_t c = (o / inner) % g.C;
    const float v = x0.get(o) * P.inv[c];
    const bool below = v < P.qmin, above = v > P.qmax;
    const float d = below ? P.qmin : (above ? P.qmax : rintf(v) - v);
    const float gd = g0.get(o) * d;
    if (std::isnan(gd)) has_nan[c] = true;
    ref[c] += double(gd);
    mag[c] += std::fabs(double(gd));
    want.set_raw(o, (below || above) ? 0u : g0.raw(o));
  }
  for (int off = 0; off < 2; ++off) {
    Buf<T> x(n, off), gr(n, off), gx(n, off);
    for (int64_t o = 0; o < n; ++o) x.set_raw(o, x0.raw(o)), gr.set_raw(o, g0.raw(o));
    results[off] = run_lsq_bwd(gr, x, gx, g, P, grad_scale);
    for (int64_t o = 0; o < n; ++o)
      CHECK(gx.raw(o) == want.raw(o), "lsq bwd grad_x %s n=%lld C=%lld inner=%lld off=%d at %lld", dtype_name<T>(),
            (long long)n, (long long)g.C, (long long)inner, off, (long long)o);
    CHECK(gx.guards_intact(), "lsq bwd wrote outside [0, n)");
  }
  for (int64_t c = 0; c < g.C; ++c) {
    const float a = results[0][c], b = results[1][c];
    CHECK(std::memcmp(&a, &b, 4) == 0 || (std::isnan(a) && std::isnan(b)),
          "lsq bwd grad_step differs between vector and scalar paths: %.9g vs %.9g", a, b);
    if (has_nan[c]) {
      CHECK(std::isnan(a), "lsq bwd grad_step[%lld] should be NaN", (long long)c);
    } else {
      const double w = ref[c] * grad_scale, tol = 2e-6 * mag[c] * grad_scale + 1e-30;
      CHECK(std::fabs(double(a) - w) <= tol, "lsq bwd grad_step[%lld] %s n=%lld C=%lld inner=%lld: got %.9g want %.9g",
            (long long)c, dtype_name<T>(), (long long)n, (long long)g.C, (long long)inner, a, w);
    }
  }
}

template <class T> void run_all() {
  const Geo geos[] = {
      {1, 1, 1},     {7, 1, 1},        {8, 1, 1},     {9, 1, 1},       {100003, 1, 1},  // per tensor
      {40003, 1, 1},                                                                 // per tensor, 3 chunks
      {4, 16, 64},   {3, 2, 8192},     {1, 5, 16392},                                // inner % 8 == 0 (one channel per unit)
      {1000, 5, 1},  {2100, 3, 9},     {2, 7, 3},     {13, 11, 7},     {1, 300, 9},  // inner % 8 != 0
      {1, 3, 20000}, {2, 4, 4608},     {5, 3, 12},                                   // long runs, run crossings
  };
  for (const Geo& g : geos) {
    for (int variant = 0; variant < 3; ++variant) {
      const Params P = variant == 0 ? make_params(g.C, 0.0f, 15.0f, true)
                     : variant == 1 ? make_params(g.C, -8.0f, 7.0f, false)
                                    : make_params(g.C, -128.0f, 127.0f, true);
      for (int off = 0; off < 2; ++off) {
        test_fake_quant<T>(g, off, P);
        test_lsq_fwd<T>(g, off, P);
      }
      test_lsq_bwd<T>(g, P);
    }
  }
}

}  // namespace

int main() {
  run_all<float>();
  run_all<__half>();
  run_all<__nv_bfloat16>();
  std::printf("cuda emulation: %d checks, %d failures\n", g_checks, g_failures);
  return g_failures == 0 ? 0 : 1;
}
