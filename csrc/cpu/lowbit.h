// The CPU low-bit integer GEMM engine shared by lowbit_gemm.cpp (GEMM, linear) and lowbit_conv2d.cpp.
// Math: zsqfast/ops/lowbit_gemm.py. Everything here is exact integer arithmetic up to the fp32 epilogue,
// which follows the reference's order: y = fp32(c) * fp32(sa * sw) + bias.
#pragma once
#include <cstdint>
#include <memory>
#include <vector>

#include "../kernels.h"  // set_num_threads
#include "isa.h"         // num_threads

namespace zsqfast::cpu::lowbit {

constexpr int64_t kBlockK = 128;  // the K granule of the packed layout (zsqfast/ops/lowbit_pack.py)
inline int64_t padded_k(int64_t K) { return (K + kBlockK - 1) / kBlockK * kBlockK; }
// Bytes of one packed weight row of Kp (padded) codes: two codes a byte up to 4 bits, one above.
inline int64_t row_bytes(int bits, int64_t Kp) { return bits <= 4 ? Kp / 2 : Kp; }
// Code k of one packed weight row: a byte per code above 4 bits; up to 4 bits every block of 128 codes is 64
// bytes, code j of the block in the low nibble of its byte j and code 64 + j in the high nibble.
inline int32_t packed_code(const uint8_t* row, int bits, int64_t k) {
  if (bits >= 5) return row[k];
  const uint8_t v = row[k / kBlockK * 64 + (k % 64)];
  return (k % kBlockK) < 64 ? v & 15 : v >> 4;
}
// All Kp codes of one packed row as bytes (each xor `flip`: 0x80 turns 8-bit codes into s8 form).
inline void unpack_codes(const uint8_t* row, int bits, int64_t Kp, uint8_t* out, uint8_t flip = 0) {
  if (bits >= 5) {
    for (int64_t k = 0; k < Kp; ++k) out[k] = row[k] ^ flip;
    return;
  }
  for (int64_t b = 0; b < Kp / kBlockK; ++b)
    for (int j = 0; j < 64; ++j) {
      const uint8_t v = row[b * 64 + j];
      out[b * kBlockK + j] = v & 15;
      out[b * kBlockK + 64 + j] = v >> 4;
    }
}

// Activation codes in the engine's form: rows of `lda` (a multiple of 128, >= K) bytes, columns >= K zero,
// `rows` >= M allocated rows (the tail rows are zero: the register-blocked kernel reads whole row blocks).
// K-major form (kmajor, from the convolution's im2col): codes[k * ldk + m], k < lda, ldk = M rounded up to 8.
// Blocked form (blocked, quantized straight into the VNNI GEMM's register-block order, see lowbit_gemm_vnni.cpp):
// code (m, k) at codes[((m / 8) * lda / 4 + k / 4) * 32 + (m % 8) * 4 + k % 4].
template <class T>
struct NoInit : std::allocator<T> {  // vector storage that resize() leaves uninitialized (every byte is written)
  template <class U> struct rebind { using other = NoInit<U>; };
  template <class U> void construct(U* p) noexcept { ::new (static_cast<void*>(p)) U; }
};
struct Acts {
  std::vector<uint8_t, NoInit<uint8_t>> codes;
  std::vector<int32_t> rowsum;  // ra[m] = sum_k codes[m, k]
  int64_t M = 0, lda = 0, ldk = 0;
  bool kmajor = false, blocked = false;
  void resize(int64_t M_, int64_t K);          // row-major, zero-filled
  void resize_kmajor(int64_t M_, int64_t K);   // K-major, zero-filled
  uint8_t* row(int64_t m) { return codes.data() + m * lda; }
};

// Fused epilogue (y != nullptr): y[m * ldy + n] = fp32(c) * fp32(sa[m] * sw[n]) (+ bias[n]) with
// c = acc - zw[n] ra[m] + za[m] d[n], d[n] = K zw[n] - cw[n]  (= sum_k (ua - za)(uw - zw), exact).
// sa / za have one element per tensor (per_token false) or M. Raw mode (y == nullptr): acc[m * N + n].
struct Gemm {
  const uint8_t* w;  // packed weight codes (N rows)
  int w_bits, a_bits;
  int64_t N, K;
  int32_t* acc = nullptr;
  float* y = nullptr;
  int64_t ldy = 0;
  bool y_trans = false;  // y[n * ldy + m] instead (the convolution's NCHW output)
  const float* sw = nullptr;
  const int32_t* zw = nullptr;
  const int32_t* cw = nullptr;
  const float* bias = nullptr;
  const float* sa = nullptr;
  const int32_t* za = nullptr;
  bool per_token = false;
};

// Threads for a parallel loop over `items` work items: at most the CPU kernels' count, and 1 inside an
// enclosing parallel region (the convolution runs images in parallel, each image's GEMM serially).
int threads_for(int64_t items);

// Limits the CPU kernels' thread count to n for a scope (restored on exit; registration.cpp sets it anew
// before every call anyway).
struct ThreadLimit {
  int saved;
  explicit ThreadLimit(int n) : saved(num_threads()) {
    if (n < saved) set_num_threads(n);
  }
  ~ThreadLimit() { set_num_threads(saved); }
};

// Threads worth using for a call of `macs` multiply-adds: one below 2^23, where the fork/join of its parallel
// regions costs more than the work (measured: a 2.4M-MAC 3x3 conv at batch 1 took 0.13 ms on one thread and
// 0.53 ms on two), else all.
inline int threads_for_macs(double macs) { return macs < double(1 << 23) ? 1 : num_threads(); }

// y or acc for rows [0, acts.M) of `acts` (threads over output columns; exact on every ISA level).
void run(const Gemm& g, const Acts& acts);

// codes of rows [0, M) of x (row stride ldx floats, K values) into acts (resized here, row-major or, when
// `blocked`, in the blocked form), with row sums: clamp(rne(x * inv[m]) + za[m], 0, 2^bits - 1) in fp32
// (inv / za: 1 element or M). Returns false when x holds a NaN (which has no code).
bool quantize_rows(const float* x, int64_t ldx, int64_t M, int64_t K, const float* inv, const int32_t* za,
                   bool per_token, int bits, Acts& acts, bool blocked = false);

// Whether run() takes the VNNI register-blocked GEMM for M rows (which reads the blocked form directly).
bool blocked_gemm(int a_bits, int w_bits, int64_t M);

// Does |sum over K terms of (ua - za)(uw - zw)| < 2^31 hold for codes ua in 0..2^a_bits-1, uw in
// 0..2^w_bits-1 and every zero point za[0..n_za), zw[0..N)? (Then int32 sums are exact, and wrapping int32
// arithmetic equals the exact result.)
bool int32_exact(int64_t K, int a_bits, const int32_t* za, int64_t n_za, int w_bits, const int32_t* zw, int64_t N);

// int32_exact for g's rows and columns (the epilogue may then use wrapping int32 arithmetic).
bool narrow_epilogue(const Gemm& g, int64_t n_za);

}  // namespace zsqfast::cpu::lowbit
