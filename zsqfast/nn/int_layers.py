"""IntConv2d and IntLinear: inference layers holding packed low-bit weights (:class:`~zsqfast.LowbitWeight`).

Each layer stores, as buffers (so ``state_dict`` and safetensors carry them)::

    packed    uint8 (N, K_pad/2) or (N, K_pad)   weight codes u[n, k] (zsqfast.pack_lowbit layout)
    w_scale   fp32 (N,)                           real weight = w_scale[n] * (u[n, k] - w_zero[n])
    w_zero    int32 (N,)
    w_colsum  int32 (N,)                          sum_k u[n, k] (zero-point correction of the fast kernels)
    bias      fp32 (N,)                           (absent when the layer has none)
    a_scale   fp32 (1,), a_zero int32 (1,)        activation grid of the INPUT (absent for weight-only layers)

Two modes, fixed at construction by ``a_bits``:

* integer (``a_bits`` in 2..8): ``forward(x)`` quantizes the float input on the fly on the grid
  ``(a_scale, a_zero)`` exactly as :func:`zsqfast.fake_quantize` would (so a float input that already lies on
  that grid, a QuantAct's output, gives back its own codes) and runs :func:`zsqfast.lowbit_conv2d` /
  :func:`zsqfast.lowbit_linear`: integer GEMM, int32 accumulation, fused ``* (a_scale * w_scale) + bias``.
* weight-only (``a_bits=None``): for layers whose input the fake-quant model leaves float (the first conv
  seeing the image, a classifier after average pooling, a conv after a residual add). The weight is stored
  packed and DEQUANTIZED ON EVERY CALL (one pass over the packed codes, no float copy kept, so the layer is
  as small in memory as on disk); the convolution / matmul then runs in fp32 on the float input, which is
  the fake-quant layer's arithmetic.

IntConv2d returns channels_last (NHWC memory order) tensors in both modes by default: the integer op's
kernel writes that order, and the float layers between convolutions (ReLU, QuantAct, max pooling, residual
adds) keep it, so a converted CNN runs NHWC from its first convolution on without a transpose (PyTorch's
channels_last max pooling is also ~10x faster than its NCHW one here). With ``channels_last=False`` it
returns contiguous (NCHW) tensors instead, as ``nn.Conv2d`` does on an NCHW input: for models whose forward
calls ``Tensor.view`` on a feature map (``x.view(B, -1)``), which a channels_last map cannot take;
:func:`zsqfast.convert_to_integer` chooses it for every IntConv2d of such a model.

A BatchNorm folded by :func:`zsqfast.convert_to_integer` lives in ``w_scale`` and ``bias`` (the integer codes
do not change), so ``w_scale`` may be negative. Symmetric grids are stored as unsigned codes with zero point
``2^(bits-1)`` (``u = q + 2^(bits-1)``), which is the same real grid.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from .._backend import active_backend
from ..ops.lowbit_conv2d import lowbit_conv2d
from ..ops.lowbit_gemm import lowbit_linear
from ..ops.lowbit_pack import LowbitWeight, packed_shape
from ..ops.qparams import minmax_qparams
from .quant_layers import resolve_bits


def activation_grid(scale: torch.Tensor, zero_point: torch.Tensor | None, bits: int, symmetric: bool):
    """``(a_scale fp32 (1,), a_zero int32 (1,))`` of an activation grid in the unsigned-code form the integer
    ops take: a symmetric signed grid ``q in [-2^(b-1), 2^(b-1) - 1]`` becomes ``u = q + 2^(b-1)``."""
    s = scale.detach().float().reshape(1).clone()
    if symmetric:
        return s, torch.full((1,), 1 << (bits - 1), dtype=torch.int32, device=s.device)
    return s, zero_point.detach().round().to(torch.int32).reshape(1).clone()


def weight_codes(layer: nn.Module) -> LowbitWeight:
    """The packed codes of a fake-quant layer's weight (QuantConv2d / QuantLinear with ``w_bits`` set), on
    the per-channel grid its ``quantized_weight()`` recomputes from the current weight."""
    bits, w = layer.w_bits, layer.weight.detach().float()
    scale, zp = minmax_qparams(w, bits, axis=0, symmetric=layer.w_symmetric)
    if layer.w_symmetric:
        zp = torch.full_like(scale, float(1 << (bits - 1)))
    return LowbitWeight.from_float(w, scale, zp, bits)


class _IntLayer(nn.Module):
    """Shared state and construction of the two integer layers (``N`` outputs, reduction length ``K``)."""

    def _init_int(self, N: int, K: int, w_bits: int, a_bits: int | None, bias: bool) -> None:
        self.w_bits = resolve_bits(w_bits, "w_bits", allow_float=False)
        self.a_bits = None if a_bits is None else resolve_bits(a_bits, "a_bits", allow_float=False)
        self.K = K
        self.register_buffer("packed", torch.zeros(packed_shape(N, K, self.w_bits), dtype=torch.uint8))
        self.register_buffer("w_scale", torch.ones(N))
        self.register_buffer("w_zero", torch.zeros(N, dtype=torch.int32))
        self.register_buffer("w_colsum", torch.zeros(N, dtype=torch.int32))
        self.register_buffer("bias", torch.zeros(N) if bias else None)
        if self.a_bits is not None:
            self.register_buffer("a_scale", torch.ones(1))
            self.register_buffer("a_zero", torch.zeros(1, dtype=torch.int32))

    def set_weight(self, lw: LowbitWeight, bias: torch.Tensor | None,
                   grid: tuple[torch.Tensor, torch.Tensor] | None = None) -> "_IntLayer":
        """Fill the buffers from packed codes, an optional fp32 bias and (integer mode) the input grid
        ``(a_scale, a_zero)`` of :func:`activation_grid`. Returns self."""
        if lw.bits != self.w_bits or lw.K != self.K or tuple(lw.packed.shape) != tuple(self.packed.shape):
            raise ValueError(f"weight of {lw.bits} bits, K={lw.K}, packed {tuple(lw.packed.shape)} does not fit "
                             f"this layer ({self.w_bits} bits, K={self.K}, packed {tuple(self.packed.shape)})")
        if (bias is None) != (self.bias is None) or (grid is None) != (self.a_bits is None):
            raise ValueError("bias / activation grid presence does not match the layer's configuration")
        self.packed, self.w_scale, self.w_zero, self.w_colsum = lw.packed, lw.scale, lw.zero_point, lw.colsum
        if bias is not None:
            self.bias = bias.detach().float().reshape(-1).clone()
        if grid is not None:
            self.a_scale, self.a_zero = grid[0].float().reshape(1), grid[1].to(torch.int32).reshape(1)
        return self

    def fill(self, layer: nn.Module, grid=None, *, scale_mul=None, bias_override=None) -> "_IntLayer":
        """Pack the fake-quant ``layer``'s weight into this layer (from :meth:`empty_for`), folding an optional
        per-channel ``y * scale_mul + ...`` (:meth:`IntConv2d.from_quant`). Returns self."""
        if getattr(layer, "w_bits", None) is None:
            raise ValueError(f"{type(layer).__name__} has a float weight (w_bits=None): there are no codes to pack")
        lw = weight_codes(layer)
        if scale_mul is not None:
            lw = LowbitWeight(lw.packed, lw.scale * scale_mul.float(), lw.zero_point, lw.bits, lw.K, lw.colsum)
        bias = bias_override if bias_override is not None else layer.bias
        return self.set_weight(lw, None if bias is None else bias.detach().float(), grid)

    def lowbit_weight(self) -> LowbitWeight:
        return LowbitWeight(self.packed, self.w_scale, self.w_zero, self.w_bits, self.K, self.w_colsum)

    def dequantized_weight(self) -> torch.Tensor:
        """fp32 (N, K) real weight ``w_scale * (u - w_zero)``."""
        return self.lowbit_weight().dequantize()

    def _int_repr(self) -> str:
        mode = f"a_bits={self.a_bits}" if self.a_bits is not None else "weight-only (float activations)"
        return f", w_bits={self.w_bits}, {mode}"


class IntConv2d(_IntLayer):
    """Integer (or weight-only) 2-D convolution; input (B, C, H, W) float, output fp32 (B, OC, Ho, Wo).

    Arguments as ``nn.Conv2d`` (ints or pairs; ``padding`` an int/pair; ``padding_mode`` zeros, reflect,
    replicate or circular: non-zero modes pad the float input first, which keeps grid values on the grid),
    plus ``w_bits`` (2..8), ``a_bits`` (2..8, or None for weight-only) and ``channels_last`` (the output's
    memory order: channels_last, the fast default, or contiguous NCHW; module docstring). Build one from a
    fake-quant layer with :meth:`from_quant`; the plain constructor makes an empty layer to load a state_dict
    into.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size, stride=1, padding=0, dilation=1,
                 groups: int = 1, bias: bool = True, padding_mode: str = "zeros", *, w_bits: int = 4,
                 a_bits: int | None = 4, channels_last: bool = True):
        super().__init__()
        pair = nn.modules.utils._pair
        self.channels_last = bool(channels_last)
        self.in_channels, self.out_channels, self.groups = in_channels, out_channels, groups
        self.kernel_size, self.stride, self.dilation = pair(kernel_size), pair(stride), pair(dilation)
        if isinstance(padding, str):
            raise ValueError(f"IntConv2d takes numeric padding, got {padding!r} (convert 'same' / 'valid' first)")
        self.padding, self.padding_mode = pair(padding), padding_mode
        if padding_mode not in ("zeros", "reflect", "replicate", "circular"):
            raise ValueError(f"unknown padding_mode {padding_mode!r}")
        if groups < 1 or in_channels % groups or out_channels % groups:
            raise ValueError(f"groups={groups} must divide in_channels={in_channels} and out_channels={out_channels}")
        K = in_channels // groups * self.kernel_size[0] * self.kernel_size[1]
        self._init_int(out_channels, K, w_bits, a_bits, bias)

    def config(self) -> dict:
        """Constructor arguments (JSON-serialisable): what :func:`zsqfast.load_integer_model` rebuilds from."""
        return dict(in_channels=self.in_channels, out_channels=self.out_channels, kernel_size=list(self.kernel_size),
                    stride=list(self.stride), padding=list(self.padding), dilation=list(self.dilation),
                    groups=self.groups, bias=self.bias is not None, padding_mode=self.padding_mode,
                    w_bits=self.w_bits, a_bits=self.a_bits, channels_last=self.channels_last)

    @classmethod
    def empty_for(cls, layer: nn.Conv2d, a_bits: int | None = None, bias: bool | None = None) -> "IntConv2d":
        """The empty IntConv2d (zero buffers, nothing packed) that the fake-quant ``layer`` becomes, ``a_bits``
        None for weight-only, ``bias`` default: ``layer`` has one. ValueError when ``layer`` cannot be
        represented (asymmetric ``padding='same'``, ``w_bits`` None...)."""
        pad = layer.padding
        if isinstance(pad, str):  # 'valid' -> 0; symmetric 'same' -> explicit padding
            total = [d * (k - 1) for d, k in zip(layer.dilation, layer.kernel_size)]
            if pad == "same" and any(t % 2 for t in total):
                raise ValueError("padding='same' with an even kernel extent pads asymmetrically: not supported")
            pad = tuple(t // 2 for t in total) if pad == "same" else (0, 0)
        return cls(layer.in_channels, layer.out_channels, layer.kernel_size, layer.stride, pad, layer.dilation,
                   layer.groups, layer.bias is not None if bias is None else bias, layer.padding_mode,
                   w_bits=layer.w_bits, a_bits=a_bits)

    @classmethod
    def from_quant(cls, layer: nn.Conv2d, grid=None, a_bits: int | None = None, *, scale_mul=None,
                   bias_override=None) -> "IntConv2d":
        """An IntConv2d reproducing the fake-quant ``layer`` (a QuantConv2d with ``w_bits`` set).

        ``grid``: ``(a_scale, a_zero)`` of the input (:func:`activation_grid`) with ``a_bits``, or None for
        weight-only. ``scale_mul`` (OC,) / ``bias_override`` (OC,): a folded BatchNorm ``y -> y * a + c``
        gives ``w_scale * a`` and ``bias * a + c`` (exact algebra; the codes are unchanged)."""
        m = cls.empty_for(layer, a_bits if grid is not None else None,
                          layer.bias is not None or bias_override is not None)
        return m.fill(layer, grid, scale_mul=scale_mul, bias_override=bias_override)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self._conv(x)
        return y if self.channels_last else y.contiguous()

    def _conv(self, x: torch.Tensor) -> torch.Tensor:
        padding = self.padding
        if self.padding_mode != "zeros":
            ph, pw = self.padding
            x, padding = F.pad(x, (pw, pw, ph, ph), mode=self.padding_mode), (0, 0)
        if self.a_bits is None:  # channels_last like the integer op's output (oneDNN's faster layout here)
            w = self.dequantized_weight().reshape(self.out_channels, -1, *self.kernel_size)
            if x.dim() == 4 and self.channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            return F.conv2d(x, w.to(x.dtype), None if self.bias is None else self.bias.to(x.dtype), self.stride,
                            padding, self.dilation, self.groups)
        if (x.device.type == "cpu" and x.dtype == torch.float32 and x.dim() == 4 and x.size(1) == self.in_channels
                and not torch.compiler.is_compiling() and active_backend("cpu", "lowbit_conv2d") == "cpp"):
            # eager CPU: straight to the C++ kernel (it checks shapes, dtypes and NaN itself), skipping the
            # public function's Python validation and the op's adapter (~35 us a call: most of a batch-1 layer)
            y = torch.ops.zsqfast_ext.lowbit_conv2d(
                x if x.is_contiguous(memory_format=torch.channels_last) else x.contiguous(), self.packed,
                self.w_bits, self.K, self.w_scale, self.w_zero, self.w_colsum, self.a_scale,
                torch.reciprocal(self.a_scale), self.a_zero, self.a_bits, self.bias, self.kernel_size, self.stride,
                padding, self.dilation, self.groups)
            return y.contiguous(memory_format=torch.channels_last)
        return lowbit_conv2d(x, self.packed, self.w_scale, self.w_zero, self.w_colsum, self.a_scale, self.a_zero,
                             self.a_bits, self.w_bits, self.kernel_size, self.stride, padding, self.dilation,
                             self.groups, self.bias, K=self.K)  # K: an input of the wrong width is an error

    def extra_repr(self) -> str:
        s = (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}, "
             f"padding={self.padding}")
        if self.dilation != (1, 1):
            s += f", dilation={self.dilation}"
        if self.groups != 1:
            s += f", groups={self.groups}"
        if not self.channels_last:
            s += ", channels_last=False"
        return s + self._int_repr()


