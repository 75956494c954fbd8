// The one registration unit: declares the raw-kernel ops of namespace `zsqfast_ext` and binds them to the
// CPU kernels (and, built with ZSQFAST_WITH_CUDA, to the CUDA kernels). The public `zsqfast::*` ops are
// declared in Python (zsqfast/ops); their CPU/CUDA kernels call these after preparing the kernel contract
// (dense input, fp32 (C,) scales, channel geometry).
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <torch/library.h>

#include <array>

#include "kernels.h"

#ifdef ZSQFAST_WITH_CUDA
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <ATen/ops/constant_pad_nd.h>
#include <ATen/ops/im2col.h>
#endif

namespace zsqfast {
namespace {

// The storage dtype of t; also hands the CPU kernels torch's current thread count (torch.set_num_threads).
DType dtype_of(const at::Tensor& t) {
  cpu::set_num_threads(at::get_num_threads());
  switch (t.scalar_type()) {
    case at::kFloat: return DType::F32;
    case at::kHalf: return DType::F16;
    case at::kBFloat16: return DType::BF16;
    default: TORCH_CHECK(false, "zsqfast: kernels take float32, float16 or bfloat16, got ", t.scalar_type());
  }
}

void check_params(const at::Tensor& x, std::initializer_list<const at::Tensor*> params, int64_t C) {
  for (const at::Tensor* p : params) {
    TORCH_CHECK(p->scalar_type() == at::kFloat && p->is_contiguous() && p->numel() == C,
                "zsqfast: per-channel parameters must be contiguous float32 of ", C, " elements");
    TORCH_CHECK(p->device() == x.device(), "zsqfast: parameters must be on ", x.device());
  }
}

// grad must be laid out like x (the kernels walk both in x's memory order). Strides only matter when
// there is more than one element: a 1-element gradient may come with stride 0 (an expanded scalar).
void check_like(const at::Tensor& grad, const at::Tensor& x) {
  TORCH_CHECK(grad.sizes() == x.sizes() && grad.scalar_type() == x.scalar_type() &&
                  (x.numel() <= 1 || grad.strides() == x.strides()),
              "zsqfast: grad must have x's shape, strides and dtype");
}

#ifdef ZSQFAST_WITH_CUDA
// The current stream of t's device, with that device made current for the launch.
struct OnDevice {
  explicit OnDevice(const at::Tensor& t) : guard(t.device()), stream(c10::cuda::getCurrentCUDAStream().stream()) {}
  c10::cuda::CUDAGuard guard;
  void* stream;
};
#define ZSQ_CUDA_BRANCH(t, ...)      \
  if ((t).is_cuda()) {               \
    OnDevice dev(t);                 \
    __VA_ARGS__;                     \
    C10_CUDA_KERNEL_LAUNCH_CHECK();  \
  } else
#else
#define ZSQ_CUDA_BRANCH(t, ...)
#endif

std::tuple<at::Tensor, at::Tensor> fake_quant(const at::Tensor& x, const at::Tensor& scale,
                                              const at::Tensor& inv_scale, const at::Tensor& zero_point,
                                              int64_t qmin, int64_t qmax, int64_t inner, int64_t C,
                                              bool need_mask) {
  check_params(x, {&scale, &inv_scale, &zero_point}, C);
  TORCH_CHECK(inner >= 1 && C >= 1, "zsqfast: bad channel geometry");
  at::Tensor out = at::empty_like(x);  // x is dense: empty_like keeps its strides (memory order)
  const int64_t n = x.numel();
  at::Tensor mask = at::empty({need_mask ? (n + 7) / 8 : 0}, x.options().dtype(at::kByte));
  uint8_t* m = need_mask ? mask.data_ptr<uint8_t>() : nullptr;
  const float *s = scale.data_ptr<float>(), *inv = inv_scale.data_ptr<float>(), *zp = zero_point.data_ptr<float>();
  ZSQ_CUDA_BRANCH(x, cuda::fake_quant_fwd(dtype_of(x), x.data_ptr(), out.data_ptr(), m, n, s, inv, zp, inner, C,
                                          float(qmin), float(qmax), dev.stream))
  cpu::fake_quant_fwd(dtype_of(x), x.data_ptr(), out.data_ptr(), m, n, s, inv, zp, inner, C, float(qmin), float(qmax));
  return {out, mask};
}

at::Tensor fake_quant_backward(const at::Tensor& grad, const at::Tensor& mask) {
  const int64_t n = grad.numel();
  TORCH_CHECK(mask.scalar_type() == at::kByte && mask.is_contiguous() && mask.numel() == (n + 7) / 8 &&
                  mask.device() == grad.device(),
              "zsqfast: mask must be contiguous uint8 of ceil(numel/8) bytes on the gradient's device");
  at::Tensor out = at::empty_like(grad);
  const uint8_t* m = mask.data_ptr<uint8_t>();
  ZSQ_CUDA_BRANCH(grad, cuda::fake_quant_bwd(dtype_of(grad), grad.data_ptr(), m, out.data_ptr(), n, dev.stream))
  cpu::fake_quant_bwd(dtype_of(grad), grad.data_ptr(), m, out.data_ptr(), n);
  return out;
}

at::Tensor lsq_fake_quant(const at::Tensor& x, const at::Tensor& step, const at::Tensor& inv_step, int64_t qmin,
                          int64_t qmax, int64_t inner, int64_t C) {
  check_params(x, {&step, &inv_step}, C);
  at::Tensor out = at::empty_like(x);
  const float *s = step.data_ptr<float>(), *inv = inv_step.data_ptr<float>();
  ZSQ_CUDA_BRANCH(x, cuda::lsq_fwd(dtype_of(x), x.data_ptr(), out.data_ptr(), x.numel(), s, inv, inner, C,
                                   float(qmin), float(qmax), dev.stream))
  cpu::lsq_fwd(dtype_of(x), x.data_ptr(), out.data_ptr(), x.numel(), s, inv, inner, C, float(qmin), float(qmax));
  return out;
}

std::tuple<at::Tensor, at::Tensor> lsq_fake_quant_backward(const at::Tensor& grad, const at::Tensor& x,
                                                           const at::Tensor& step, const at::Tensor& inv_step,
                                                           int64_t qmin, int64_t qmax, int64_t inner, int64_t C,
                                                           double grad_scale) {
  check_params(x, {&step, &inv_step}, C);
  check_like(grad, x);
  at::Tensor grad_x = at::empty_like(x);
  at::Tensor grad_step = at::empty({C}, step.options());
  const float *s = step.data_ptr<float>(), *inv = inv_step.data_ptr<float>();
  float* gs = grad_step.data_ptr<float>();
  ZSQ_CUDA_BRANCH(x, cuda::lsq_bwd(dtype_of(x), grad.data_ptr(), x.data_ptr(), grad_x.data_ptr(), gs, x.numel(), s,
                                   inv, inner, C, float(qmin), float(qmax), float(grad_scale), dev.stream))
  cpu::lsq_bwd(dtype_of(x), grad.data_ptr(), x.data_ptr(), grad_x.data_ptr(), gs, x.numel(), s, inv, inner, C,
               float(qmin), float(qmax), float(grad_scale));
  return {grad_x, grad_step};
}

std::tuple<at::Tensor, at::Tensor> bn_stats(const at::Tensor& x, int64_t inner, int64_t C) {
  TORCH_CHECK(x.device().is_cpu(), "zsqfast: bn_stats has no CUDA kernel in this build");
  TORCH_CHECK(inner >= 1 && C >= 1 && x.numel() % C == 0, "zsqfast: bad channel geometry");
  at::Tensor mean = at::empty({C}, x.options().dtype(at::kFloat));
  at::Tensor var = at::empty({C}, x.options().dtype(at::kFloat));
  cpu::bn_stats(dtype_of(x), x.data_ptr(), x.numel(), inner, C, mean.data_ptr<float>(), var.data_ptr<float>());
  return {mean, var};
}

at::Tensor bn_stats_backward(const std::optional<at::Tensor>& grad, const at::Tensor& x, const at::Tensor& a,
                             const at::Tensor& b, int64_t inner, int64_t C) {
  TORCH_CHECK(x.device().is_cpu(), "zsqfast: bn_stats_backward has no CUDA kernel in this build");
  check_params(x, {&a, &b}, C);
  const void* g = nullptr;
  if (grad.has_value()) {
    check_like(*grad, x);
    g = grad->data_ptr();
  }
  at::Tensor out = at::empty_like(x);
  cpu::bn_stats_bwd(dtype_of(x), g, x.data_ptr(), out.data_ptr(), x.numel(), a.data_ptr<float>(), b.data_ptr<float>(),
                    inner, C);
  return out;
}

#ifdef ZSQFAST_WITH_CUDA
// ---- low-bit integer GEMM / linear, CUDA (contracts: zsqfast/ops/lowbit_gemm.py) ----
int64_t lowbit_pad_k(int64_t K) { return (K + 127) / 128 * 128; }

// t itself when its data is 16-byte aligned (the kernels copy 16-byte chunks), else an aligned copy.
at::Tensor lowbit_aligned16(const at::Tensor& t) {
  return (reinterpret_cast<uintptr_t>(t.data_ptr()) & 15u) == 0 ? t : t.clone();
}

void check_lowbit_weight(const at::Tensor& w, int64_t w_bits, int64_t K, const at::Tensor& like) {
  TORCH_CHECK(w_bits >= 2 && w_bits <= 8, "zsqfast: w_bits must be 2..8, got ", w_bits);
  TORCH_CHECK(K >= 1, "zsqfast: K must be positive");
  const int64_t kp = lowbit_pad_k(K);
  TORCH_CHECK(w.scalar_type() == at::kByte && w.dim() == 2 && w.is_contiguous() &&
                  w.size(1) == (w_bits <= 4 ? kp / 2 : kp) && w.device() == like.device(),
              "zsqfast: w_packed must be contiguous uint8 (N, ", w_bits <= 4 ? kp / 2 : kp, ") on ", like.device());
}

at::Tensor lowbit_gemm_cuda(const at::Tensor& a, const at::Tensor& w_packed, int64_t w_bits, int64_t K) {
  TORCH_CHECK(a.scalar_type() == at::kByte && a.dim() == 2 && a.size(1) == K && a.is_contiguous(),
              "zsqfast: a must be contiguous uint8 (M, K)");
  check_lowbit_weight(w_packed, w_bits, K, a);
  const int64_t M = a.size(0), N = w_packed.size(0), kp = lowbit_pad_k(K);
  // the kernel reads (M, K_pad) rows, zero past K
  const at::Tensor ap = kp == K ? lowbit_aligned16(a) : at::constant_pad_nd(a, {0, kp - K}, 0);
  const at::Tensor wp = lowbit_aligned16(w_packed);
  at::Tensor acc = at::empty({M, N}, a.options().dtype(at::kInt));
  ZSQ_CUDA_BRANCH(a, cuda::lowbit_gemm(ap.data_ptr<uint8_t>(), wp.data_ptr<uint8_t>(), acc.data_ptr<int32_t>(), M, N,
                                       K, int(w_bits), dev.stream))
  TORCH_CHECK(false, "zsqfast: this lowbit_gemm kernel runs CUDA tensors only");
  return acc;
}

// x (M, groups K): see cuda::lowbit_linear.
at::Tensor lowbit_linear_grouped(const at::Tensor& x, const at::Tensor& w_packed, int64_t w_bits, int64_t K,
                                 const at::Tensor& w_scale, const at::Tensor& w_zero, const at::Tensor& w_colsum,
                                 const at::Tensor& a_scale, const at::Tensor& a_inv_scale, const at::Tensor& a_zero,
                                 int64_t a_bits, const std::optional<at::Tensor>& bias, int64_t groups) {
  TORCH_CHECK(x.scalar_type() == at::kFloat && x.dim() == 2 && x.size(1) == groups * K && x.is_contiguous(),
              "zsqfast: x must be contiguous float32 (M, K)");
  TORCH_CHECK(groups >= 1 && w_packed.size(0) % groups == 0, "zsqfast: groups must divide the output channels");
  TORCH_CHECK(a_bits >= 2 && a_bits <= 8, "zsqfast: a_bits must be 2..8, got ", a_bits);
  check_lowbit_weight(w_packed, w_bits, K, x);
  const int64_t M = x.size(0), N = w_packed.size(0);
  check_params(x, {&w_scale}, N);
  for (const at::Tensor* t : {&w_zero, &w_colsum})
    TORCH_CHECK(t->scalar_type() == at::kInt && t->is_contiguous() && t->numel() == N && t->device() == x.device(),
                "zsqfast: w_zero and w_colsum must be contiguous int32 of ", N, " elements on ", x.device());
  const int64_t P = a_scale.numel();
  TORCH_CHECK(P == 1 || P == M, "zsqfast: a_scale must have 1 (per tensor) or M (per token) elements");
  check_params(x, {&a_scale, &a_inv_scale}, P);
  TORCH_CHECK(a_zero.scalar_type() == at::kInt && a_zero.is_contiguous() && a_zero.numel() == P &&
                  a_zero.device() == x.device(),
              "zsqfast: a_zero must be contiguous int32 like a_scale");
  const float* b = nullptr;
  if (bias.has_value()) {
    check_params(x, {&*bias}, N);
    b = bias->data_ptr<float>();
  }
  const at::Tensor wp = lowbit_aligned16(w_packed);
  at::Tensor y = at::empty({M, N}, x.options());
  ZSQ_CUDA_BRANCH(x, {
    at::Tensor codes = at::empty({M * groups * cuda::lowbit_codes_row_bytes(K, int(a_bits), int(w_bits))},
                                 x.options().dtype(at::kByte));
    at::Tensor rowsum = at::empty({M * groups}, x.options().dtype(at::kInt));
    cuda::lowbit_linear(x.data_ptr<float>(), wp.data_ptr<uint8_t>(), y.data_ptr<float>(), M, N, K, int(w_bits),
                        w_scale.data_ptr<float>(), w_zero.data_ptr<int32_t>(), w_colsum.data_ptr<int32_t>(),
                        a_scale.data_ptr<float>(), a_inv_scale.data_ptr<float>(), a_zero.data_ptr<int32_t>(), P > 1,
                        int(a_bits), b, groups, codes.data_ptr<uint8_t>(), rowsum.data_ptr<int32_t>(), dev.stream);
  })
  TORCH_CHECK(false, "zsqfast: this lowbit_linear kernel runs CUDA tensors only");
  return y;
}

at::Tensor lowbit_linear_cuda(const at::Tensor& x, const at::Tensor& w_packed, int64_t w_bits, int64_t K,
                              const at::Tensor& w_scale, const at::Tensor& w_zero, const at::Tensor& w_colsum,
                              const at::Tensor& a_scale, const at::Tensor& a_inv_scale, const at::Tensor& a_zero,
                              int64_t a_bits, const std::optional<at::Tensor>& bias) {
  return lowbit_linear_grouped(x, w_packed, w_bits, K, w_scale, w_zero, w_colsum, a_scale, a_inv_scale, a_zero,
                               a_bits, bias, 1);
}

// im2col of x (B, C, H, W) -> (B L, C kh kw) rows in the weight's (c, i, j) order, one grouped GEMM, back to
// (B, OC, Ho, Wo). Zero padding is exact when 0 <= za <= qmax (the Python caller checks; else reference).
at::Tensor lowbit_conv2d_cuda(const at::Tensor& x, const at::Tensor& w_packed, int64_t w_bits, int64_t K,
                              const at::Tensor& w_scale, const at::Tensor& w_zero, const at::Tensor& w_colsum,
                              const at::Tensor& a_scale, const at::Tensor& a_inv_scale, const at::Tensor& a_zero,
                              int64_t a_bits, const std::optional<at::Tensor>& bias, at::IntArrayRef kernel_size,
                              at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation,
                              int64_t groups) {
  TORCH_CHECK(x.dim() == 4 && x.scalar_type() == at::kFloat, "zsqfast: x must be float32 (B, C, H, W)");
  TORCH_CHECK(a_scale.numel() == 1, "zsqfast: lowbit_conv2d quantizes activations per tensor");
  const at::Tensor cols = at::im2col(x.contiguous(), kernel_size, dilation, padding, stride);  // (B, C kh kw, L)
  const int64_t B = x.size(0), L = cols.size(2), OC = w_packed.size(0);
  const int64_t Ho = (x.size(2) + 2 * padding[0] - dilation[0] * (kernel_size[0] - 1) - 1) / stride[0] + 1;
  const int64_t Wo = (x.size(3) + 2 * padding[1] - dilation[1] * (kernel_size[1] - 1) - 1) / stride[1] + 1;
  TORCH_CHECK(Ho * Wo == L, "zsqfast: bad convolution geometry");
  const at::Tensor rows = cols.transpose(1, 2).contiguous().view({B * L, cols.size(1)});
  const at::Tensor y = lowbit_linear_grouped(rows, w_packed, w_bits, K, w_scale, w_zero, w_colsum, a_scale,
                                             a_inv_scale, a_zero, a_bits, bias, groups);
  return y.view({B, L, OC}).transpose(1, 2).reshape({B, OC, Ho, Wo}).contiguous();
}
#endif

at::Tensor circular_conv_sep(const at::Tensor& x, const at::Tensor& wh, const at::Tensor& ww) {
  TORCH_CHECK(x.device().is_cpu(), "zsqfast: circular_conv_sep has no CUDA kernel in this build");
  TORCH_CHECK(x.dim() == 3 && x.scalar_type() == at::kFloat && x.is_contiguous(),
              "zsqfast: circular_conv_sep takes contiguous float32 (planes, H, W)");
  for (const at::Tensor* w : {&wh, &ww}) {
    TORCH_CHECK(w->scalar_type() == at::kFloat && w->is_contiguous() && w->dim() == 1 && w->numel() % 2 == 1 &&
                    w->device().is_cpu(),
                "zsqfast: circular_conv_sep taps must be contiguous float32 CPU vectors of odd length");
  }
  at::Tensor out = at::empty_like(x);
  cpu::set_num_threads(at::get_num_threads());
  cpu::circular_conv_sep(x.data_ptr<float>(), out.data_ptr<float>(), x.size(0), x.size(1), x.size(2),
                         wh.data_ptr<float>(), (wh.numel() - 1) / 2, ww.data_ptr<float>(), (ww.numel() - 1) / 2);
  return out;
}

at::Tensor fft_filter_sep(const at::Tensor& x, const at::Tensor& gh, const at::Tensor& gw) {
  TORCH_CHECK(x.device().is_cpu(), "zsqfast: fft_filter_sep has no CUDA kernel in this build");
  TORCH_CHECK(x.dim() == 3 && x.scalar_type() == at::kFloat && x.is_contiguous(),
              "zsqfast: fft_filter_sep takes contiguous float32 (planes, H, W)");
  TORCH_CHECK(cpu::fft_filter_supported(x.size(1)) && cpu::fft_filter_supported(x.size(2)),
              "zsqfast: fft_filter_sep needs H and W whose prime factors are <= 64");
  int64_t i = 1;
  for (const at::Tensor* g : {&gh, &gw}) {
    TORCH_CHECK(g->scalar_type() == at::kFloat && g->is_contiguous() && g->dim() == 1 && g->device().is_cpu() &&
                    g->numel() == x.size(i++),
                "zsqfast: fft_filter_sep masks must be contiguous float32 CPU vectors of length H and W");
    // the kernel's real-row packing is exact only for g[k] == g[(n - k) % n] (a NaN fails too); the Python
    // adapter matches this message and runs the complex reference instead
    const float* v = g->data_ptr<float>();
    for (int64_t k = 1, n = g->numel(); k < n; ++k)
      TORCH_CHECK_VALUE(v[k] == v[n - k], "zsqfast: fft_filter_sep masks must be symmetric");
  }
  at::Tensor out = at::empty_like(x);
  cpu::set_num_threads(at::get_num_threads());
  cpu::fft_filter_sep(x.data_ptr<float>(), out.data_ptr<float>(), x.size(0), x.size(1), x.size(2),
                      gh.data_ptr<float>(), gw.data_ptr<float>());
  return out;
}

void check_kde(const at::Tensor& v, const at::Tensor& grid, double bandwidth) {
  TORCH_CHECK(v.device().is_cpu() && v.scalar_type() == at::kFloat && v.is_contiguous() && v.dim() == 2,
              "zsqfast: kde_density takes contiguous float32 CPU values (B, M)");
  TORCH_CHECK(grid.device().is_cpu() && grid.scalar_type() == at::kFloat && grid.is_contiguous() && grid.dim() == 2 &&
                  grid.size(0) == v.size(0) && v.size(1) > 0,
              "zsqfast: kde_density takes a contiguous float32 CPU grid (B, K) and M > 0 values per row");
  TORCH_CHECK(bandwidth > 0, "zsqfast: kde_density needs a positive bandwidth");
}

at::Tensor kde_density(const at::Tensor& v, const at::Tensor& grid, double bandwidth) {
  check_kde(v, grid, bandwidth);
  at::Tensor p = at::empty_like(grid);
  cpu::set_num_threads(at::get_num_threads());
  cpu::kde_density(v.data_ptr<float>(), grid.data_ptr<float>(), p.data_ptr<float>(), v.size(0), v.size(1),
                   grid.size(1), float(bandwidth));
  return p;
}

at::Tensor kde_density_backward(const at::Tensor& grad, const at::Tensor& v, const at::Tensor& grid,
                                double bandwidth) {
  check_kde(v, grid, bandwidth);
  TORCH_CHECK(grad.device().is_cpu() && grad.scalar_type() == at::kFloat && grad.is_contiguous() &&
                  grad.sizes() == grid.sizes(),
              "zsqfast: kde_density_backward takes a contiguous float32 CPU gradient shaped like the grid");
  at::Tensor gv = at::empty_like(v);
  cpu::set_num_threads(at::get_num_threads());
  cpu::kde_density_bwd(grad.data_ptr<float>(), v.data_ptr<float>(), grid.data_ptr<float>(), gv.data_ptr<float>(),
                       v.size(0), v.size(1), grid.size(1), float(bandwidth));
  return gv;
}

// ---- SynQ CAM-alignment loss (CPU only): contract in zsqfast/ops/cam_mse.py
void check_cam_table(const at::Tensor& idx, const at::Tensor& wt, int64_t n_out, int64_t n_in, const char* axis) {
  TORCH_CHECK(idx.device().is_cpu() && idx.scalar_type() == at::kLong && idx.is_contiguous() && idx.dim() == 2 &&
                  idx.size(0) == n_out && idx.size(1) == 2 && wt.device().is_cpu() && wt.scalar_type() == at::kFloat &&
                  wt.is_contiguous() && wt.sizes() == idx.sizes(),
              "zsqfast: cam_mse ", axis, " tables must be contiguous CPU int64 / float32 (", n_out, ", 2)");
  const int64_t* p = idx.data_ptr<int64_t>();
  for (int64_t i = 0; i < 2 * n_out; ++i)
    TORCH_CHECK(p[i] >= 0 && p[i] < n_in, "zsqfast: cam_mse ", axis, " table index out of range");
}

// (B, K, h, w), (B, K), (B, H, W): checked; returns {B, K, h, w, H, W}.
std::array<int64_t, 6> check_cam(const at::Tensor& s_or_a, bool is_a, const at::Tensor& alpha,
                                 const at::Tensor& target, const at::Tensor& iy, const at::Tensor& wy,
                                 const at::Tensor& ix, const at::Tensor& wx) {
  const at::Tensor& x = s_or_a;
  TORCH_CHECK(x.device().is_cpu() && x.scalar_type() == at::kFloat && x.is_contiguous() && x.dim() == (is_a ? 4 : 3),
              "zsqfast: cam_mse takes a contiguous float32 CPU ", is_a ? "a (B, K, h, w)" : "s (B, h, w)");
  const int64_t B = x.size(0), h = x.size(is_a ? 2 : 1), w = x.size(is_a ? 3 : 2);
  TORCH_CHECK(alpha.device().is_cpu() && alpha.scalar_type() == at::kFloat && alpha.is_contiguous() &&
                  alpha.dim() == 2 && alpha.size(0) == B && (!is_a || alpha.size(1) == x.size(1)),
              "zsqfast: cam_mse alpha must be contiguous float32 (B, K)");
  TORCH_CHECK(target.device().is_cpu() && target.scalar_type() == at::kFloat && target.is_contiguous() &&
                  target.dim() == 3 && target.size(0) == B,
              "zsqfast: cam_mse target must be contiguous float32 (B, H, W)");
  const int64_t H = target.size(1), W = target.size(2);
  TORCH_CHECK(B > 0 && h > 0 && w > 0 && H > 0 && W > 0 && alpha.size(1) > 0, "zsqfast: cam_mse needs non-empty maps");
  check_cam_table(iy, wy, H, h, "row");
  check_cam_table(ix, wx, W, w, "column");
  cpu::set_num_threads(at::get_num_threads());
  return {B, alpha.size(1), h, w, H, W};
}

std::tuple<at::Tensor, at::Tensor> cam_mse(const at::Tensor& a, const at::Tensor& alpha, const at::Tensor& target,
                                           const at::Tensor& iy, const at::Tensor& wy, const at::Tensor& ix,
                                           const at::Tensor& wx) {
  const auto [B, K, h, w, H, W] = check_cam(a, true, alpha, target, iy, wy, ix, wx);
  at::Tensor s = at::empty({B, h, w}, a.options());
  const float loss = cpu::cam_mse_fwd(a.data_ptr<float>(), alpha.data_ptr<float>(), target.data_ptr<float>(),
                                      s.data_ptr<float>(), B, K, h, w, H, W, iy.data_ptr<int64_t>(),
                                      wy.data_ptr<float>(), ix.data_ptr<int64_t>(), wx.data_ptr<float>());
  at::Tensor out = at::empty({}, a.options());
  out.fill_(loss);
  return {out, s};
}

at::Tensor cam_mse_backward(const at::Tensor& grad, const at::Tensor& s, const at::Tensor& alpha,
                            const at::Tensor& target, const at::Tensor& iy, const at::Tensor& wy, const at::Tensor& ix,
                            const at::Tensor& wx) {
  const auto [B, K, h, w, H, W] = check_cam(s, false, alpha, target, iy, wy, ix, wx);
  TORCH_CHECK(grad.numel() == 1 && grad.device().is_cpu(), "zsqfast: cam_mse_backward grad must be a CPU scalar");
  at::Tensor da = at::empty({B, K, h, w}, s.options());
  cpu::cam_mse_bwd(grad.item<float>(), s.data_ptr<float>(), alpha.data_ptr<float>(), target.data_ptr<float>(),
                   da.data_ptr<float>(), B, K, h, w, H, W, iy.data_ptr<int64_t>(), wy.data_ptr<float>(),
                   ix.data_ptr<int64_t>(), wx.data_ptr<float>());
  return da;
}

// ---- low-bit integer ops (CPU only): contracts in zsqfast/ops/lowbit_gemm.py and lowbit_conv2d.py
int64_t lowbit_rows(const at::Tensor& w_packed, int64_t w_bits, int64_t K) {
  TORCH_CHECK(w_bits >= 2 && w_bits <= 8, "zsqfast: w_bits must be in 2..8, got ", w_bits);
  TORCH_CHECK(K >= 1, "zsqfast: K must be positive");
  TORCH_CHECK(w_packed.device().is_cpu() && w_packed.scalar_type() == at::kByte && w_packed.dim() == 2 &&
                  w_packed.is_contiguous(),
              "zsqfast: w_packed must be a contiguous 2-D uint8 CPU tensor");
  const int64_t kp = (K + 127) / 128 * 128;
  TORCH_CHECK(w_packed.size(1) == (w_bits <= 4 ? kp / 2 : kp), "zsqfast: w_packed has ", w_packed.size(1),
              " bytes a row, the packed layout of K=", K, " at ", w_bits, " bits has ", (w_bits <= 4 ? kp / 2 : kp));
  TORCH_CHECK(double(K) * 255.0 * double((1 << w_bits) - 1) < 2147483648.0, "zsqfast: K=", K,
              " could overflow the int32 accumulator");
  cpu::set_num_threads(at::get_num_threads());
  return w_packed.size(0);
}

void check_vec(const at::Tensor& t, at::ScalarType dt, int64_t n, const char* name) {
  TORCH_CHECK(t.device().is_cpu() && t.scalar_type() == dt && t.is_contiguous() && t.numel() == n, "zsqfast: ",
              name, " must be a contiguous CPU ", dt, " tensor of ", n, " elements");
}

at::Tensor lowbit_gemm(const at::Tensor& a, const at::Tensor& w_packed, int64_t w_bits, int64_t K) {
  const int64_t N = lowbit_rows(w_packed, w_bits, K);
  TORCH_CHECK(a.device().is_cpu() && a.scalar_type() == at::kByte && a.dim() == 2 && a.size(1) == K &&
                  a.is_contiguous(),
              "zsqfast: a must be a contiguous uint8 CPU tensor (M, K=", K, ")");
  at::Tensor acc = at::empty({a.size(0), N}, a.options().dtype(at::kInt));
  cpu::lowbit_gemm(a.data_ptr<uint8_t>(), w_packed.data_ptr<uint8_t>(), int(w_bits), a.size(0), N, K,
                   acc.data_ptr<int32_t>());
  return acc;
}

// The per-channel tensors of a low-bit layer; returns whether the activation grid is per token (M values).
bool check_lowbit_params(int64_t N, int64_t M, const at::Tensor& w_scale, const at::Tensor& w_zero,
                         const at::Tensor& w_colsum, const at::Tensor& a_scale, const at::Tensor& a_inv_scale,
                         const at::Tensor& a_zero, int64_t a_bits, const std::optional<at::Tensor>& bias) {
  TORCH_CHECK(a_bits >= 2 && a_bits <= 8, "zsqfast: a_bits must be in 2..8, got ", a_bits);
  check_vec(w_scale, at::kFloat, N, "w_scale");
  check_vec(w_zero, at::kInt, N, "w_zero");
  check_vec(w_colsum, at::kInt, N, "w_colsum");
  const int64_t na = a_scale.numel();
  TORCH_CHECK(na == 1 || na == M, "zsqfast: a_scale must have 1 or ", M, " elements");
  check_vec(a_scale, at::kFloat, na, "a_scale");
  check_vec(a_inv_scale, at::kFloat, na, "a_inv_scale");
  check_vec(a_zero, at::kInt, na, "a_zero");
  if (bias.has_value()) check_vec(*bias, at::kFloat, N, "bias");
  return na != 1;
}

at::Tensor lowbit_linear(const at::Tensor& x, const at::Tensor& w_packed, int64_t w_bits, int64_t K,
                         const at::Tensor& w_scale, const at::Tensor& w_zero, const at::Tensor& w_colsum,
                         const at::Tensor& a_scale, const at::Tensor& a_inv_scale, const at::Tensor& a_zero,
                         int64_t a_bits, const std::optional<at::Tensor>& bias) {
  const int64_t N = lowbit_rows(w_packed, w_bits, K);
  TORCH_CHECK(x.device().is_cpu() && x.scalar_type() == at::kFloat && x.dim() == 2 && x.size(1) == K &&
                  x.is_contiguous(),
              "zsqfast: x must be a contiguous float32 CPU tensor (M, K=", K, ")");
  const bool per_token = check_lowbit_params(N, x.size(0), w_scale, w_zero, w_colsum, a_scale, a_inv_scale, a_zero,
                                             a_bits, bias);
  at::Tensor y = at::empty({x.size(0), N}, x.options());
  const bool ok = cpu::lowbit_linear(x.data_ptr<float>(), w_packed.data_ptr<uint8_t>(), int(w_bits), x.size(0), N, K,
                     w_scale.data_ptr<float>(), w_zero.data_ptr<int32_t>(), w_colsum.data_ptr<int32_t>(),
                     a_scale.data_ptr<float>(), a_inv_scale.data_ptr<float>(), a_zero.data_ptr<int32_t>(), per_token,
                     int(a_bits), bias.has_value() ? bias->data_ptr<float>() : nullptr, y.data_ptr<float>());
  TORCH_CHECK_VALUE(ok, "x contains NaN: integer activations have no NaN code");
  return y;
}

at::Tensor lowbit_conv2d(const at::Tensor& x, const at::Tensor& w_packed, int64_t w_bits, int64_t K,
                         const at::Tensor& w_scale, const at::Tensor& w_zero, const at::Tensor& w_colsum,
                         const at::Tensor& a_scale, const at::Tensor& a_inv_scale, const at::Tensor& a_zero,
                         int64_t a_bits, const std::optional<at::Tensor>& bias, at::IntArrayRef kernel_size,
                         at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups) {
  const int64_t OC = lowbit_rows(w_packed, w_bits, K);
  const bool x_nhwc = x.dim() == 4 && !x.is_contiguous() && x.is_contiguous(at::MemoryFormat::ChannelsLast);
  TORCH_CHECK(x.device().is_cpu() && x.scalar_type() == at::kFloat && x.dim() == 4 && (x.is_contiguous() || x_nhwc),
              "zsqfast: x must be a float32 CPU tensor (B, C, H, W), contiguous NCHW or channels_last");
  TORCH_CHECK(kernel_size.size() == 2 && stride.size() == 2 && padding.size() == 2 && dilation.size() == 2,
              "zsqfast: kernel_size, stride, padding and dilation must be pairs");
  const int64_t C = x.size(1), H = x.size(2), W = x.size(3);
  TORCH_CHECK(groups >= 1 && C % groups == 0 && OC % groups == 0 && C / groups * kernel_size[0] * kernel_size[1] == K,
              "zsqfast: groups / kernel_size do not match C=", C, ", OC=", OC, ", K=", K);
  TORCH_CHECK(stride[0] >= 1 && stride[1] >= 1 && dilation[0] >= 1 && dilation[1] >= 1 && padding[0] >= 0 &&
                  padding[1] >= 0, "zsqfast: bad stride, dilation or padding");
  check_lowbit_params(OC, 1, w_scale, w_zero, w_colsum, a_scale, a_inv_scale, a_zero, a_bits, bias);
  const int64_t geom[8] = {kernel_size[0], kernel_size[1], stride[0], stride[1],
                           padding[0],     padding[1],     dilation[0], dilation[1]};
  const int64_t Ho = (H + 2 * geom[4] - geom[6] * (geom[0] - 1) - 1) / geom[2] + 1;
  const int64_t Wo = (W + 2 * geom[5] - geom[7] * (geom[1] - 1) - 1) / geom[3] + 1;
  TORCH_CHECK(Ho >= 1 && Wo >= 1, "zsqfast: the kernel does not fit the input");
  // the implicit-GEMM path writes channels_last y; the others take NCHW x and write NCHW y
  at::Tensor y = at::empty({x.size(0), OC, Ho, Wo}, x.options().memory_format(at::MemoryFormat::ChannelsLast));
  const int done = cpu::lowbit_conv2d_nhwc(x.data_ptr<float>(), x_nhwc, x.size(0), C, H, W, w_packed.data_ptr<uint8_t>(),
                     int(w_bits), OC, w_scale.data_ptr<float>(), w_zero.data_ptr<int32_t>(), w_colsum.data_ptr<int32_t>(),
                     a_scale.data_ptr<float>()[0], a_inv_scale.data_ptr<float>()[0], a_zero.data_ptr<int32_t>()[0],
                     int(a_bits), bias.has_value() ? bias->data_ptr<float>() : nullptr, geom, groups, y.data_ptr<float>());
  TORCH_CHECK_VALUE(done >= 0, "x contains NaN: integer activations have no NaN code");
  if (done) return y;
  const at::Tensor xc = x.contiguous();
  y = at::empty({x.size(0), OC, Ho, Wo}, x.options());
  const bool ok = cpu::lowbit_conv2d(xc.data_ptr<float>(), x.size(0), C, H, W, w_packed.data_ptr<uint8_t>(), int(w_bits), OC,
                     w_scale.data_ptr<float>(), w_zero.data_ptr<int32_t>(), w_colsum.data_ptr<int32_t>(),
                     a_scale.data_ptr<float>()[0], a_inv_scale.data_ptr<float>()[0], a_zero.data_ptr<int32_t>()[0],
                     int(a_bits), bias.has_value() ? bias->data_ptr<float>() : nullptr, geom, groups,
                     y.data_ptr<float>());
  TORCH_CHECK_VALUE(ok, "x contains NaN: integer activations have no NaN code");
  return y;
}

std::string cpu_isa() { return cpu::isa_name(); }
bool set_cpu_isa(c10::string_view name) { return cpu::force_isa(std::string(name).c_str()); }

}  // namespace
}  // namespace zsqfast

