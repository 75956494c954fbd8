"""QuantConv2d and QuantLinear: drop-in layers whose weight is fake-quantized on every forward.

The latent float weight is trained; each forward quantizes it per output channel (axis 0) with min/max
parameters recomputed from the current weight (ZeroQ lineage: asymmetric, identity STE, no gradient to
the range). An optional ``input_quant`` (a QuantAct) quantizes the layer's input first: that is how ViT
placement quantizes every Linear's input activation.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..ops._common import check_bits
from ..ops.fake_quantize import fake_quantize
from ..ops.qparams import minmax_qparams


class _WeightQuant:
    """Shared by both layers: ``w_bits`` (2..8, or None for a float weight) and ``w_symmetric``."""

    w_bits: int | None
    w_symmetric: bool
    input_quant: nn.Module | None

    def _init_quant(self, w_bits, w_symmetric, input_quant) -> None:
        self.w_bits = None if w_bits is None else check_bits(w_bits)
        self.w_symmetric = bool(w_symmetric)
        self.input_quant = input_quant

    def quantized_weight(self) -> torch.Tensor:
        """The fake-quantized weight (same shape and dtype as ``weight``; gradient flows to ``weight``)."""
        w = self.weight
        if self.w_bits is None:
            return w
        scale, zp = minmax_qparams(w, self.w_bits, axis=0, symmetric=self.w_symmetric)
        return fake_quantize(w, scale, None if self.w_symmetric else zp, self.w_bits, axis=0,
                             symmetric=self.w_symmetric)

    def _quant_input(self, x: torch.Tensor) -> torch.Tensor:
        return x if self.input_quant is None else self.input_quant(x)

    def _quant_repr(self) -> str:
        return f", w_bits={self.w_bits}" + (", symmetric" if self.w_symmetric else "")


class QuantConv2d(nn.Conv2d, _WeightQuant):
    """``nn.Conv2d`` with a per-output-channel fake-quantized weight. Input (N, C_in, H, W) float; the same
    parameters, buffers and state_dict keys as the float layer (plus those of ``input_quant``, if any)."""

    def __init__(self, *args, w_bits: int | None = 8, w_symmetric: bool = False,
                 input_quant: nn.Module | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self._init_quant(w_bits, w_symmetric, input_quant)

    @classmethod
    def from_float(cls, conv: nn.Conv2d, w_bits: int | None, **kw) -> "QuantConv2d":
        """A QuantConv2d sharing ``conv``'s parameters (no copy)."""
        q = cls(conv.in_channels, conv.out_channels, conv.kernel_size, stride=conv.stride, padding=conv.padding,
                dilation=conv.dilation, groups=conv.groups, bias=conv.bias is not None,
                padding_mode=conv.padding_mode, device="meta", w_bits=w_bits, **kw)
        q.weight, q.bias = conv.weight, conv.bias
        q.train(conv.training)
        return q

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._conv_forward(self._quant_input(x), self.quantized_weight(), self.bias)

    def extra_repr(self) -> str:
        return super().extra_repr() + self._quant_repr()


class QuantLinear(nn.Linear, _WeightQuant):
    """``nn.Linear`` with a per-output-row fake-quantized weight. Input (..., in_features) float."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True, *, w_bits: int | None = 8,
                 w_symmetric: bool = False, input_quant: nn.Module | None = None, **kwargs):
        super().__init__(in_features, out_features, bias, **kwargs)
        self._init_quant(w_bits, w_symmetric, input_quant)

    @classmethod
    def from_float(cls, linear: nn.Linear, w_bits: int | None, **kw) -> "QuantLinear":
        """A QuantLinear sharing ``linear``'s parameters (no copy)."""
        q = cls(linear.in_features, linear.out_features, linear.bias is not None, device="meta", w_bits=w_bits, **kw)
        q.weight, q.bias = linear.weight, linear.bias
        q.train(linear.training)
        return q

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(self._quant_input(x), self.quantized_weight(), self.bias)

    def extra_repr(self) -> str:
        return super().extra_repr() + self._quant_repr()
