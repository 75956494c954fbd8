// The one registration unit: declares the raw-kernel ops of namespace `zsqfast_ext` and binds them to the
// CPU kernels (and, built with ZSQFAST_WITH_CUDA, to the CUDA kernels). The public `zsqfast::*` ops are
// declared in Python (zsqfast/ops); their CPU/CUDA kernels call these after preparing the kernel contract
// (dense input, fp32 (C,) scales, channel geometry).
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <torch/library.h>

#include "kernels.h"

#ifdef ZSQFAST_WITH_CUDA
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
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
  m.def("circular_conv_sep(Tensor x, Tensor wh, Tensor ww) -> Tensor");
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
}

#ifdef ZSQFAST_WITH_CUDA
TORCH_LIBRARY_IMPL(zsqfast_ext, CUDA, m) {
  m.impl("fake_quant", &zsqfast::fake_quant);
  m.impl("fake_quant_backward", &zsqfast::fake_quant_backward);
  m.impl("lsq_fake_quant", &zsqfast::lsq_fake_quant);
  m.impl("lsq_fake_quant_backward", &zsqfast::lsq_fake_quant_backward);
}
#endif
