"""Low-bit integer GEMM and linear layer: unsigned activation codes x packed unsigned weight codes, int32.

Integer math (exact; the semantics every backend must reproduce bit for bit)::

    ua[m, k] = clamp(rne(x[m, k] * (1 / sa[m])) + za[m], 0, 2^ab - 1)      activation codes (as fake_quant)
    uw[n, k] in [0, 2^wb - 1]                                               weight codes (zsqfast.ops.lowbit_pack)
    acc[m, n] = sum_k ua[m, k] * uw[n, k]                                   int32           (op ``lowbit_gemm``)
    c[m, n]   = sum_k (ua - za[m]) (uw - zw[n])
              = acc - zw[n] * ra[m] - za[m] * cw[n] + K za[m] zw[n]         ra = sum_k ua, cw = sum_k uw (colsum)
    y[m, n]   = fp32(c) * fp32(sa[m] * sw[n]) + bias[n]                     fp32, in this order (``lowbit_linear``)

``sa, za`` are per tensor (shape (1,)) or per token (shape (M,)); ``sw, zw`` per output channel (N,).
``1 / sa`` is rounded once to fp32 as in :mod:`zsqfast.ops.fake_quantize`, so the codes are exactly those of
the fake-quant model's activation quantizer with the same parameters; ``fp32(c)`` is exact for
``|c| < 2^24`` and correctly rounded beyond. Overflow: ``acc`` is exact in int32 while
``K (2^ab - 1)(2^wb - 1) < 2^31``: K <= 9,544,371 at W4A4, 21,913,098 at W3A3, 33,025 at W8A8
(:func:`max_k`); ``c`` is formed in int64. NaN activations have no code: the public functions reject them
on CPU (the C++ kernel flags them in its quantization pass; other backends take one extra pass over ``x``);
+-Inf saturate to the ends of the grid.

Kernel contracts (what every non-reference backend implements; arguments already in this form)::

    lowbit_gemm(a, w_packed, w_bits, K) -> acc
        a uint8 (M, K) contiguous codes; w_packed uint8 packed (N, K_pad/2 or K_pad) contiguous;
        acc int32 (M, N) contiguous.
    lowbit_linear(x, w_packed, w_bits, K, w_scale, w_zero, w_colsum, a_scale, a_inv_scale, a_zero, a_bits,
                  bias) -> y
        x fp32 (M, K) contiguous; w_scale fp32 (N,); w_zero, w_colsum int32 (N,); a_scale, a_inv_scale fp32
        and a_zero int32 of shape (1,) or (M,); bias fp32 (N,) or None; y fp32 (M, N) contiguous.
"""
from __future__ import annotations

import torch

from .._backend import active_backend
from . import _common as C
from ._dispatch import define_op
from .lowbit_pack import packed_shape, unpack_lowbit


def max_k(a_bits: int, w_bits: int) -> int:
    """The largest K whose int32 accumulator ``sum_k ua * uw`` cannot overflow."""
    return (2**31 - 1) // (((1 << a_bits) - 1) * ((1 << w_bits) - 1))


def quantize_codes(x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, bits: int) -> torch.Tensor:
    """uint8 codes ``clamp(rne(x * (1 / scale)) + zero_point, 0, 2^bits - 1)`` in fp32 (``scale`` and
    ``zero_point`` broadcast against ``x``); identical to the codes of :func:`zsqfast.fake_quantize`."""
    xf = x.float()
    q = torch.round(xf * torch.reciprocal(scale.float())) + zero_point.float()
    return torch.clamp(q, 0, (1 << bits) - 1).to(torch.uint8)


