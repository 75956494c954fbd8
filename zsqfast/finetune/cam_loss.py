"""SynQ's CAM-alignment loss as one autograd node: weighted channel sum, ReLU, bilinear upsample, per-sample
min-max normalisation and MSE against the (detached) teacher map, with a hand-written backward.

Forward, per sample b (A: (B, C, h, w), alpha: (B, C) constants, T: (B, H, W)):

    s = sum_k alpha_k A_k,  m = ReLU(s),  u = U m  (bilinear, align_corners=False, to H x W),
    n = (u - lo) / D,  lo = min u,  hi = max u,  D = hi - lo + 1e-10,  L = mean_{b,H,W} (n - T)^2.

Backward (g = dL/dn = 2 (n - T) / (B H W); the min and max are differentiable, as in SynQ, the gradient
going to the element torch's ``min(dim)`` / ``max(dim)`` pick):

    dL/du = g / D,  plus  sum(g (u - lo)) / D^2 - sum(g) / D  at argmin,  minus  sum(g (u - lo)) / D^2  at argmax,
    dL/dm = U^T dL/du,  dL/ds = dL/dm [s > 0],  dL/dA_k = alpha_k dL/ds.

Only the (B, H, W)-sized maps and the (B, h, w) sum are kept for the backward, not the composite graph's
six intermediate maps; the result equals the composite (:func:`zsqfast.finetune.gradcam.finish_map` +
``F.mse_loss``) to rounding (tested, including a gradient check).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

EPS = 1e-10


class CamMSE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, a, alpha, target):
        b, _, h, w = a.shape
        size = tuple(target.shape[-2:])
        s = torch.einsum("bchw,bc->bhw", a, alpha).unsqueeze(1)              # (B, 1, h, w)
        u = F.interpolate(F.relu(s), size=size, mode="bilinear", align_corners=False).flatten(1)
        lo, i_lo = u.min(1)
        hi, i_hi = u.max(1)
        d = (hi - lo + EPS)[:, None]
        n = (u - lo[:, None]) / d
        diff = n - target.flatten(1)
        ctx.save_for_backward(alpha, s, u, lo, i_lo, i_hi, d, diff)
        ctx.shape = (b, h, w, size)
        return diff.square().mean()

    @staticmethod
    def backward(ctx, grad_out):
        alpha, s, u, lo, i_lo, i_hi, d, diff = ctx.saved_tensors
        b, h, w, size = ctx.shape
        g = diff * (2.0 * grad_out / diff.numel())                            # dL/dn
        du = g / d
        ug = (g * (u - lo[:, None])).sum(1, keepdim=True) / (d * d)           # sum g (u - lo) / D^2
        du.scatter_add_(1, i_lo[:, None], ug - g.sum(1, keepdim=True) / d)   # through lo
        du.scatter_add_(1, i_hi[:, None], -ug)                                # through hi
        dm = torch.ops.aten.upsample_bilinear2d_backward(du.view(b, 1, *size), list(size), [b, 1, h, w], False,
                                                         None, None)
        ds = (dm * (s > 0)).squeeze(1)                                        # (B, h, w)
        return torch.einsum("bhw,bc->bchw", ds, alpha), None, None


def cam_mse(a: torch.Tensor, alpha: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """SynQ CAM loss from the student's target activation ``a`` (B, C, h, w), its Grad-CAM weights ``alpha``
    (B, C) (constants) and the teacher's normalised map ``target`` (B, H, W) (detached): a scalar."""
    if a.dim() != 4 or alpha.shape != a.shape[:2] or target.dim() != 3 or target.shape[0] != a.shape[0]:
        raise ValueError(f"cam_mse needs a (B, C, h, w), alpha (B, C), target (B, H, W); got {tuple(a.shape)}, "
                         f"{tuple(alpha.shape)}, {tuple(target.shape)}")
    return CamMSE.apply(a, alpha.detach().to(a.dtype), target.detach().to(a.dtype))
