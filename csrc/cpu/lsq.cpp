// CPU LSQ fake quantization. Math: csrc/kernels.h and zsqfast/ops/lsq.py.
//   forward   out = min(hi, max(lo, rne(x * inv[c]))) * step[c]
//   backward  v = x * inv[c];  grad_x = (v < lo || v > hi) ? 0 : grad  (NaN v passes grad);
//             grad_step[c] = grad_scale * sum_{o in c} grad * (v < lo ? lo : v > hi ? hi : rne(v) - v)
// One fused pass each way; the backward writes grad_x and reduces the step gradient in registers, with no
// per-element temporaries.
//
// Step-gradient summation (deterministic): the fixed chunks of simd.h (they depend on n only) each produce
// one partial sum per channel, in double; the partials are added in chunk order, then multiplied by
// grad_scale and rounded to fp32 once. Inside a chunk the products are accumulated in fp32 vector lanes for
// at most 64 additions per lane (Runs: 64 vectors of one channel; Table: 64 periods), then moved to double,
// so the fp32 error is that of a 64-term sum while the long sums are double.
//
// Same "self-include" layout as fake_quant.cpp: the kernel bodies (#else branch) are compiled once per ISA.
#ifndef ZSQ_LSQ_BODY
#include "simd.h"

namespace zsqfast::cpu::detail {
struct LsqArgs {
  const void* grad;  // backward only
  const void* x;
  void* out;         // forward: out; backward: grad_x
  double* sums;      // backward: (chunks, C) partial step-gradient sums, zeroed
  const Geo* geo;    // step, inv_step
  float qmin, qmax;
};
using LsqFn = void (*)(const LsqArgs&, int64_t, int64_t, int64_t);
}  // namespace zsqfast::cpu::detail

#define ZSQ_LSQ_BODY
#define ZSQ_ISA_PASS
ZSQ_BEGIN_AVX512
namespace zsqfast::cpu::detail::k_avx512 {
namespace {
using V = V512;
#include "simd.h"
#include "lsq.cpp"
}  // namespace
}  // namespace zsqfast::cpu::detail::k_avx512
ZSQ_END_TARGET
ZSQ_BEGIN_AVX2
namespace zsqfast::cpu::detail::k_avx2 {
namespace {
using V = V256;
#include "simd.h"
#include "lsq.cpp"
}  // namespace
}  // namespace zsqfast::cpu::detail::k_avx2
ZSQ_END_TARGET
namespace zsqfast::cpu::detail::k_scalar {
namespace {
using V = VScalar;
#include "simd.h"
#include "lsq.cpp"
}  // namespace
}  // namespace zsqfast::cpu::detail::k_scalar
#undef ZSQ_ISA_PASS
#undef ZSQ_LSQ_BODY

namespace zsqfast::cpu {

void lsq_fwd(DType dt, const void* x, void* out, int64_t n, const float* step, const float* inv_step,
             int64_t inner, int64_t C, float qmin, float qmax) {
  using namespace detail;
  if (n <= 0) return;
  const Geo geo(n, step, inv_step, nullptr, inner, C, /*max_table=*/16384, /*want_chan=*/false);
  const LsqArgs a{nullptr, x, out, nullptr, &geo, qmin, qmax};
  const LsqFn fn = pick(k_avx512::fwd_fn(dt), k_avx2::fwd_fn(dt), k_scalar::fwd_fn(dt));
  for_each_chunk(n, [&](int64_t i, int64_t b, int64_t e) { fn(a, i, b, e); });
}

void lsq_bwd(DType dt, const void* grad, const void* x, void* grad_x, float* grad_step, int64_t n,
             const float* step, const float* inv_step, int64_t inner, int64_t C, float qmin, float qmax,
             float grad_scale) {
  using namespace detail;
  if (n <= 0) {
    for (int64_t c = 0; c < C; ++c) grad_step[c] = 0.0f;
    return;
  }
  // Table mode keeps one fp32 accumulator per table position and folds them per chunk: a short table.
  const Geo geo(n, step, inv_step, nullptr, inner, C, /*max_table=*/4096, /*want_chan=*/true);
  const int64_t nchunks = num_chunks(n), gc = geo.C;
  std::vector<double> sums(size_t(nchunks * gc), 0.0);
  const LsqArgs a{grad, x, grad_x, sums.data(), &geo, qmin, qmax};
  const LsqFn fn = pick(k_avx512::bwd_fn(dt), k_avx2::bwd_fn(dt), k_scalar::bwd_fn(dt));
  for_each_chunk(n, [&](int64_t i, int64_t b, int64_t e) { fn(a, i, b, e); });
  for (int64_t c = 0; c < C; ++c) {
    double total = 0.0;
    if (c < gc)
      for (int64_t k = 0; k < nchunks; ++k) total += sums[size_t(k * gc + c)];
    grad_step[c] = float(total * double(grad_scale));
  }
}

}  // namespace zsqfast::cpu

