// CUDA low-bit integer GEMM and linear layer on tensor cores (compile-checked here, never run on a GPU; the
// fragment / tile / epilogue functions also run on the host in tests/cpp/test_lowbit_cuda_emulation.cu).
//
// Contract and math: zsqfast/ops/lowbit_gemm.py; weight layout: zsqfast/ops/lowbit_pack.py (rows padded to
// K_pad = 128 * ceil(K / 128) codes; bits <= 4: byte 64b + j holds code 128b + j in its low nibble and code
// 128b + 64 + j in its high nibble; bits >= 5: one code a byte).
//
// Two MMA paths, one kernel template:
//  * int4 (sm_80 / 86 / 89, W<=4 and A<=4 in lowbit_linear): mma.sync.m16n8k64.row.col.s32.u4.u4.s32. The
//    activation codes are quantized into the SAME half-block nibble layout as the weights, so one 32-bit word
//    of either operand is one fragment register with no repacking: a k64 MMA step consumes 32 bytes of a
//    row, and MMA position p of step s is nibble (p & 1) of byte 32 s + p / 2 on both sides. A sum over k is
//    the same in any order, as long as A and B agree on it, and here they read identical offsets.
//  * u8 (sm_90, which has no int4 MMA; every arch for 5..8-bit operands and the raw lowbit_gemm, whose
//    codes may be 0..255): mma.sync.m16n8k32.row.col.s32.u8.u8.s32 on activation codes in natural order and
//    weights unpacked in registers: a packed word of bytes j .. j+3 gives codes j .. j+3 (w & 0x0F0F0F0F)
//    and 64+j .. 64+j+3 ((w >> 4) & 0x0F0F0F0F) in natural order, i.e. straight u8 fragment registers. On
//    Hopper the gain over int8 is memory only (half the weight bytes).
// Unsigned x unsigned MMAs: no sign shifts; the accumulators are exact for K <= max_k (no saturation).
//
// CTA tile (BM, BN) = (WM * MI * 16, WN * NI * 8), WM x WN warps, each warp MI x NI MMA tiles; the K loop
// walks the layout's 128-code blocks through a 2-stage cp.async pipeline (16-byte copies, zero-filled past
// the last row; every operand row is a multiple of 64 bytes, so 16-byte aligned when its base is). Shared
// rows are padded by 16 bytes: the fragment loads (8 rows x 4 words a warp) are bank-conflict free.
// Epilogue (lowbit_linear), per output, exactly as the reference:
//   c = acc - zw[n] ra[m] - za[m] cw[n] + K za[m] zw[n]   (int64)      y = fp32(c) * fp32(sa[m] sw[n]) + bias[n]
// The activation codes and row sums ra come from lowbit_quantize_kernel (one block per row and group).
// Grouped GEMM (the im2col of a grouped / depthwise convolution): grid z = group, each group its K_pad
// codes of every A row, its weight rows and output columns (group_view).
#include "common.cuh"

namespace zsqfast::cuda_detail {

constexpr int kLbBlockK = 128;  // codes per layout block (zsqfast.ops.lowbit_pack.BLOCK_K)
constexpr int kLbPad = 16;      // bytes of padding per shared-memory row
constexpr int kLbQuantThreads = 128;

ZSQ_HD uint32_t ld32(const uint8_t* p) {  // 4-byte aligned little-endian word
#ifdef __CUDA_ARCH__
  return *reinterpret_cast<const uint32_t*>(p);
#else
  uint32_t v;
  std::memcpy(&v, p, 4);
  return v;
#endif
}
ZSQ_HD uint32_t lo_nibbles(uint32_t w) { return w & 0x0F0F0F0Fu; }         // bytes j..j+3: codes j..j+3
ZSQ_HD uint32_t hi_nibbles(uint32_t w) { return (w >> 4) & 0x0F0F0F0Fu; }  // codes 64+j .. 64+j+3

// ---- tile geometry ----
template <int WM_, int WN_, int MI_, int NI_, bool A_U4_, bool B_PACKED_>
struct LbTile {
  static constexpr int WM = WM_, WN = WN_, MI = MI_, NI = NI_;
  static constexpr bool A_U4 = A_U4_, B_PACKED = B_PACKED_;
  static constexpr int kThreads = WM * WN * 32;
  static constexpr int BM = WM * MI * 16, BN = WN * NI * 8;
  static constexpr int kABytes = A_U4 ? kLbBlockK / 2 : kLbBlockK;     // bytes of one block of an A row
  static constexpr int kBBytes = B_PACKED ? kLbBlockK / 2 : kLbBlockK;  // ... of a weight row
  static constexpr int kSA = kABytes + kLbPad, kSB = kBBytes + kLbPad;  // shared row strides
  static constexpr int kStageBytes = BM * kSA + BN * kSB;
  static constexpr int kSteps = A_U4 ? 2 : 4;  // MMA k-steps per block: k64 (u4) or k32 (u8), 32 A bytes each
  static_assert(!A_U4 || B_PACKED, "the int4 path needs nibble-packed weights");
};

// 16 bytes global -> shared; zero-filled when !valid (src is then any readable address).
ZSQ_HD void copy16(uint8_t* dst, const uint8_t* src, bool valid) {
#ifdef __CUDA_ARCH__
  const unsigned s = static_cast<unsigned>(__cvta_generic_to_shared(dst));
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(s), "l"(src), "r"(valid ? 16 : 0));
#else
  if (valid) std::memcpy(dst, src, 16);
  else std::memset(dst, 0, 16);
#endif
}

