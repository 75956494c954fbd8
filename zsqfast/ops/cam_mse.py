"""SynQ's CAM-alignment loss as a ``torch.library`` op pair: ``zsqfast::cam_mse`` and its backward.

Semantics (SynQ, ../shared/reference/zsq-semantics.md "SynQ Grad-CAM and loss"; :func:`reference`), per
sample b, for the student's target activation A (B, K, h, w), its Grad-CAM weights alpha (B, K) (constants)
and the teacher's normalised map T (B, H, W) (detached):

    s = sum_k alpha_k A_k,  m = ReLU(s),  u = U m  (``F.interpolate`` bilinear, align_corners=False, to H x W),
    n = (u - lo) / D,  lo = min u,  hi = max u,  D = hi - lo + 1e-10,  L = mean_{b,H,W} (n - T)^2.

The op returns ``(L, s)``: s (B, h, w) is all the backward keeps (s is a by-product, not differentiable).
Backward (g = dL/dn = 2 (n - T) dL / (B H W); the min and max are differentiable, as in SynQ, the gradient
going to the element torch's ``min(dim)`` / ``max(dim)`` pick: the first occurrence, the first NaN if any):

    dL/du = g / D,  plus  sum(g (u - lo)) / D^2 - sum(g) / D  at argmin,  minus  sum(g (u - lo)) / D^2  at argmax,
    dL/dm = U^T dL/du,  dL/ds = dL/dm [s > 0],  dL/dA_k = alpha_k dL/ds.

Kernels: the reference (pure PyTorch, any dtype and device) and, for float32 CPU tensors, the fused C++
kernel (csrc/cpu/cam_mse.cpp: per sample a GEMV over K, the 2-tap separable upsample from the tables of
:func:`interp_table`, min / max, normalise and squared error, the backward the transposed chain; OpenMP over
the batch, nothing (H, W)-sized stored; u rounded exactly as torch 2.14's CPU upsample rounds it, both its
kernels: the separable one for H + W > 128 and the four-tap one below, so exact and near ties of min / max
resolve as in the reference). Other dtypes run the reference. NaN / Inf are not rejected: they
propagate as in the reference (a NaN in A or T makes L NaN and the affected sample's gradient NaN where the
reference's is).
"""
from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from ._dispatch import define_op

EPS = 1e-10


def _normalise(s: torch.Tensor, target: torch.Tensor):
    """u (B, H W), lo, argmin, argmax (B,), D (B, 1), n - T (B, H W) from s (B, h, w) and T (B, H, W)."""
    u = F.interpolate(F.relu(s.unsqueeze(1)), size=tuple(target.shape[-2:]), mode="bilinear",
                      align_corners=False).flatten(1)
    lo, i_lo = u.min(1)
    hi, i_hi = u.max(1)
    d = (hi - lo + EPS)[:, None]
    diff = (u - lo[:, None]) / d - target.flatten(1)
    return u, lo, i_lo, i_hi, d, diff


def reference(a: torch.Tensor, alpha: torch.Tensor, target: torch.Tensor):
    """``(L 0-dim, s (B, h, w))`` in a's dtype (module docstring)."""
    s = torch.einsum("bchw,bc->bhw", a, alpha)
    return _normalise(s, target)[-1].square().mean(), s


def backward_reference(grad: torch.Tensor, s: torch.Tensor, alpha: torch.Tensor, target: torch.Tensor):
    """dL/dA (B, K, h, w) for the upstream gradient ``grad`` (0-dim) (module docstring)."""
    b, h, w = s.shape
    size = tuple(target.shape[-2:])
    u, lo, i_lo, i_hi, d, diff = _normalise(s, target)
    g = diff * (2.0 * grad / diff.numel())                                # dL/dn
    du = g / d
    ug = (g * (u - lo[:, None])).sum(1, keepdim=True) / (d * d)           # sum g (u - lo) / D^2
    du.scatter_add_(1, i_lo[:, None], ug - g.sum(1, keepdim=True) / d)   # through lo
    du.scatter_add_(1, i_hi[:, None], -ug)                                # through hi
    dm = torch.ops.aten.upsample_bilinear2d_backward(du.view(b, 1, *size), list(size), [b, 1, h, w], False,
                                                     None, None)
    ds = (dm * (s.unsqueeze(1) > 0)).squeeze(1)                          # (B, h, w)
    return torch.einsum("bhw,bc->bchw", ds, alpha)