TORCH_LIBRARY(zsqfast_ext, m) {
  m.def("fake_quant(Tensor x, Tensor scale, Tensor inv_scale, Tensor zero_point, int qmin, int qmax, int inner, "
        "int C, bool need_mask) -> (Tensor, Tensor)");
  m.def("fake_quant_backward(Tensor grad, Tensor mask) -> Tensor");
  m.def("lsq_fake_quant(Tensor x, Tensor step, Tensor inv_step, int qmin, int qmax, int inner, int C) -> Tensor");
  m.def("lsq_fake_quant_backward(Tensor grad, Tensor x, Tensor step, Tensor inv_step, int qmin, int qmax, "
        "int inner, int C, float grad_scale) -> (Tensor, Tensor)");
  m.def("bn_stats(Tensor x, int inner, int C) -> (Tensor, Tensor)");
  m.def("bn_stats_backward(Tensor? grad, Tensor x, Tensor a, Tensor b, int inner, int C) -> Tensor");
  m.def("lowbit_gemm(Tensor a, Tensor w_packed, int w_bits, int K) -> Tensor");
  m.def("lowbit_linear(Tensor x, Tensor w_packed, int w_bits, int K, Tensor w_scale, Tensor w_zero, "
        "Tensor w_colsum, Tensor a_scale, Tensor a_inv_scale, Tensor a_zero, int a_bits, Tensor? bias) -> Tensor");
  m.def("lowbit_conv2d(Tensor x, Tensor w_packed, int w_bits, int K, Tensor w_scale, Tensor w_zero, "
        "Tensor w_colsum, Tensor a_scale, Tensor a_inv_scale, Tensor a_zero, int a_bits, Tensor? bias, "
        "int[2] kernel_size, int[2] stride, int[2] padding, int[2] dilation, int groups) -> Tensor");
  m.def("circular_conv_sep(Tensor x, Tensor wh, Tensor ww) -> Tensor");
  m.def("fft_filter_sep(Tensor x, Tensor gh, Tensor gw) -> Tensor");
  m.def("kde_density(Tensor v, Tensor grid, float bandwidth) -> Tensor");
  m.def("kde_density_backward(Tensor grad, Tensor v, Tensor grid, float bandwidth) -> Tensor");
  m.def("cam_mse(Tensor a, Tensor alpha, Tensor target, Tensor iy, Tensor wy, Tensor ix, Tensor wx) -> "
        "(Tensor, Tensor)");
  m.def("cam_mse_backward(Tensor grad, Tensor s, Tensor alpha, Tensor target, Tensor iy, Tensor wy, Tensor ix, "
        "Tensor wx) -> Tensor");
  m.def("cpu_isa() -> str", &zsqfast::cpu_isa);
  m.def("set_cpu_isa(str name) -> bool", &zsqfast::set_cpu_isa);
}

