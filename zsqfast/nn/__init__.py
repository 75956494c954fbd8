"""Drop-in fake-quantized layers."""
from .int_layers import IntConv2d, IntLinear
from .quant_act import QuantAct
from .quant_layers import QuantConv2d, QuantLinear

__all__ = ["QuantAct", "QuantConv2d", "QuantLinear", "IntConv2d", "IntLinear"]
