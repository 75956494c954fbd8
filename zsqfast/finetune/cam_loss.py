"""SynQ's CAM-alignment loss as one autograd node: weighted channel sum, ReLU, bilinear upsample, per-sample
min-max normalisation and MSE against the (detached) teacher map, with a hand-written backward.

The node is the ``torch.library`` op ``zsqfast::cam_mse`` (:mod:`zsqfast.ops.cam_mse`: the math, the
pure-PyTorch reference and the fused C++ CPU kernel that float32 CPU tensors run). Only the (B, h, w)
weighted sum is kept for the backward, not the composite graph's six intermediate (B, H, W) maps; the result
equals the composite (:func:`zsqfast.finetune.gradcam.finish_map` + ``F.mse_loss``) to rounding (tested,
including a gradient check).
"""
from __future__ import annotations

import torch

from ..ops.cam_mse import cam_mse as _cam_mse_op


def cam_mse(a: torch.Tensor, alpha: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """SynQ CAM loss from the student's target activation ``a`` (B, C, h, w), its Grad-CAM weights ``alpha``
    (B, C) (constants) and the teacher's normalised map ``target`` (B, H, W) (detached): a scalar.

    float32 CPU tensors run the fused C++ kernel, other float dtypes and devices the reference."""
    if a.dim() != 4 or alpha.shape != a.shape[:2] or target.dim() != 3 or target.shape[0] != a.shape[0]:
        raise ValueError(f"cam_mse needs a (B, C, h, w), alpha (B, C), target (B, H, W); got {tuple(a.shape)}, "
                         f"{tuple(alpha.shape)}, {tuple(target.shape)}")
    if not a.is_floating_point():
        raise TypeError(f"cam_mse needs a floating-point activation, got {a.dtype}")
    return _cam_mse_op(a, alpha.detach().to(a.dtype), target.detach().to(a.dtype))[0]