// Thread `tid` of `nthreads` copies its share of rows [row0, row0 + R) x bytes [kb * BYTES, +BYTES) of a
// (rows, ld) byte matrix into a shared tile of stride S. Rows past `rows` become zeros.
template <int R, int BYTES, int S>
ZSQ_HD void load_tile(uint8_t* tile, const uint8_t* g, int64_t ld, int64_t row0, int64_t rows, int64_t kb, int tid,
                      int nthreads) {
  constexpr int kChunks = BYTES / 16;
  const uint8_t* base = g + row0 * ld + kb * BYTES;
  const int64_t left = rows - row0;  // valid rows of this tile (may exceed R)
  ZSQ_UNROLL
  for (int i = tid; i < R * kChunks; i += nthreads) {
    const int r = i / kChunks, c = i % kChunks;
    const bool valid = r < left;
    copy16(tile + r * S + 16 * c, valid ? base + r * ld + 16 * c : g, valid);
  }
}

// ---- fragments (PTX ISA, mma.m16n8k32 .u8 and mma.m16n8k64 .u4; g = lane >> 2, t = lane & 3):
// A (16 x k, row): a0 = row g, a1 = row g + 8, a2 / a3 the same rows 16 bytes further; each register is
// the 4 bytes at byte 4t of the row's 16-byte half (4 u8 codes, or 8 u4 codes). B (k x 8, col): b0, b1 =
// column (weight row) g, bytes 4t and 16 + 4t. C: c0, c1 = row g, columns 2t, 2t + 1; c2, c3 = row g + 8.
// `As` points at the warp's m-tile (16 rows), `Bs` at its n-tile (8 weight rows), both at the block start.
template <class Tile>
ZSQ_HD void frag_a(const uint8_t* As, int lane, int step, uint32_t a[4]) {
  const int g = lane >> 2, t = lane & 3;
  const uint8_t* p = As + g * Tile::kSA + 32 * step + 4 * t;
  a[0] = ld32(p);
  a[1] = ld32(p + 8 * Tile::kSA);
  a[2] = ld32(p + 16);
  a[3] = ld32(p + 8 * Tile::kSA + 16);
}

template <class Tile>
ZSQ_HD void frag_b(const uint8_t* Bs, int lane, int step, uint32_t b[2]) {
  const int g = lane >> 2, t = lane & 3;
  if constexpr (Tile::B_PACKED && !Tile::A_U4) {
    // u8 step s covers codes 32 s .. 32 s + 31: low nibbles of bytes 32 (s & 1) + ... for s < 2, high after
    const uint8_t* p = Bs + g * Tile::kSB + 32 * (step & 1) + 4 * t;
    const uint32_t w0 = ld32(p), w1 = ld32(p + 16);
    b[0] = step < 2 ? lo_nibbles(w0) : hi_nibbles(w0);
    b[1] = step < 2 ? lo_nibbles(w1) : hi_nibbles(w1);
  } else {  // u4 on packed weights, or u8 on byte weights: the words are the registers
    const uint8_t* p = Bs + g * Tile::kSB + 32 * step + 4 * t;
    b[0] = ld32(p);
    b[1] = ld32(p + 16);
  }
}

