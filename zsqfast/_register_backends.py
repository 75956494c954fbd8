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
for _name in CUDA_CONTRACTS:
    register_impl(_name, "cuda", _native(_name))

#: integer inference contracts (issue 3) with a C++ CPU kernel (csrc/cpu/lowbit_*.cpp)
CPP_LOWBIT_CONTRACTS = ("lowbit_gemm", "lowbit_linear", "lowbit_conv2d")
for _name in CPP_LOWBIT_CONTRACTS:
    register_impl(_name, "cpp", _native(_name))