@functools.lru_cache(maxsize=64)
def interp_table(n_in: int, n_out: int) -> tuple[torch.Tensor, torch.Tensor]:
    """torch's bilinear (align_corners=False, size given) taps along one axis: source indices int64
    (n_out, 2) and weights float32 (n_out, 2), ``out[i] = x[i0] w0 + x[i1] w1`` (how the C++ kernel rounds
    the 2-D combination: ``u_row`` in csrc/cpu/cam_mse_body.inc).

    As torch's CPU kernel computes them: scale = float(n_in) / n_out, src = fma(scale, i + 0.5, -0.5)
    (fp32, one rounding: emulated in float64, exact there), clamped at 0; i0 = min(floor(src), n_in - 1),
    lambda = clamp(src - i0, 0, 1), i1 = i0 + 1 unless i0 is the last index (edge clamp: i1 = i0),
    weights (1 - lambda, lambda)."""
    scale = torch.tensor(n_in, dtype=torch.float32) / torch.tensor(n_out, dtype=torch.float32)
    src = (scale.double() * (torch.arange(n_out, dtype=torch.float64) + 0.5) - 0.5).float().clamp(min=0)
    i0 = src.floor().long().clamp(max=n_in - 1)
    lam = (src - i0.float()).clamp(0, 1)
    i1 = i0 + (i0 < n_in - 1).long()
    return torch.stack([i0, i1], 1).contiguous(), torch.stack([1 - lam, lam], 1).contiguous()


def _tables(h, w, target):
    iy, wy = interp_table(h, target.shape[-2])
    ix, wx = interp_table(w, target.shape[-1])
    return iy, wy, ix, wx


def _fast(*tensors) -> bool:
    return all(t.dtype == torch.float32 for t in tensors) and all(t.numel() > 0 for t in tensors)


def _adapter(impl, a, alpha, target):
    if not _fast(a, alpha, target):
        return reference(a, alpha, target)
    return impl(a.contiguous(), alpha.contiguous(), target.contiguous(), *_tables(a.shape[2], a.shape[3], target))


def _backward_adapter(impl, grad, s, alpha, target):
    if not _fast(grad, s, alpha, target):
        return backward_reference(grad, s, alpha, target)
    return impl(grad, s.contiguous(), alpha.contiguous(), target.contiguous(), *_tables(s.shape[1], s.shape[2], target))


def _fake(a, alpha, target):
    return a.new_empty(()), a.new_empty((a.shape[0], a.shape[2], a.shape[3]))


def _backward_fake(grad, s, alpha, target):
    return s.new_empty((s.shape[0], alpha.shape[1], s.shape[1], s.shape[2]))


cam_mse = define_op("cam_mse", "(Tensor a, Tensor alpha, Tensor target) -> (Tensor, Tensor)", reference, _fake,
                    _adapter)
cam_mse_backward = define_op("cam_mse_backward", "(Tensor grad, Tensor s, Tensor alpha, Tensor target) -> Tensor",
                             backward_reference, _backward_fake, _backward_adapter)


def _setup(ctx, inputs, output):
    ctx.save_for_backward(output[1], inputs[1], inputs[2])
    ctx.mark_non_differentiable(output[1])


def _backward(ctx, grad_loss, grad_s):
    s, alpha, target = ctx.saved_tensors  # alpha and T are constants (SynQ): no gradient for them
    return cam_mse_backward(grad_loss, s, alpha, target), None, None


torch.library.register_autograd("zsqfast::cam_mse", _backward, setup_context=_setup)