def epilogue(c: torch.Tensor, a_scale: torch.Tensor, w_scale: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """``fp32(c) * fp32(sa * sw) + bias`` for an exact integer (int64 / float64) ``c`` of shape (M, N) or
    (B, N, ...) with ``a_scale`` / ``w_scale`` already broadcastable against it."""
    y = c.to(torch.float32) * (a_scale.float() * w_scale.float())
    return y if bias is None else y + bias.float()


# ---------------------------------------------------------------------------------------------- lowbit_gemm
def reference_gemm(a: torch.Tensor, w_packed: torch.Tensor, w_bits: int, K: int) -> torch.Tensor:
    """Pure-PyTorch semantics of ``zsqfast::lowbit_gemm``: ``sum_k a[m, k] * uw[n, k]`` as int32 (M, N).
    Exact: float64 products and sums of integers below 2^53."""
    uw = unpack_lowbit(w_packed, w_bits, K)
    return (a.to(torch.float64) @ uw.to(torch.float64).T).to(torch.int32)


def _fake_gemm(a, w_packed, w_bits, K):
    return a.new_empty((a.size(0), w_packed.size(0)), dtype=torch.int32)


def _adapter_gemm(impl, a, w_packed, w_bits, K):
    return impl(a.contiguous(), w_packed.contiguous(), w_bits, K)


lowbit_gemm = define_op("lowbit_gemm", "(Tensor a, Tensor w_packed, int w_bits, int K) -> Tensor",
                        reference_gemm, _fake_gemm, _adapter_gemm)


# -------------------------------------------------------------------------------------------- lowbit_linear
def reference_linear(x, w_packed, w_scale, w_zero, w_colsum, a_scale, a_zero, a_bits: int, w_bits: int, K: int,
                     bias=None):
    """Pure-PyTorch semantics of ``zsqfast::lowbit_linear`` for ``x`` (M, K): fp32 (M, N).

    ``w_colsum`` is not needed by this formulation (it subtracts the zero points before multiplying) and
    is only checked for shape; the fast paths use it."""
    sa = a_scale.float().reshape(-1, 1)
    za = a_zero.to(torch.float64).reshape(-1, 1)
    ua = quantize_codes(x, sa, za, a_bits)
    uw = unpack_lowbit(w_packed, w_bits, K).to(torch.float64)
    c = (ua.to(torch.float64) - za) @ (uw - w_zero.to(torch.float64).reshape(-1, 1)).T  # exact integers
    return epilogue(c, sa, w_scale.reshape(1, -1), bias)


def _fake_linear(x, w_packed, w_scale, w_zero, w_colsum, a_scale, a_zero, a_bits, w_bits, K, bias=None):
    return x.new_empty((x.size(0), w_packed.size(0)), dtype=torch.float32)


def _adapter_linear(impl, x, w_packed, w_scale, w_zero, w_colsum, a_scale, a_zero, a_bits, w_bits, K, bias=None):
    sa = a_scale.float().contiguous()
    return impl(x.float().contiguous(), w_packed.contiguous(), w_bits, K, w_scale.float().contiguous(),
                w_zero.to(torch.int32).contiguous(), w_colsum.to(torch.int32).contiguous(), sa,
                torch.reciprocal(sa), a_zero.to(torch.int32).contiguous(), a_bits,
                None if bias is None else bias.float().contiguous())


lowbit_linear_op = define_op(
    "lowbit_linear",
    "(Tensor x, Tensor w_packed, Tensor w_scale, Tensor w_zero, Tensor w_colsum, Tensor a_scale, Tensor a_zero, "
    "int a_bits, int w_bits, int K, Tensor? bias=None) -> Tensor",
    reference_linear, _fake_linear, _adapter_linear)


def check_weight(w_packed: torch.Tensor, w_scale, w_zero, w_colsum, w_bits: int, K: int) -> int:
    """Validate a packed weight and its per-channel tensors (``w_zero`` integer-valued); returns N."""
    C.check_bits(w_bits)
    if K < 1:
        raise ValueError(f"K={K}: the reduction length must be at least 1")
    if not isinstance(w_packed, torch.Tensor) or w_packed.dtype != torch.uint8 or w_packed.dim() != 2:
        raise TypeError("w_packed must be a 2-D uint8 tensor from zsqfast.pack_lowbit")
    N = w_packed.size(0)
    if tuple(w_packed.shape) != packed_shape(N, K, w_bits):
        raise ValueError(f"w_packed has shape {tuple(w_packed.shape)}, expected {packed_shape(N, K, w_bits)} "
                         f"for K={K} at {w_bits} bits")
    for name, t in (("w_scale", w_scale), ("w_zero", w_zero), ("w_colsum", w_colsum)):
        if not isinstance(t, torch.Tensor) or t.numel() != N:
            raise ValueError(f"{name} must be a tensor of {N} elements (one per output channel)")
        if t.device != w_packed.device:
            raise ValueError(f"{name} is on {t.device} but w_packed is on {w_packed.device}")
    C.check_zero_point(w_zero, "w_zero")
    return N


def check_k(K: int, a_bits: int, w_bits: int) -> None:
    if K > max_k(a_bits, w_bits):
        raise ValueError(f"K={K} could overflow the int32 accumulator at W{w_bits}A{a_bits} "
                         f"(largest safe K: {max_k(a_bits, w_bits)})")


def check_activation(x: torch.Tensor, a_bits: int, a_scale, a_zero, rows: int | None, op: str) -> None:
    """Validate a float activation and its grid (``a_scale`` positive and finite, ``a_zero`` integer-valued);
    ``rows`` is M when per-token parameters are allowed. NaN in a CPU ``x`` is rejected here unless the C++
    kernel runs ``op`` (it raises the same error itself)."""
    C.check_input(x)
    C.check_bits(a_bits)
    for name, t in (("a_scale", a_scale), ("a_zero", a_zero)):
        if not isinstance(t, torch.Tensor) or t.numel() not in ((1, rows) if rows else (1,)):
            raise ValueError(f"{name} must have 1 element (per tensor)" + (f" or {rows} (per token)" if rows else ""))
    C.check_scale(a_scale, "a_scale")
    C.check_zero_point(a_zero, "a_zero")
    if C.values_checkable(x) and active_backend("cpu", op) != "cpp" and bool(torch.isnan(x).any()):
        raise ValueError("x contains NaN: integer activations have no NaN code")


def lowbit_linear(x: torch.Tensor, w_packed: torch.Tensor, w_scale: torch.Tensor, w_zero: torch.Tensor,
                  w_colsum: torch.Tensor, a_scale: torch.Tensor, a_zero: torch.Tensor, a_bits: int, w_bits: int,
                  K: int, bias: torch.Tensor | None = None) -> torch.Tensor:
    """Integer linear layer: quantize ``x`` on the fly, integer GEMM (int32), fused dequantize + bias.

    Args:
        x: float (..., K) activations.
        w_packed: uint8 packed weight codes (N, ...) from :func:`zsqfast.pack_lowbit` of ``w_bits`` codes.
        w_scale, w_zero: (N,) per-output-channel scale and (integer-valued) zero point of the weight grid.
        w_colsum: (N,) int32 ``sum_k uw[n, k]`` (:func:`zsqfast.ops.lowbit_pack.LowbitWeight` holds it).
        a_scale, a_zero: activation grid, (1,) per tensor or (M,) per token (M = x.numel() // K): a positive
            finite scale and an integer-valued zero point (int or float dtype).
        a_bits, w_bits: 2..8. K: the reduction length, >= 1.
        bias: optional (N,).
    Raises:
        ValueError for a fractional zero point (the kernels take int32 zero points), a non-positive or
        non-finite ``a_scale`` (both read on the CPU only: a GPU read would be a host synchronisation),
        NaN in a CPU ``x``, and shape mismatches.
    Returns:
        fp32 tensor (..., N).
    """
    N = check_weight(w_packed, w_scale, w_zero, w_colsum, w_bits, K)
    C.check_input(x)
    if x.size(-1) != K:
        raise ValueError(f"x has {x.size(-1)} features in its last dimension, the weight expects K={K}")
    check_activation(x, a_bits, a_scale, a_zero, x.numel() // K, "lowbit_linear")
    check_k(K, a_bits, w_bits)
    if bias is not None and bias.numel() != N:
        raise ValueError(f"bias must have {N} elements")
    x2 = x.reshape(-1, K)
    y = lowbit_linear_op(x2, w_packed, w_scale.reshape(N), w_zero.reshape(N), w_colsum.reshape(N),
                         a_scale.reshape(-1), a_zero.reshape(-1), a_bits, w_bits, K,
                         None if bias is None else bias.reshape(N))
    return y.reshape(*x.shape[:-1], N)
