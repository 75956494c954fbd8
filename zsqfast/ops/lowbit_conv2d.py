"""Low-bit integer 2-D convolution (W4A4 / W3A3 inference of a fake-quant conv), int32 accumulation.

Integer math (exact; every backend must reproduce it bit for bit), per tensor activations, per output
channel weights, weight codes packed by :mod:`zsqfast.ops.lowbit_pack` from the (OC, C/g, kh, kw) weight
flattened to (OC, K), K = C/g * kh * kw in PyTorch's (c, i, j) order::

    ua = clamp(rne(x * (1 / sa)) + za, 0, 2^ab - 1)                        activation codes (as fake_quant)
    c[b, n, p] = conv2d(ua - za, uw - zw[n])  with ZERO padding of (ua - za)  (a padded tap is the real 0)
    y = fp32(c) * fp32(sa * sw[n]) + bias[n]                               fp32, in this order

so ``y`` is the convolution of the fake-quant activations with the fake-quant weights, computed exactly.
Fast paths lower it to :mod:`zsqfast.ops.lowbit_gemm` (implicit GEMM / im2col of codes): with zero-point
corrections through row sums of the patch codes and the weight colsums. Padding is exact there when the
padded patch entries hold the code ``za`` (possible when ``0 <= za <= 2^ab - 1``, e.g. every ReLU output
range [0, max]); outside that range a border correction (or the reference) is needed.

Kernel contract::

    lowbit_conv2d(x, w_packed, w_bits, K, w_scale, w_zero, w_colsum, a_scale, a_inv_scale, a_zero, a_bits,
                  bias, kernel_size, stride, padding, dilation, groups) -> y
        x fp32 (B, C, H, W) contiguous NCHW or channels_last (kernels that need NCHW make it so); per-channel
        tensors as in lowbit_linear (a_* of shape (1,)); y fp32 (B, OC, Ho, Wo), NCHW or channels_last.
    The op's result is channels_last (NHWC memory order) whatever the input's: the CPU kernel's implicit GEMM
    writes it that way, and a network of integer convolutions then never transposes between layers.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ._dispatch import define_op
from .lowbit_gemm import check_activation, check_k, check_weight, epilogue, quantize_codes
from .lowbit_pack import unpack_lowbit


def reference(x, w_packed, w_scale, w_zero, w_colsum, a_scale, a_zero, a_bits: int, w_bits: int,
              kernel_size, stride, padding, dilation, groups: int, bias=None):
    """Pure-PyTorch semantics of ``zsqfast::lowbit_conv2d``: fp32 (B, OC, Ho, Wo). Exact: the centered
    integer convolution runs in float64, exact for integers below 2^53."""
    kh, kw = kernel_size
    OC = w_packed.size(0)
    K = x.size(1) // groups * kh * kw
    za = a_zero.to(torch.float64).reshape(())
    ua = quantize_codes(x, a_scale.float().reshape(()), za, a_bits).to(torch.float64) - za
    uw = unpack_lowbit(w_packed, w_bits, K).to(torch.float64) - w_zero.to(torch.float64).reshape(-1, 1)
    c = F.conv2d(ua, uw.reshape(OC, -1, kh, kw), None, list(stride), list(padding), list(dilation), groups)
    y = epilogue(c, a_scale.reshape(()), w_scale.reshape(1, -1, 1, 1),
                 None if bias is None else bias.reshape(1, -1, 1, 1))
    return y.contiguous(memory_format=torch.channels_last)


def inexact_padding_reference(x, w_packed, w_bits, K, w_scale, w_zero, w_colsum, a_scale, a_inv_scale, a_zero,
                              a_bits, bias, kernel_size, stride, padding, dilation, groups):
    """For the im2col fast paths (kernel-contract arguments): ``None`` when zero padding of ``x`` is exact
    (no padding, or ``0 <= za <= 2^ab - 1``: the code of 0.0 is then ``za``), else the reference result.
    Reads ``za`` (a host sync on a GPU) only for padded convolutions."""
    if not any(padding) or 0 <= int(a_zero.reshape(-1)[0]) <= (1 << a_bits) - 1:
        return None
    return reference(x, w_packed, w_scale, w_zero, w_colsum, a_scale, a_zero, a_bits, w_bits, kernel_size, stride,
                     padding, dilation, groups, bias)


def _out_hw(x, kernel_size, stride, padding, dilation):
    return [(x.size(2 + i) + 2 * padding[i] - dilation[i] * (kernel_size[i] - 1) - 1) // stride[i] + 1 for i in (0, 1)]


def _fake(x, w_packed, w_scale, w_zero, w_colsum, a_scale, a_zero, a_bits, w_bits, kernel_size, stride, padding,
          dilation, groups, bias=None):
    return torch.empty((x.size(0), w_packed.size(0), *_out_hw(x, kernel_size, stride, padding, dilation)),
                       dtype=torch.float32, device=x.device, memory_format=torch.channels_last)


def _adapter(impl, x, w_packed, w_scale, w_zero, w_colsum, a_scale, a_zero, a_bits, w_bits, kernel_size, stride,
             padding, dilation, groups, bias=None):
    sa = a_scale.float().contiguous()
    K = x.size(1) // groups * kernel_size[0] * kernel_size[1]
    x = x.float()
    if not x.is_contiguous(memory_format=torch.channels_last):  # NHWC input stays NHWC (the C++ kernel reads it)
        x = x.contiguous()
    y = impl(x, w_packed.contiguous(), w_bits, K, w_scale.float().contiguous(),
                w_zero.to(torch.int32).contiguous(), w_colsum.to(torch.int32).contiguous(), sa, torch.reciprocal(sa),
                a_zero.to(torch.int32).contiguous(), a_bits, None if bias is None else bias.float().contiguous(),
                list(kernel_size), list(stride), list(padding), list(dilation), groups)
    return y.contiguous(memory_format=torch.channels_last)


lowbit_conv2d_op = define_op(
    "lowbit_conv2d",
    "(Tensor x, Tensor w_packed, Tensor w_scale, Tensor w_zero, Tensor w_colsum, Tensor a_scale, Tensor a_zero, "
    "int a_bits, int w_bits, int[2] kernel_size, int[2] stride, int[2] padding, int[2] dilation, int groups, "
    "Tensor? bias=None) -> Tensor",
    reference, _fake, _adapter)


def _pair(v, name, least):
    t = (v, v) if isinstance(v, int) else tuple(v)
    if len(t) != 2 or not all(isinstance(i, int) for i in t):
        raise ValueError(f"{name} must be an int or a pair of ints, got {v!r}")
    if min(t) < least:
        raise ValueError(f"{name} must be >= {least}, got {v!r}")
    return t


def lowbit_conv2d(x: torch.Tensor, w_packed: torch.Tensor, w_scale: torch.Tensor, w_zero: torch.Tensor,
                  w_colsum: torch.Tensor, a_scale: torch.Tensor, a_zero: torch.Tensor, a_bits: int, w_bits: int,
                  kernel_size, stride=1, padding=0, dilation=1, groups: int = 1,
                  bias: torch.Tensor | None = None, *, K: int | None = None) -> torch.Tensor:
    """Integer convolution of float activations ``x`` (B, C, H, W), quantized on the fly per tensor
    (``a_scale``, ``a_zero`` of one element, checked as in :func:`zsqfast.lowbit_linear`), with packed weight
    codes (OC, K) of an (OC, C/groups, kh, kw) weight (:func:`zsqfast.pack_lowbit`); ``w_scale``, ``w_zero``,
    ``w_colsum`` (OC,) as in :func:`zsqfast.lowbit_linear`. ``kernel_size``, ``stride``, ``dilation`` >= 1,
    ``padding`` >= 0 (ints or pairs). Returns fp32 (B, OC, Ho, Wo) in channels_last memory order.

    ``K``: the weight's reduction length C/groups * kh * kw (:attr:`LowbitWeight.K`). The packed codes only
    show K rounded up to a multiple of 128, so pass it to have an ``x`` with the wrong channel count
    rejected (ValueError) instead of convolved with the zero padding codes; without it only the padded
    length is checked."""
    if x.dim() != 4:
        raise ValueError(f"x must be (B, C, H, W), got shape {tuple(x.shape)}")
    ks, st, pd, dl = (_pair(v, n, least) for v, n, least in ((kernel_size, "kernel_size", 1), (stride, "stride", 1),
                                                             (padding, "padding", 0), (dilation, "dilation", 1)))
    if groups < 1 or x.size(1) % groups:
        raise ValueError(f"groups={groups} must divide the {x.size(1)} input channels")
    kx = x.size(1) // groups * ks[0] * ks[1]
    if K is not None and kx != K:
        raise ValueError(f"x has {x.size(1)} channels: {x.size(1) // groups} per group x {ks[0]}x{ks[1]} taps is "
                         f"K={kx}, but the weight has K={K}")
    K = kx
    N = check_weight(w_packed, w_scale, w_zero, w_colsum, w_bits, K)
    if N % groups:
        raise ValueError(f"groups={groups} must divide the {N} output channels")
    check_activation(x, a_bits, a_scale, a_zero, None, "lowbit_conv2d")
    check_k(K, a_bits, w_bits)
    if bias is not None and bias.numel() != N:
        raise ValueError(f"bias must have {N} elements")
    if min(_out_hw(x, ks, st, pd, dl)) < 1:
        raise ValueError(f"the {ks} kernel does not fit the {tuple(x.shape[2:])} input with padding {pd}, "
                         f"dilation {dl}")
    return lowbit_conv2d_op(x, w_packed, w_scale.reshape(N), w_zero.reshape(N), w_colsum.reshape(N),
                            a_scale.reshape(-1), a_zero.reshape(-1), a_bits, w_bits, list(ks), list(st), list(pd),
                            list(dl), groups, None if bias is None else bias.reshape(N))
