"""Per-channel batch statistics of a BatchNorm input, and their backward as one per-channel affine map.

``bn_stats(x) -> (mean, var)``: for x of shape (N, C, *) in any dense layout, the per-channel mean and the
*biased* variance over every other dimension (what BatchNorm normalises with in training mode), fp32 (C,),
accumulated in double by the fast paths. Backward: with M = numel / C elements per channel,

    dL/dx = dL/dmean / M + dL/dvar * 2 (x - mean) / M  =  a_c + b_c * x,
    b_c = 2 dL/dvar_c / M,   a_c = dL/dmean_c / M - b_c * mean_c,

so ``bn_stats_backward(grad, x, a, b) = grad + a_c + b_c * x`` computes it in one pass, adding it to a
gradient that already flows into x (``grad``, optional) so that a loss on the statistics of a BatchNorm
input costs one extra read of x forward and nothing but an FMA backward.

Kernel contract (layout rules as in :mod:`zsqfast.ops.fake_quantize`; channel = axis 1)::

    bn_stats(x, inner, C) -> (mean, var)                 fp32 (C,)
    bn_stats_backward(grad or None, x, a, b, inner, C) -> out   (x's strides and dtype)
"""
from __future__ import annotations

import torch

from . import _common as C
from ._dispatch import define_op
from ._layout import channel_geometry, dense


def _check(x):
    if x.dim() < 2:
        raise ValueError(f"bn_stats needs an input of shape (N, C, ...), got {tuple(x.shape)}")


def reference(x):
    """Pure-PyTorch semantics of ``zsqfast::bn_stats``: ``(mean, biased var)`` per channel, fp32 (C,)."""
    _check(x)
    dims = [0] + list(range(2, x.dim()))
    xf = x.to(C.compute_dtype(x))
    var, mean = torch.var_mean(xf, dim=dims, correction=0)
    return mean.float(), var.float()


def reference_backward(grad, x, a, b):
    """Pure-PyTorch semantics of ``zsqfast::bn_stats_backward``: ``grad + a_c + b_c * x``."""
    shape = [1, -1] + [1] * (x.dim() - 2)
    xd = dense(x)
    out = a.view(shape) + b.view(shape) * xd.to(torch.float32)
    if grad is not None:
        out = out + C.empty_strided_like(dense(grad), xd.stride()).to(torch.float32)
    return C.empty_strided_like(out.to(x.dtype), xd.stride())


def _fake(x):
    _check(x)
    return x.new_empty((x.size(1),), dtype=torch.float32), x.new_empty((x.size(1),), dtype=torch.float32)


def _fake_backward(grad, x, a, b):
    return torch.empty_like(dense(x))


def _adapter(impl, x):
    _check(x)
    if x.dtype not in C.KERNEL_DTYPES or x.numel() == 0:
        return reference(x)
    xd = dense(x)
    inner, nch = channel_geometry(xd, 1)
    return impl(xd, inner, nch)


def _adapter_backward(impl, grad, x, a, b):
    if x.dtype not in C.KERNEL_DTYPES or x.numel() == 0:
        return reference_backward(grad, x, a, b)
    xd = dense(x)
    inner, nch = channel_geometry(xd, 1)
    g = None if grad is None else C.empty_strided_like(dense(grad).to(x.dtype), xd.stride())
    return impl(g, xd, a.float().contiguous(), b.float().contiguous(), inner, nch)


bn_stats = define_op("bn_stats", "(Tensor x) -> (Tensor, Tensor)", reference, _fake, _adapter)
bn_stats_backward = define_op("bn_stats_backward", "(Tensor? grad, Tensor x, Tensor a, Tensor b) -> Tensor",
                              reference_backward, _fake_backward, _adapter_backward)


def affine_coefficients(x: torch.Tensor, mean: torch.Tensor, grad_mean, grad_var):
    """``(a, b)`` of the backward map for the gradients of (mean, var) (None = zero)."""
    m = x.numel() // x.size(1)
    gm = torch.zeros_like(mean) if grad_mean is None else grad_mean.float()
    gv = torch.zeros_like(mean) if grad_var is None else grad_var.float()
    b = gv * (2.0 / m)
    return gm / m - b * mean, b


def _setup_context(ctx, inputs, output):
    (x,) = inputs
    ctx.save_for_backward(x, output[0])


def _backward(ctx, grad_mean, grad_var):
    x, mean = ctx.saved_tensors
    a, b = affine_coefficients(x, mean, grad_mean, grad_var)
    return bn_stats_backward(None, x, a, b)


torch.library.register_autograd("zsqfast::bn_stats", _backward, setup_context=_setup_context)


class BNStatsTap(torch.autograd.Function):
    """``x -> (x, mean, var)``: x passes through unchanged (a view) while its statistics are taken; the
    backward adds the statistics' gradient to the gradient arriving at x in a single pass."""

    @staticmethod
    def forward(ctx, x):
        mean, var = bn_stats(x)
        ctx.save_for_backward(x, mean)
        return x.view_as(x), mean, var

    @staticmethod
    def backward(ctx, grad_x, grad_mean, grad_var):
        x, mean = ctx.saved_tensors
        a, b = affine_coefficients(x, mean, grad_mean, grad_var)
        return bn_stats_backward(grad_x, x, a, b)


def check_batch(x: torch.Tensor) -> None:
    """ValueError unless x is (N, C, ...) with at least one element per channel: the statistics of an empty
    batch are undefined (and their backward divides by the element count)."""
    _check(x)
    if x.numel() == 0:
        raise ValueError(f"batch statistics need a non-empty batch, got shape {tuple(x.shape)}")


def batch_stats(x: torch.Tensor, *, tap: bool = False):
    """Per-channel ``(mean, biased var)`` of a non-empty x (N, C, ...), differentiable w.r.t. x.

    With ``tap=True`` returns ``(x_view, mean, var)``: feed ``x_view`` onward instead of ``x`` so that the
    backward adds both gradients in one pass (what :class:`zsqfast.BNSLoss` does on every BatchNorm input).
    """
    C.check_input(x)
    check_batch(x)
    if tap:
        return BNStatsTap.apply(x)
    return bn_stats(x)
