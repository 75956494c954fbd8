"""Registers the compiled (cpp, cuda) and Triton implementations of every kernel contract.

The compiled ones call ``torch.ops.zsqfast_ext.<op>`` (CPU or CUDA dispatch key inside the extension);
the Triton ones call ``zsqfast.kernels.<op>``, imported on first use. Availability is decided per call by
:func:`zsqfast._backend.unavailable_reason`, so registering here never fails.
"""
from __future__ import annotations

import torch

from . import _triton
from ._backend import register_impl

CONTRACTS = ("fake_quant", "fake_quant_backward", "lsq_fake_quant", "lsq_fake_quant_backward", "bn_stats",
             "bn_stats_backward")


def _native(name: str):
    def impl(*args):
        return getattr(torch.ops.zsqfast_ext, name)(*args)

    return impl


def _triton_impl(name: str):
    def impl(*args):
        return getattr(_triton.kernels(), name)(*args)

    return impl


#: contracts with CUDA kernels in csrc/cuda (the others run Triton or the reference on a GPU)
CUDA_CONTRACTS = CONTRACTS[:4]

for _name in CONTRACTS:
    register_impl(_name, "cpp", _native(_name))
    register_impl(_name, "triton", _triton_impl(_name))
#: the low-pass filter's banded path (zsqfast/ops/lowpass.py): C++ and Triton kernels
register_impl("circular_conv_sep", "cpp", _native("circular_conv_sep"))
register_impl("circular_conv_sep", "triton", _triton_impl("circular_conv_sep"))
#: its wide-kernel path, the separable FFT filter (zsqfast/ops/fft_filter.py): C++ CPU kernel
register_impl("fft_filter_sep", "cpp", _native("fft_filter_sep"))
#: PSAQ-ViT's KDE (zsqfast/ops/kde_density.py): C++ CPU kernels
register_impl("kde_density", "cpp", _native("kde_density"))
register_impl("kde_density_backward", "cpp", _native("kde_density_backward"))
#: SynQ's fused CAM-alignment loss (zsqfast/ops/cam_mse.py): C++ CPU kernels (other devices: the reference)
register_impl("cam_mse", "cpp", _native("cam_mse"))
register_impl("cam_mse_backward", "cpp", _native("cam_mse_backward"))
for _name in CUDA_CONTRACTS:
    register_impl(_name, "cuda", _native(_name))
#: low-bit integer contracts with Triton and CUDA kernels (issue 3; the cpp ones are registered separately)
LOWBIT_GPU_CONTRACTS = ("lowbit_gemm", "lowbit_linear")
for _name in LOWBIT_GPU_CONTRACTS:
    register_impl(_name, "triton", _triton_impl(_name))
    register_impl(_name, "cuda", _native(_name))
register_impl("lowbit_conv2d", "triton", _triton_impl("lowbit_conv2d"))  # im2col + the grouped Triton GEMM


def _cuda_lowbit_conv2d(*args):
    """im2col + the grouped CUDA GEMM (zsqfast_ext::lowbit_conv2d); the reference where zero padding has no code."""
    from .ops.lowbit_conv2d import inexact_padding_reference

    y = inexact_padding_reference(*args)
    return torch.ops.zsqfast_ext.lowbit_conv2d(args[0].contiguous(), *args[1:]) if y is None else y


register_impl("lowbit_conv2d", "cuda", _cuda_lowbit_conv2d)

#: integer inference contracts (issue 3) with a C++ CPU kernel (csrc/cpu/lowbit_*.cpp)
CPP_LOWBIT_CONTRACTS = ("lowbit_gemm", "lowbit_linear", "lowbit_conv2d")
for _name in CPP_LOWBIT_CONTRACTS:
    register_impl(_name, "cpp", _native(_name))