#else  // ---------------------------------------- kernel bodies, once per level (V) -------------------

template <class S>
void lsq_fwd_chunk(const LsqArgs& a, int64_t, int64_t begin, int64_t end) {
  using T = typename S::T;
  using F = typename V::F;
  const T* x = static_cast<const T*>(a.x);
  T* y = static_cast<T*>(a.out);
  const F lo = V::set1(a.qmin), hi = V::set1(a.qmax);
  walk(*a.geo, begin, end, [&](int64_t o, int cnt, F s, F inv, F) __attribute__((always_inline)) {
    const bool full = cnt == V::W;
    const F xv = V::template to_f32<S>(full ? V::template load_raw<S>(x + o) : V::template load_raw_n<S>(x + o, cnt));
    const auto r = V::template from_f32<S>(V::mul(V::clamp(V::rne(V::mul(xv, inv)), lo, hi), s));
    if (full) {
      V::template store_raw<S>(y + o, r);
    } else {
      V::template store_raw_n<S>(y + o, r, cnt);
    }
  });
}

// The fused backward step of one block at o (cnt lanes): writes grad_x, returns grad * dstep (0 in the
// lanes >= cnt).
template <class S>
ZSQ_INLINE typename V::F lsq_bwd_step(const typename S::T* g, const typename S::T* x, typename S::T* gx, int64_t o,
                                      int cnt, typename V::F inv, typename V::F lo, typename V::F hi) {
  using F = typename V::F;
  const bool full = cnt == V::W;
  const auto graw = full ? V::template load_raw<S>(g + o) : V::template load_raw_n<S>(g + o, cnt);
  const F xv = V::template to_f32<S>(full ? V::template load_raw<S>(x + o) : V::template load_raw_n<S>(x + o, cnt));
  const F v = V::mul(xv, inv);
  const auto below = V::lt(v, lo), above = V::gt(v, hi);
  const auto keep = V::template maskz_raw<S>(V::mnot(V::mor(below, above)), graw);  // grad_x = grad, exactly
  if (full) {
    V::template store_raw<S>(gx + o, keep);
  } else {
    V::template store_raw_n<S>(gx + o, keep, cnt);
  }
  const F d = V::select(below, lo, V::select(above, hi, V::sub(V::rne(v), v)));
  const F p = V::mul(V::template to_f32<S>(graw), d);
  return full ? p : V::maskz(V::lanes(cnt), p);
}

