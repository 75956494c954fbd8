"""Gaussian kernel density at grid points, per row (``zsqfast::kde_density``): the hot part of PSAQ-ViT's
patch-similarity entropy (zsqfast/synthesis/patch_entropy.py).

Semantics (:func:`reference`): for values v (B, M), grid points t (B, K) and a bandwidth bw > 0,

    p[b, k] = 1 / (M bw sqrt(2 pi)) * sum_j exp(-z^2 / 2),   z = (t[b, k] - v[b, j]) / bw.

Differentiable in v and in the grid (PSAQ-ViT places the grid at the detached min / max, so only v's gradient is
used there; the grid's runs the reference formula):

    dL/dv[b, j] = 1 / (M bw^2 sqrt(2 pi)) * sum_k dL/dp[b, k] z exp(-z^2 / 2),
    dL/dt[b, k] = -dL/dp[b, k] / (M bw^2 sqrt(2 pi)) * sum_j z exp(-z^2 / 2).

Exponents below -87 count as 0 on every path of the kernels (e^-87 ~ 1.6e-38). No double backward.

The reference forms the (B, K, M) kernel matrix (three such tensors, kept by autograd: ~0.5 GB per batch of 32
DeiT images per block); the C++ CPU kernels (csrc/cpu/kde.cpp, fp32) stream over the values with the
exponentials in registers (a degree-6 polynomial after range reduction, relative error ~1e-7) and recompute
them in the backward. fp16 / bf16 inputs run the kernels in fp32; fp64 and other devices run the reference. NaN
values propagate as in the reference.
"""
from __future__ import annotations

import math

import torch

from ._dispatch import define_op


def _kernel(v: torch.Tensor, grid: torch.Tensor, bandwidth: float):
    """(z, exp(-z^2 / 2)) (B, K, M) with z = (t_k - v_j) / bw, in v's precision (fp32 for fp32 / half inputs)."""
    ct = torch.float64 if v.dtype == torch.float64 else torch.float32
    z = (grid.to(ct).unsqueeze(2) - v.to(ct).unsqueeze(1)) / bandwidth
    return z, torch.exp(-0.5 * z * z)


def _gauss_norm_sq(m: int, bandwidth: float) -> float:
    return m * bandwidth * bandwidth * math.sqrt(2 * math.pi)  # the gradients' common divisor


def reference(v: torch.Tensor, grid: torch.Tensor, bandwidth: float) -> torch.Tensor:
    """p (B, K) in v's precision (fp32 for fp32 / half inputs)."""
    return _kernel(v, grid, bandwidth)[1].mean(2) / (bandwidth * math.sqrt(2 * math.pi))


def backward_reference(grad: torch.Tensor, v: torch.Tensor, grid: torch.Tensor, bandwidth: float) -> torch.Tensor:
    """dL/dv (B, M) from dL/dp (B, K)."""
    z, e = _kernel(v, grid, bandwidth)
    g = (grad.to(z.dtype).unsqueeze(2) * z * e).sum(1)
    return (g / _gauss_norm_sq(v.shape[1], bandwidth)).to(v.dtype)


def _fake(v, grid, bandwidth):
    ct = torch.float64 if v.dtype == torch.float64 else torch.float32
    return grid.new_empty(grid.shape, dtype=ct)


def _fake_backward(grad, v, grid, bandwidth):
    return torch.empty_like(v, memory_format=torch.contiguous_format)


def _check(v, grid, bandwidth):
    if v.dim() != 2 or grid.dim() != 2 or grid.shape[0] != v.shape[0] or v.shape[1] == 0:
        raise ValueError(f"kde_density needs values (B, M > 0) and a grid (B, K), got {tuple(v.shape)}, "
                         f"{tuple(grid.shape)}")
    if not bandwidth > 0:
        raise ValueError(f"kde_density needs a positive bandwidth, got {bandwidth}")


def _fp32(*ts):
    return [t if t.dtype == torch.float32 and t.is_contiguous() else t.float().contiguous() for t in ts]


def _adapter(impl, v, grid, bandwidth):
    _check(v, grid, bandwidth)
    if v.dtype == torch.float64:
        return reference(v, grid, bandwidth)
    return impl(*_fp32(v, grid), float(bandwidth))


def _adapter_backward(impl, grad, v, grid, bandwidth):
    _check(v, grid, bandwidth)
    if v.dtype == torch.float64:
        return backward_reference(grad, v, grid, bandwidth)
    return impl(*_fp32(grad, v, grid), float(bandwidth)).to(v.dtype)


kde_density = define_op("kde_density", "(Tensor v, Tensor grid, float bandwidth) -> Tensor", reference, _fake,
                        _adapter)
kde_density_backward = define_op("kde_density_backward",
                                 "(Tensor grad, Tensor v, Tensor grid, float bandwidth) -> Tensor",
                                 backward_reference, _fake_backward, _adapter_backward)


def _setup(ctx, inputs, output):
    ctx.save_for_backward(inputs[0], inputs[1])
    ctx.bandwidth = inputs[2]


def _grid_grad(grad, v, grid, bandwidth):
    """dL/dt (B, K) from dL/dp (B, K) (the reference formula; PSAQ-ViT's grid needs none)."""
    z, e = _kernel(v, grid, bandwidth)
    return (-grad.to(z.dtype) * (z * e).sum(2) / _gauss_norm_sq(v.shape[1], bandwidth)).to(grid.dtype)


def _backward(ctx, grad):
    v, grid = ctx.saved_tensors
    gv = kde_density_backward(grad.contiguous(), v, grid, ctx.bandwidth) if ctx.needs_input_grad[0] else None
    gt = _grid_grad(grad, v, grid, ctx.bandwidth) if ctx.needs_input_grad[1] else None
    return gv, gt, None


torch.library.register_autograd("zsqfast::kde_density", _backward, setup_context=_setup)


def _no_double_backward(ctx, grad):
    raise RuntimeError("zsqfast::kde_density has no double backward (its backward is not differentiable)")


torch.library.register_autograd("zsqfast::kde_density_backward", _no_double_backward,
                                setup_context=lambda ctx, inputs, output: None)
