"""Drop-in fake-quantized layers."""
from .quant_act import QuantAct
from .quant_layers import QuantConv2d, QuantLinear

__all__ = ["QuantAct", "QuantConv2d", "QuantLinear"]