class IntLinear(_IntLayer):
    """Integer (or weight-only) linear layer; input (..., in_features) float, output fp32 (..., out_features).

    ``w_bits`` 2..8; ``a_bits`` 2..8, or None for weight-only. Build one with :meth:`from_quant`."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True, *, w_bits: int = 4,
                 a_bits: int | None = 4):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self._init_int(out_features, in_features, w_bits, a_bits, bias)

    def config(self) -> dict:
        return dict(in_features=self.in_features, out_features=self.out_features, bias=self.bias is not None,
                    w_bits=self.w_bits, a_bits=self.a_bits)

    @classmethod
    def empty_for(cls, layer: nn.Linear, a_bits: int | None = None, bias: bool | None = None) -> "IntLinear":
        """As :meth:`IntConv2d.empty_for`, for a QuantLinear."""
        return cls(layer.in_features, layer.out_features, layer.bias is not None if bias is None else bias,
                   w_bits=layer.w_bits, a_bits=a_bits)

    @classmethod
    def from_quant(cls, layer: nn.Linear, grid=None, a_bits: int | None = None, *, scale_mul=None,
                   bias_override=None) -> "IntLinear":
        """As :meth:`IntConv2d.from_quant`, for a QuantLinear."""
        m = cls.empty_for(layer, a_bits if grid is not None else None,
                          layer.bias is not None or bias_override is not None)
        return m.fill(layer, grid, scale_mul=scale_mul, bias_override=bias_override)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.a_bits is None:
            return F.linear(x, self.dequantized_weight().to(x.dtype),
                            None if self.bias is None else self.bias.to(x.dtype))
        return lowbit_linear(x, self.packed, self.w_scale, self.w_zero, self.w_colsum, self.a_scale, self.a_zero,
                             self.a_bits, self.w_bits, self.K, self.bias)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}" + self._int_repr()