// Writes grad_x for [begin, end) and adds this chunk's step-gradient sums into a.sums[chunk * C + c].
template <class S>
void lsq_bwd_chunk(const LsqArgs& a, int64_t chunk, int64_t begin, int64_t end) {
  using T = typename S::T;
  using F = typename V::F;
  constexpr int W = V::W;
  constexpr int kFlush = 64;  // fp32 additions per lane before moving to double
  const Geo& geo = *a.geo;
  const T* g = static_cast<const T*>(a.grad);
  const T* x = static_cast<const T*>(a.x);
  T* gx = static_cast<T*>(a.out);
  double* sums = a.sums + chunk * geo.C;
  const float* inv_c = geo.p[1];
  const F lo = V::set1(a.qmin), hi = V::set1(a.qmax);
  int64_t o = begin;
  switch (geo.mode) {
    case Geo::Mode::Runs: {  // one fp32 vector accumulator per channel run, a double per run segment
      int64_t c = (o / geo.inner) % geo.C, run_end = (o / geo.inner + 1) * geo.inner;
      F acc = V::zero();
      int nacc = 0;
      double dsum = 0.0;
      for (;;) {
        const F inv = V::set1(inv_c[c]);
        const int64_t stop = std::min(run_end, end);
        for (; o + W <= stop; o += W) {
          acc = V::add(acc, lsq_bwd_step<S>(g, x, gx, o, W, inv, lo, hi));
          if (++nacc == kFlush) {
            dsum += V::hsum_d(acc);
            acc = V::zero();
            nacc = 0;
          }
        }
        if (o >= end) break;
        const int k = int(stop - o);  // lanes of the block at o still in channel c: 0 <= k < W
        if (stop == end) {
          acc = V::add(acc, lsq_bwd_step<S>(g, x, gx, o, k, inv, lo, hi));
          break;
        }
        const int64_t c2 = c + 1 == geo.C ? 0 : c + 1;
        run_end += geo.inner;
        if (k == 0) {  // the run of c ended on a block boundary
          sums[c] += dsum + V::hsum_d(acc);
          acc = V::zero();
          nacc = 0;
        } else {  // the block straddles the end of the run: lanes < k are channel c, the rest c2
          const auto m = V::lanes(k);
          const int cnt = int(std::min<int64_t>(W, end - o));
          const F p = lsq_bwd_step<S>(g, x, gx, o, cnt, V::select(m, inv, V::set1(inv_c[c2])), lo, hi);
          sums[c] += dsum + V::hsum_d(V::add(acc, V::maskz(m, p)));
          acc = V::maskz(V::mnot(m), p);
          nacc = 1;
          o += cnt;
        }
        dsum = 0.0;
        c = c2;
        if (o >= end) break;
      }
      sums[c] += dsum + V::hsum_d(acc);
      return;
    }
    case Geo::Mode::Table: {  // one fp32 accumulator per table position, folded into channels
      const float* ti = geo.tab[1].data();
      const int32_t* ch = geo.chan.data();
      const int64_t len = geo.P2 + Geo::kPad;
      std::vector<float> accv(size_t(len), 0.0f);
      float* acc = accv.data();
      auto fold = [&] {
        for (int64_t q = 0; q < len; ++q) {
          sums[ch[q]] += double(acc[q]);
          acc[q] = 0.0f;
        }
      };
      const int64_t flush_blocks = int64_t(kFlush) * ((geo.P2 + W - 1) / W);  // ~kFlush periods
      int64_t pos = begin % geo.P2, nb = 0;
      for (; o + W <= end; o += W) {
        V::storef(acc + pos, V::add(V::loadf(acc + pos), lsq_bwd_step<S>(g, x, gx, o, W, V::loadf(ti + pos), lo, hi)));
        pos += W;
        if (pos >= geo.P2) pos -= geo.P2;
        if (++nb == flush_blocks) {
          fold();
          nb = 0;
        }
      }
      if (o < end) {
        const F p = lsq_bwd_step<S>(g, x, gx, o, int(end - o), V::loadf(ti + pos), lo, hi);
        V::storef(acc + pos, V::add(V::loadf(acc + pos), p));
      }
      fold();
      return;
    }
    case Geo::Mode::Lanes: {  // per-lane channels, products added to their channel one by one
      alignas(64) float li[W], pr[W];
      int64_t lc[W];
      int64_t c = (o / geo.inner) % geo.C, rem = o % geo.inner;
      for (; o < end; o += W) {
        for (int i = 0; i < W; ++i) {
          li[i] = inv_c[c];
          lc[i] = c;
          if (++rem == geo.inner) {
            rem = 0;
            if (++c == geo.C) c = 0;
          }
        }
        const int cnt = int(std::min<int64_t>(W, end - o));
        V::storef(pr, lsq_bwd_step<S>(g, x, gx, o, cnt, V::loadf(li), lo, hi));
        for (int i = 0; i < cnt; ++i) sums[lc[i]] += double(pr[i]);
      }
      return;
    }
  }
}

inline LsqFn fwd_fn(DType dt) {
  switch (dt) {
    case DType::F16: return &lsq_fwd_chunk<F16>;
    case DType::BF16: return &lsq_fwd_chunk<BF16>;
    default: return &lsq_fwd_chunk<F32>;
  }
}

inline LsqFn bwd_fn(DType dt) {
  switch (dt) {
    case DType::F16: return &lsq_bwd_chunk<F16>;
    case DType::BF16: return &lsq_bwd_chunk<BF16>;
    default: return &lsq_bwd_chunk<F32>;
  }
}

#endif  // ZSQ_LSQ_BODY
