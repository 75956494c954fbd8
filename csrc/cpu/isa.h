// Runtime ISA selection for the CPU kernels (see isa.cpp). One build runs on any x86-64 CPU: each kernel
// is compiled once per level inside `#pragma GCC target` regions and the level is picked at run time.
#pragma once
#include <cstdint>

namespace zsqfast::cpu {

enum class Isa : int { Scalar = 0, Avx2 = 1, Avx512 = 2, Avx512Vnni = 3 };

// The level the kernels use now: the best this CPU supports, unless force_isa() lowered it.
Isa active_isa();

// Elements per parallel chunk: a multiple of 64 (so no two threads share a mask byte), at least 32 Ki
// elements, and at most ~256 chunks. Depends only on n, so every reduction is the same on any thread count.
inline int64_t chunk_size(int64_t n) {
  int64_t ch = (n + 255) / 256;
  if (ch < 32768) ch = 32768;
  return (ch + 63) / 64 * 64;
}

}  // namespace zsqfast::cpu

#include <algorithm>
#include <vector>

namespace zsqfast::cpu {

// Threads for the parallel chunk loops (registration.cpp passes at::get_num_threads() before each call).
int num_threads();

// fn(chunk_index, begin, end) for every chunk of [0, n), chunks spread over the threads (static schedule).
template <class Fn>
void for_each_chunk(int64_t n, Fn&& fn) {
  const int64_t ch = chunk_size(n);
  const int64_t nchunks = (n + ch - 1) / ch;
  const int threads = int(std::min<int64_t>(num_threads(), nchunks));
#pragma omp parallel for schedule(static) num_threads(threads) if (threads > 1)
  for (int64_t i = 0; i < nchunks; ++i) fn(i, i * ch, std::min(n, (i + 1) * ch));
}

// Per-channel parameters of a kernel walking memory order, where element o has channel (o / inner) % C.
// Short periods (inner < 64, period inner*C small) become "tables": arrays indexed by the position in the
// period, extended so that any 16 consecutive lanes load contiguously. Long channel runs use broadcasts.
struct ChannelParams {
  static constexpr int kLanes = 16;  // the widest vector
  const float* per_channel[3];
  int64_t inner, C, P, P2;           // P = inner * C; P2 = a multiple of P that is >= kLanes
  bool table;
  std::vector<float> tab[3];         // length P2 + kLanes when table

  ChannelParams(const float* a, const float* b, const float* c, int64_t inner_, int64_t C_, int64_t max_period)
      : per_channel{a, b, c}, inner(inner_), C(C_) {
    P = inner * C;
    P2 = P * ((kLanes + P - 1) / P);
    table = inner < 64 && P2 <= max_period;
    if (!table) return;
    for (int k = 0; k < 3; ++k) {
      if (!per_channel[k]) continue;
      tab[k].resize(size_t(P2 + kLanes));
      // position p holds channel (p / inner) % C: walk channels with counters (no division per entry)
      int64_t c = 0, i = 0;
      for (float& v : tab[k]) {
        v = per_channel[k][c];
        if (++i == inner) {
          i = 0;
          if (++c == C) c = 0;
        }
      }
    }
  }
  int64_t channel(int64_t o) const { return (o / inner) % C; }
  const float* t(int k) const { return tab[k].data(); }
};

}  // namespace zsqfast::cpu
