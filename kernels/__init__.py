"""Triton kernels of zsqfast (installed as ``zsqfast.kernels``): the kernel contracts of the ops, for CUDA
tensors and, under ``TRITON_INTERPRET=1``, for CPU tensors. ``python -m zsqfast.kernels.aot`` compiles them
ahead of time for sm_80 / sm_90 and reports registers and spills."""
from .bn_stats import bn_stats, bn_stats_backward
from .fake_quant import fake_quant, fake_quant_backward
from .lowbit_conv2d import lowbit_conv2d
from .lowbit_gemm import lowbit_gemm, lowbit_linear
from .lowpass import circular_conv_sep
from .lsq import lsq_fake_quant, lsq_fake_quant_backward

__all__ = ["bn_stats", "bn_stats_backward", "circular_conv_sep", "fake_quant", "fake_quant_backward", "lowbit_conv2d",
           "lowbit_gemm", "lowbit_linear", "lsq_fake_quant", "lsq_fake_quant_backward"]