// (row, column) inside the 16 x 8 MMA tile of accumulator register i (0..3) of `lane`.
ZSQ_HD void acc_coord(int lane, int i, int& row, int& col) {
  row = (lane >> 2) + 8 * (i >> 1);
  col = 2 * (lane & 3) + (i & 1);
}

// The launched tiles. M <= 16: one 16-row MMA block, 4 warps across N, 16 x 64 (the weights dominate the
// traffic; narrow tiles give more CTAs along N); else 64 x 64 with 2 x 2 warps of 32 x 32.
using SmallU8W4 = LbTile<1, 4, 1, 2, false, true>;
using SmallU8W8 = LbTile<1, 4, 1, 2, false, false>;
using SmallU4 = LbTile<1, 4, 1, 2, true, true>;
using LargeU8W4 = LbTile<2, 2, 2, 4, false, true>;
using LargeU8W8 = LbTile<2, 2, 2, 4, false, false>;
using LargeU4 = LbTile<2, 2, 2, 4, true, true>;

__device__ __forceinline__ void mma_u8(int32_t c[4], const uint32_t a[4], const uint32_t b[2]) {
  asm volatile(
      "mma.sync.aligned.m16n8k32.row.col.s32.u8.u8.s32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"
      : "+r"(c[0]), "+r"(c[1]), "+r"(c[2]), "+r"(c[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
}
__device__ __forceinline__ void mma_u4(int32_t c[4], const uint32_t a[4], const uint32_t b[2]) {
#if __CUDA_ARCH__ >= 800 && __CUDA_ARCH__ < 900
  asm volatile(
      "mma.sync.aligned.m16n8k64.row.col.s32.u4.u4.s32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"
      : "+r"(c[0]), "+r"(c[1]), "+r"(c[2]), "+r"(c[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
#else
  __trap();  // no int4 MMA on this arch: the launcher never selects the int4 path here
#endif
}

// ---- quantization and epilogue (one element) ----
// code = clamp(rne(x * inv) + za, 0, qmax) in fp32, NaN -> 0 (as kernels/lowbit_gemm.py)
ZSQ_HD uint32_t quant_code(float x, float inv, float za, float qmax) {
  const float q = add_rn(rne(mul_rn(x, inv)), za);
  return uint32_t(q > qmax ? qmax : (q >= 0.0f ? q : 0.0f));
}

// Byte i of a row's code workspace from the row xr (K floats): u8 code i (natural order), or (PACK4) the
// half-block byte i = 64 b + j holding codes 128 b + j (low nibble) and 128 b + 64 + j (high); codes past
// K are 0. Adds the byte's codes to `sum`.
template <bool PACK4>
ZSQ_HD uint8_t quant_byte(const float* xr, int64_t i, int64_t K, float inv, float za, float qmax, int& sum) {
  if constexpr (PACK4) {
    const int64_t k0 = (i >> 6) * kLbBlockK + (i & 63), k1 = k0 + 64;
    const uint32_t c0 = k0 < K ? quant_code(ldf(xr + k0), inv, za, qmax) : 0u;
    const uint32_t c1 = k1 < K ? quant_code(ldf(xr + k1), inv, za, qmax) : 0u;
    sum += int(c0 + c1);
    return uint8_t(c0 | (c1 << 4));
  } else {
    const uint32_t c = i < K ? quant_code(ldf(xr + i), inv, za, qmax) : 0u;
    sum += int(c);
    return uint8_t(c);
  }
}

// Thread `tid` of `nthreads` writes its bytes of row r of the code workspace (rows of ld = K_pad or
// K_pad / 2 bytes) from row r of x (rows of K floats) and returns the sum of their codes. Row r = m G + g is
// group g of activation row m for a grouped GEMM.
template <bool PACK4>
ZSQ_HD int quant_row_part(const float* x, uint8_t* q, int64_t K, int64_t K_pad, int64_t r, float inv, float za,
                          float qmax, int tid, int nthreads) {
  const int64_t ld = PACK4 ? K_pad / 2 : K_pad;
  const float* xr = x + r * K;
  uint8_t* qr = q + r * ld;
  int sum = 0;
  for (int64_t i = tid; i < ld; i += nthreads) qr[i] = quant_byte<PACK4>(xr, i, K, inv, za, qmax, sum);
  return sum;
}

struct LbEpilogue {
  const int32_t *ra, *cw, *za, *zw;  // ra[m * ra_stride]: row sums of the activation codes (of one group)
  const float *sa, *sw, *bias;
  bool per_token;
  int64_t ra_stride;
};

ZSQ_HD float ll2f(int64_t v) {
#ifdef __CUDA_ARCH__
  return __ll2float_rn(v);
#else
  return static_cast<float>(v);  // correctly rounded (round to nearest even) on the host
#endif
}

// y = fp32(c) * fp32(sa * sw) + bias, c = acc - zw ra - za cw + K za zw in int64
ZSQ_HD float epilogue_value(int32_t acc, int64_t m, int64_t n, int64_t K, const LbEpilogue& e) {
  const int64_t za = e.za[e.per_token ? m : 0], zw = e.zw[n];
  const int64_t c = int64_t(acc) - zw * e.ra[m * e.ra_stride] - za * e.cw[n] + K * za * zw;
  const float y = mul_rn(ll2f(c), mul_rn(e.sa[e.per_token ? m : 0], e.sw[n]));
  return e.bias != nullptr ? add_rn(y, e.bias[n]) : y;
}

struct LbArgs {
  const uint8_t* a;  // (M, lda) codes: u8 natural order, or u4 half-block (A_U4); zero past K
  const uint8_t* w;  // (N, ldw) packed weights
  void* out;         // int32 (M, ldo) accumulators, or fp32 (M, ldo) outputs (EPI)
  int64_t lda, ldw, ldo, M, N, K, K_pad;
  LbEpilogue e;
  int64_t group_a;   // grouped GEMM (a grouped convolution): bytes of one group's codes in an A row
};

// Launch arguments (host): the raw GEMM on u8 codes (M, K_pad); lowbit_linear on the code workspace of
// lowbit_quantize_kernel, `groups` groups of N / groups output channels.
inline LbArgs gemm_args(const uint8_t* a, const uint8_t* w, int32_t* acc, int64_t M, int64_t N, int64_t K, int w_bits) {
  const int64_t kp = (K + kLbBlockK - 1) / kLbBlockK * kLbBlockK;
  return LbArgs{a, w, acc, kp, w_bits <= 4 ? kp / 2 : kp, N, M, N, K, kp, {}, 0};
}
inline LbArgs linear_args(const uint8_t* codes, const uint8_t* w, float* y, int64_t M, int64_t N, int64_t K,
                          int w_bits, bool int4, int64_t groups, const LbEpilogue& e) {
  const int64_t kp = (K + kLbBlockK - 1) / kLbBlockK * kLbBlockK, group_a = int4 ? kp / 2 : kp;
  return LbArgs{codes, w, y, groups * group_a, w_bits <= 4 ? kp / 2 : kp, N, M, N / groups, K, kp, e, group_a};
}

// The operands of group g of a grouped GEMM (blockIdx.z): A bytes g group_a .. of every row, weight rows and
// output columns g N .. g N + N - 1 and their per-channel operands, row sums ra[m G + g] (ra_stride = G).
ZSQ_HD LbArgs group_view(LbArgs a, int64_t g) {
  a.a += g * a.group_a;
  a.w += g * a.N * a.ldw;
  if (a.e.ra != nullptr) {  // lowbit_linear / conv (the raw GEMM has no epilogue and one group)
    a.out = static_cast<float*>(a.out) + g * a.N;
    a.e.ra += g, a.e.cw += g * a.N, a.e.zw += g * a.N, a.e.sw += g * a.N;
    if (a.e.bias != nullptr) a.e.bias += g * a.N;
  }
  return a;
}

template <class Tile, bool EPI>
__global__ void __launch_bounds__(Tile::kThreads) lowbit_gemm_kernel(LbArgs all_groups) {
  const LbArgs args = group_view(all_groups, blockIdx.z);
  __shared__ __align__(16) uint8_t smem[2 * Tile::kStageBytes];
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int wm = warp / Tile::WN, wn = warp % Tile::WN;
  // M tiles on grid x (up to 2^31 - 1: convolutions make tall M), N tiles on y; consecutive CTAs share a
  // weight tile in L2
  const int64_t m0 = int64_t(blockIdx.x) * Tile::BM, n0 = int64_t(blockIdx.y) * Tile::BN;
  int32_t acc[Tile::MI][Tile::NI][4] = {};
  const int64_t blocks = args.K_pad / kLbBlockK;
  auto stage = [&](int s) { return smem + s * Tile::kStageBytes; };
  auto issue = [&](int64_t kb) {
    uint8_t* st = stage(int(kb & 1));
    load_tile<Tile::BM, Tile::kABytes, Tile::kSA>(st, args.a, args.lda, m0, args.M, kb, tid, Tile::kThreads);
    load_tile<Tile::BN, Tile::kBBytes, Tile::kSB>(st + Tile::BM * Tile::kSA, args.w, args.ldw, n0, args.N, kb, tid,
                                                  Tile::kThreads);
  };
  issue(0);
  asm volatile("cp.async.commit_group;\n" ::);
  for (int64_t kb = 0; kb < blocks; ++kb) {
    if (kb + 1 < blocks) issue(kb + 1);
    asm volatile("cp.async.commit_group;\n" ::);  // possibly empty: keeps the group count uniform
    asm volatile("cp.async.wait_group 1;\n" ::);  // block kb has landed
    __syncthreads();
    const uint8_t* As = stage(int(kb & 1)) + (wm * Tile::MI * 16) * Tile::kSA;
    const uint8_t* Bs = stage(int(kb & 1)) + Tile::BM * Tile::kSA + (wn * Tile::NI * 8) * Tile::kSB;
    ZSQ_UNROLL
    for (int s = 0; s < Tile::kSteps; ++s) {
      uint32_t a[Tile::MI][4], b[Tile::NI][2];
      ZSQ_UNROLL
      for (int i = 0; i < Tile::MI; ++i) frag_a<Tile>(As + i * 16 * Tile::kSA, lane, s, a[i]);
      ZSQ_UNROLL
      for (int j = 0; j < Tile::NI; ++j) frag_b<Tile>(Bs + j * 8 * Tile::kSB, lane, s, b[j]);
      ZSQ_UNROLL
      for (int i = 0; i < Tile::MI; ++i) {
        ZSQ_UNROLL
        for (int j = 0; j < Tile::NI; ++j) {
          if constexpr (Tile::A_U4) mma_u4(acc[i][j], a[i], b[j]);
          else mma_u8(acc[i][j], a[i], b[j]);
        }
      }
    }
    __syncthreads();  // the next issue() overwrites this stage
  }
  ZSQ_UNROLL
  for (int i = 0; i < Tile::MI; ++i) {
    ZSQ_UNROLL
    for (int j = 0; j < Tile::NI; ++j) {
      ZSQ_UNROLL
      for (int r = 0; r < 4; ++r) {
        int row, col;
        acc_coord(lane, r, row, col);
        const int64_t m = m0 + (wm * Tile::MI + i) * 16 + row, n = n0 + (wn * Tile::NI + j) * 8 + col;
        if (m < args.M && n < args.N) {
          if constexpr (EPI) static_cast<float*>(args.out)[m * args.ldo + n] = epilogue_value(acc[i][j][r], m, n, args.K, args.e);
          else static_cast<int32_t*>(args.out)[m * args.ldo + n] = acc[i][j][r];
        }
      }
    }
  }
}

// One block per (row, group) (grid-stride over rows, blockIdx.y = group g of G = gridDim.y): codes of
// x[m, g K .. g K + K - 1] (x rows of G K floats) into row m of q, bytes g ld .. g ld + ld - 1 (rows of G ld
// bytes; u8 natural order, or u4 half-block layout when PACK4; ld = K_pad or K_pad / 2), zero past K, and
// rowsum[m G + g] = the sum of those codes.
template <bool PACK4>
__global__ void __launch_bounds__(kLbQuantThreads) lowbit_quantize_kernel(const float* __restrict__ x,
                                                                          uint8_t* __restrict__ q,
                                                                          int32_t* __restrict__ rowsum,
                                                                          const float* __restrict__ inv,
                                                                          const int32_t* __restrict__ za,
                                                                          bool per_token, int64_t M, int64_t K,
                                                                          int64_t K_pad, float qmax) {
  __shared__ int red[kLbQuantThreads / 32];
  const int64_t g = blockIdx.y, G = gridDim.y;
  for (int64_t m = blockIdx.x; m < M; m += gridDim.x) {
    const float iv = ldf(inv + (per_token ? m : 0)), z = float(__ldg(za + (per_token ? m : 0)));
    int sum = quant_row_part<PACK4>(x, q, K, K_pad, m * G + g, iv, z, qmax, threadIdx.x, kLbQuantThreads);
    ZSQ_UNROLL
    for (int s = 16; s > 0; s >>= 1) sum += __shfl_xor_sync(0xffffffffu, sum, s);
    if ((threadIdx.x & 31) == 0) red[threadIdx.x >> 5] = sum;
    __syncthreads();
    if (threadIdx.x == 0) {
      int total = 0;
      for (int w = 0; w < kLbQuantThreads / 32; ++w) total += red[w];
      rowsum[m * G + g] = total;
    }
    __syncthreads();
  }
}

}  // namespace zsqfast::cuda_detail

namespace zsqfast::cuda {
namespace d = zsqfast::cuda_detail;

namespace {
using d::LargeU4, d::LargeU8W4, d::LargeU8W8, d::SmallU4, d::SmallU8W4, d::SmallU8W8;

template <class Tile, bool EPI>
void launch(const d::LbArgs& a, int64_t groups, cudaStream_t s) {
  const dim3 grid(unsigned((a.M + Tile::BM - 1) / Tile::BM), unsigned((a.N + Tile::BN - 1) / Tile::BN), unsigned(groups));
  d::lowbit_gemm_kernel<Tile, EPI><<<grid, Tile::kThreads, 0, s>>>(a);
}

template <bool EPI>
void dispatch(const d::LbArgs& a, bool int4, int w_bits, int64_t groups, cudaStream_t s) {
  const bool small = a.M <= 16;
  if (int4) small ? launch<SmallU4, EPI>(a, groups, s) : launch<LargeU4, EPI>(a, groups, s);
  else if (w_bits <= 4) small ? launch<SmallU8W4, EPI>(a, groups, s) : launch<LargeU8W4, EPI>(a, groups, s);
  else small ? launch<SmallU8W8, EPI>(a, groups, s) : launch<LargeU8W8, EPI>(a, groups, s);
}

int64_t pad_k(int64_t K) { return (K + d::kLbBlockK - 1) / d::kLbBlockK * d::kLbBlockK; }
}  // namespace

bool lowbit_int4_path(int a_bits, int w_bits) {
  if (a_bits > 4 || w_bits > 4) return false;
  int dev = 0, major = 0;
  if (cudaGetDevice(&dev) != cudaSuccess || cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, dev) != cudaSuccess)
    return false;
  return major == 8;  // sm_80 / 86 / 89: int4 MMA; sm_90 has none
}

int64_t lowbit_codes_row_bytes(int64_t K, int a_bits, int w_bits) {
  return lowbit_int4_path(a_bits, w_bits) ? pad_k(K) / 2 : pad_k(K);
}

void lowbit_gemm(const uint8_t* a, const uint8_t* w_packed, int32_t* acc, int64_t M, int64_t N, int64_t K, int w_bits,
                 void* stream) {
  if (M <= 0 || N <= 0) return;
  dispatch<false>(d::gemm_args(a, w_packed, acc, M, N, K, w_bits), false, w_bits, 1, static_cast<cudaStream_t>(stream));
}

void lowbit_linear(const float* x, const uint8_t* w_packed, float* y, int64_t M, int64_t N, int64_t K, int w_bits,
                   const float* w_scale, const int32_t* w_zero, const int32_t* w_colsum, const float* a_scale,
                   const float* a_inv_scale, const int32_t* a_zero, bool per_token, int a_bits, const float* bias,
                   int64_t groups, uint8_t* codes, int32_t* rowsum, void* stream) {
  if (M <= 0 || N <= 0 || groups <= 0) return;
  const auto s = static_cast<cudaStream_t>(stream);
  const bool int4 = lowbit_int4_path(a_bits, w_bits);
  const int64_t kp = pad_k(K);
  const dim3 qgrid(unsigned(M < 65535 * 16 ? M : 65535 * 16), unsigned(groups));
  const float qmax = float((1 << a_bits) - 1);
  if (int4) d::lowbit_quantize_kernel<true><<<qgrid, d::kLbQuantThreads, 0, s>>>(x, codes, rowsum, a_inv_scale, a_zero, per_token, M, K, kp, qmax);
  else d::lowbit_quantize_kernel<false><<<qgrid, d::kLbQuantThreads, 0, s>>>(x, codes, rowsum, a_inv_scale, a_zero, per_token, M, K, kp, qmax);
  const d::LbEpilogue e{rowsum, w_colsum, a_zero, w_zero, a_scale, w_scale, bias, per_token, groups};
  dispatch<true>(d::linear_args(codes, w_packed, y, M, N, K, w_bits, int4, groups, e), int4, w_bits, groups, s);
}

}  // namespace zsqfast::cuda
