"""Triton low-bit convolution: im2col of the float input, then the grouped low-bit GEMM of lowbit_gemm.py.

Contract and math: ``zsqfast/ops/lowbit_conv2d.py``. ``F.unfold`` gives the patches (B, C kh kw, L) in
PyTorch's (c, i, j) order, i.e. the packed weight's K order, group g owning columns g K .. g K + K - 1;
as a (B L, C kh kw) matrix they go through ``grouped_linear``: one quantization pass (codes + per-group row
sums) and one grouped GEMM launch (grid z = group) with the fused epilogue, whatever the number of groups
(depthwise included: K = kh kw is padded to one 128-code block).

Padding: unfold pads with 0.0, whose code is ``clamp(za, 0, qmax)``; that is the code ``za`` of the real
value 0 (what the reference pads with) exactly when ``0 <= za <= qmax`` (every min/max grid that contains
0, e.g. ReLU outputs). Otherwise, with padding, the reference runs instead (reading ``za`` is then a host
sync, only for padded convolutions).
"""
import torch
import torch.nn.functional as F

from zsqfast.ops import lowbit_conv2d as conv_ref

from .lowbit_gemm import grouped_linear


def lowbit_conv2d(x, w_packed, w_bits, K, w_scale, w_zero, w_colsum, a_scale, a_inv_scale, a_zero, a_bits, bias,
                  kernel_size, stride, padding, dilation, groups):
    """Kernel contract of ``zsqfast::lowbit_conv2d``: fp32 (B, OC, Ho, Wo) for fp32 x (B, C, H, W) contiguous.

    Args: as :func:`zsqfast.kernels.lowbit_gemm.lowbit_linear` (per-tensor activation grid of shape (1,)),
    plus the convolution geometry (pairs) and ``groups`` (dividing C and OC)."""
    fallback = conv_ref.inexact_padding_reference(x, w_packed, w_bits, K, w_scale, w_zero, w_colsum, a_scale,
                                                  a_inv_scale, a_zero, a_bits, bias, kernel_size, stride, padding,
                                                  dilation, groups)
    if fallback is not None:
        return fallback
    B = x.size(0)
    OC = w_packed.size(0)
    (Ho, Wo) = [(x.size(2 + i) + 2 * padding[i] - dilation[i] * (kernel_size[i] - 1) - 1) // stride[i] + 1
                for i in (0, 1)]
    patches = F.unfold(x, list(kernel_size), list(dilation), list(padding), list(stride))  # (B, C kh kw, L)
    a = patches.transpose(1, 2).reshape(B * Ho * Wo, patches.size(1)).contiguous()
    y = grouped_linear(a, w_packed, w_bits, K, w_scale, w_zero, w_colsum, a_scale, a_inv_scale, a_zero, a_bits,
                       bias, groups)                                                     # (B L, OC)
    return y.view(B, Ho * Wo, OC).transpose(1, 2).reshape(B, OC, Ho, Wo).contiguous()