TORCH_LIBRARY_IMPL(zsqfast_ext, CPU, m) {
  m.impl("fake_quant", &zsqfast::fake_quant);
  m.impl("fake_quant_backward", &zsqfast::fake_quant_backward);
  m.impl("lsq_fake_quant", &zsqfast::lsq_fake_quant);
  m.impl("lsq_fake_quant_backward", &zsqfast::lsq_fake_quant_backward);
  m.impl("bn_stats", &zsqfast::bn_stats);
  m.impl("bn_stats_backward", &zsqfast::bn_stats_backward);
  m.impl("circular_conv_sep", &zsqfast::circular_conv_sep);
  m.impl("fft_filter_sep", &zsqfast::fft_filter_sep);
  m.impl("kde_density", &zsqfast::kde_density);
  m.impl("kde_density_backward", &zsqfast::kde_density_backward);
  m.impl("cam_mse", &zsqfast::cam_mse);
  m.impl("cam_mse_backward", &zsqfast::cam_mse_backward);
  m.impl("lowbit_gemm", &zsqfast::lowbit_gemm);
  m.impl("lowbit_linear", &zsqfast::lowbit_linear);
  m.impl("lowbit_conv2d", &zsqfast::lowbit_conv2d);
}

#ifdef ZSQFAST_WITH_CUDA
TORCH_LIBRARY_IMPL(zsqfast_ext, CUDA, m) {
  m.impl("fake_quant", &zsqfast::fake_quant);
  m.impl("fake_quant_backward", &zsqfast::fake_quant_backward);
  m.impl("lsq_fake_quant", &zsqfast::lsq_fake_quant);
  m.impl("lsq_fake_quant_backward", &zsqfast::lsq_fake_quant_backward);
  m.impl("lowbit_gemm", &zsqfast::lowbit_gemm_cuda);
  m.impl("lowbit_linear", &zsqfast::lowbit_linear_cuda);
  m.impl("lowbit_conv2d", &zsqfast::lowbit_conv2d_cuda);
}
#endif
