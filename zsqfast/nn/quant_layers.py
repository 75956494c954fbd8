"""QuantConv2d and QuantLinear: drop-in layers whose weight is fake-quantized on every forward.

The latent float weight is what trains; each forward quantizes it per output channel (axis 0) with min/max
parameters recomputed from the current weight, ZeroQ lineage (GDFQ, Qimera, IntraQ, HAST, SynQ)::

    scale_c, zp_c = minmax_qparams(w, bits, axis=0)         # scale_c = (max_c - min_c) / (2^b - 1)
    w_hat = fake_quantize(w, scale_c, zp_c, bits, axis=0)   # scale_c * clamp(round(w / scale_c), z0_c, z0_c + 2^b - 1)

with an identity straight-through gradient (``dL/dw := dL/dw_hat``) and no gradient to the range. An
optional ``input_quant`` (a :class:`~zsqfast.nn.QuantAct`) quantizes the layer's input first: that is how the
ViT placement of :func:`zsqfast.quantize_model` quantizes every Linear's input activation while keeping
the float layer's state_dict keys (``weight``, ``bias``) unchanged.
"""
from __future__ import annotations

import numbers

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..ops.fake_quantize import fake_quantize
from ..ops.qparams import minmax_qparams


def resolve_bits(value, name: str = "bits", allow_float: bool = True) -> int | None:
    """Validate a bit width: an integer in 2..8, or (``allow_float``) ``None`` / 32 meaning "leave float".

    Returns the int, or None for float. Raises ValueError naming ``name`` otherwise (bools, floats and
    strings are rejected, so ``4.5`` or ``"4"`` never silently become 4).
    """
    if allow_float and (value is None or (isinstance(value, numbers.Integral) and not isinstance(value, bool)
                                          and int(value) == 32)):
        return None
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or not 2 <= int(value) <= 8:
        allowed = "an integer in 2..8 (or None / 32 for float)" if allow_float else "an integer in 2..8"
        raise ValueError(f"{name} must be {allowed}, got {value!r}")
    return int(value)


class _WeightQuant:
    """Mixin of both layers: ``w_bits`` (2..8, or None for a float weight), ``w_symmetric``, ``input_quant``."""

    weight: torch.Tensor
    w_bits: int | None
    w_symmetric: bool
    input_quant: nn.Module | None

    def _init_quant(self, w_bits, w_symmetric: bool, input_quant: nn.Module | None) -> None:
        self.w_bits = resolve_bits(w_bits, "w_bits")
        self.w_symmetric = bool(w_symmetric)
        self.input_quant = input_quant  # registered as a submodule (nn.Module.__setattr__) when not None

    def quantized_weight(self) -> torch.Tensor:
        """The fake-quantized weight: ``weight``'s shape and dtype, gradient passes to ``weight`` unchanged.

        Asymmetric (default): per-channel min/max grid above. Symmetric: ``scale_c = max|w_c| / (2^(b-1) - 1)``,
        signed grid, zero point 0. ``w_bits=None``: ``weight`` itself.
        """
        w = self.weight
        if self.w_bits is None:
            return w
        scale, zp = minmax_qparams(w, self.w_bits, axis=0, symmetric=self.w_symmetric)
        return fake_quantize(w, scale, None if self.w_symmetric else zp, self.w_bits, axis=0, ste="identity",
                             symmetric=self.w_symmetric)

    def _quant_input(self, x: torch.Tensor) -> torch.Tensor:
        return x if self.input_quant is None else self.input_quant(x)

    def _quant_repr(self) -> str:
        return f", w_bits={self.w_bits}" + (", w_symmetric=True" if self.w_symmetric else "")


def _adopt(q: nn.Module, float_module: nn.Module) -> None:
    """Make ``q`` (built on the meta device) share ``float_module``'s parameters and training flag."""
    q.weight = float_module.weight
    q.bias = float_module.bias
    q.train(float_module.training)


class QuantConv2d(nn.Conv2d, _WeightQuant):
    """``nn.Conv2d`` whose weight ``(C_out, C_in / groups, kH, kW)`` is fake-quantized per output channel.

    Input ``(N, C_in, H, W)`` float32/16/bf16, output ``(N, C_out, H', W')`` as ``nn.Conv2d``. Same parameters,
    state_dict keys (``weight``, ``bias``) and conv arguments (stride, padding, padding_mode, dilation,
    groups: depthwise and grouped convs work) as the float layer, plus ``input_quant.*`` when it has one.

    Args (beyond nn.Conv2d's): w_bits: 2..8, or None / 32 (float weight). w_symmetric: signed symmetric grid.
        input_quant: a module applied to the input first (a QuantAct), or None (the input stays float).
    """

    def __init__(self, *args, w_bits: int | None = 8, w_symmetric: bool = False,
                 input_quant: nn.Module | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self._init_quant(w_bits, w_symmetric, input_quant)

    @classmethod
    def from_float(cls, conv: nn.Conv2d, w_bits: int | None, *, w_symmetric: bool = False,
                   input_quant: nn.Module | None = None) -> "QuantConv2d":
        """A QuantConv2d that SHARES ``conv``'s parameters (no copy: deep-copy first to keep ``conv`` apart)."""
        if not isinstance(conv, nn.Conv2d):
            raise TypeError(f"QuantConv2d.from_float needs an nn.Conv2d, got {type(conv).__name__}")
        q = cls(conv.in_channels, conv.out_channels, conv.kernel_size, stride=conv.stride, padding=conv.padding,
                dilation=conv.dilation, groups=conv.groups, bias=conv.bias is not None,
                padding_mode=conv.padding_mode, device="meta", w_bits=w_bits, w_symmetric=w_symmetric,
                input_quant=input_quant)
        _adopt(q, conv)
        return q

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._conv_forward(self._quant_input(x), self.quantized_weight(), self.bias)

    def extra_repr(self) -> str:
        return super().extra_repr() + self._quant_repr()


class QuantLinear(nn.Linear, _WeightQuant):
    """``nn.Linear`` whose weight ``(out_features, in_features)`` is fake-quantized per output row.

    Input ``(..., in_features)`` float, output ``(..., out_features)``. Same parameters and state_dict keys as
    the float layer, plus ``input_quant.*`` when it has one (the ViT placement's input quantizer).
    Args as :class:`QuantConv2d`.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True, *, w_bits: int | None = 8,
                 w_symmetric: bool = False, input_quant: nn.Module | None = None, **kwargs):
        super().__init__(in_features, out_features, bias, **kwargs)
        self._init_quant(w_bits, w_symmetric, input_quant)

    @classmethod
    def from_float(cls, linear: nn.Linear, w_bits: int | None, *, w_symmetric: bool = False,
                   input_quant: nn.Module | None = None) -> "QuantLinear":
        """A QuantLinear that SHARES ``linear``'s parameters (no copy)."""
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"QuantLinear.from_float needs an nn.Linear, got {type(linear).__name__}")
        q = cls(linear.in_features, linear.out_features, linear.bias is not None, device="meta", w_bits=w_bits,
                w_symmetric=w_symmetric, input_quant=input_quant)
        _adopt(q, linear)
        return q

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(self._quant_input(x), self.quantized_weight(), self.bias)

    def extra_repr(self) -> str:
        return super().extra_repr() + self._quant_repr()
