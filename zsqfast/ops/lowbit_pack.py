"""Packed storage of low-bit integer codes (weights of the integer W4A4 / W3A3 layers).

A weight matrix of ``N`` rows (output channels) and ``K`` columns (the reduction: ``in_features``, or
``C/groups * kh * kw`` for a convolution in PyTorch's ``(c, i, j)`` order) is stored as unsigned codes
``u[n, k] in [0, 2^bits - 1]`` (the real value is ``scale[n] * (u - zero_point[n])``), row by row, each row
padded with code 0 to ``K_pad = ceil(K / 128) * 128`` columns.

Layout (``bits <= 4``: two codes a byte; ``bits >= 5``: one code a byte)::

    bits <= 4: packed uint8 (N, K_pad // 2). Column block b (codes 128 b .. 128 b + 127) lives in bytes
               64 b .. 64 b + 63 of the row; byte 64 b + j holds code 128 b + j in its LOW nibble and code
               128 b + 64 + j in its HIGH nibble ("half-block" order, as llama.cpp's Q4_0 with block 128).
    bits >= 5: packed uint8 (N, K_pad), byte k = code k.

Why this order: unpacking 64 consecutive bytes is one AND (``b & 0x0F``: codes 128b .. 128b+63, in order)
and one shift (``b >> 4``: codes 128b+64 .. 128b+127, in order), so a SIMD register or a Triton tile of
unpacked codes always holds consecutive K, for any register width dividing 64 bytes (AVX2 takes 32-byte
halves: codes j .. j+31 and 64+j .. 64+j+31). 3-bit and 2-bit codes also use nibbles: a denser layout saves
memory but costs a bit-field gather per code, and the GEMMs here are compute- or activation-bound at M >= 16.
Padding codes are 0, and the activation codes of the padded columns are 0 too, so padding adds nothing to
any accumulator (see :mod:`zsqfast.ops.lowbit_gemm`).
"""
from __future__ import annotations

import torch

from . import _common as C

#: the K granule of the packed layout (codes per column block)
BLOCK_K = 128


def padded_k(K: int) -> int:
    """``K`` rounded up to a multiple of :data:`BLOCK_K`."""
    return -(-K // BLOCK_K) * BLOCK_K


def packed_shape(N: int, K: int, bits: int) -> tuple[int, int]:
    """Shape of :func:`pack_lowbit`'s output for an ``(N, K)`` code matrix."""
    C.check_bits(bits)
    kp = padded_k(K)
    return (N, kp // 2) if bits <= 4 else (N, kp)


def pack_lowbit(q: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack unsigned integer codes ``q`` (N, K), values in ``[0, 2^bits - 1]``, into the layout above.

    Args:
        q: integer tensor (any integer dtype) of shape (N, K), or (N, ...) which is flattened to (N, K)
           (a conv weight (OC, C/g, kh, kw) gives K = C/g * kh * kw in PyTorch's order).
        bits: 2..8.
    Returns:
        uint8 tensor of :func:`packed_shape` on ``q``'s device.
    Raises:
        TypeError for a non-integer ``q``; ValueError for codes outside the range.
    """
    C.check_bits(bits)
    if not isinstance(q, torch.Tensor) or q.is_floating_point() or q.is_complex() or q.dtype == torch.bool:
        raise TypeError(f"pack_lowbit takes an integer tensor of codes, got {getattr(q, 'dtype', type(q))}")
    if q.dim() < 2 or q.numel() == 0:
        raise ValueError(f"pack_lowbit takes a non-empty (N, K) code matrix, got shape {tuple(q.shape)}")
    q = q.reshape(q.size(0), -1)
    lo, hi = int(q.min()), int(q.max())
    if lo < 0 or hi > (1 << bits) - 1:
        raise ValueError(f"codes must lie in [0, {(1 << bits) - 1}] for {bits} bits, got [{lo}, {hi}]")
    N, K = q.shape
    kp = padded_k(K)
    u = torch.zeros(N, kp, dtype=torch.uint8, device=q.device)
    u[:, :K] = q.to(torch.uint8)
    if bits >= 5:
        return u
    blocks = u.view(N, kp // BLOCK_K, 2, BLOCK_K // 2)  # [..., 0, j] = code 128b + j; [..., 1, j] = 128b + 64 + j
    return (blocks[:, :, 0] | (blocks[:, :, 1] << 4)).reshape(N, kp // 2)


def unpack_lowbit(packed: torch.Tensor, bits: int, K: int) -> torch.Tensor:
    """Inverse of :func:`pack_lowbit`: uint8 codes of shape (N, K)."""
    C.check_bits(bits)
    if packed.dtype != torch.uint8 or packed.dim() != 2:
        raise TypeError(f"packed must be a 2-D uint8 tensor, got {packed.dtype} of shape {tuple(packed.shape)}")
    N = packed.size(0)
    if tuple(packed.shape) != packed_shape(N, K, bits):
        raise ValueError(f"packed has shape {tuple(packed.shape)}, expected {packed_shape(N, K, bits)} for "
                         f"K={K} at {bits} bits")
    if bits >= 5:
        return packed[:, :K].contiguous()
    kp = padded_k(K)
    b = packed.reshape(N, kp // BLOCK_K, 1, BLOCK_K // 2)
    u = torch.cat([b & 0x0F, b >> 4], dim=2).reshape(N, kp)
    return u[:, :K].contiguous()


class LowbitWeight:
    """A weight matrix in integer form: packed codes plus what the integer kernels need.

    Attributes:
        packed: uint8 packed codes (:func:`pack_lowbit`), (N, K_pad / 2) or (N, K_pad).
        scale: fp32 (N,); zero_point: int32 (N,): the real weight is ``scale[n] * (u[n, k] - zero_point[n])``.
        colsum: int32 (N,) ``sum_k u[n, k]`` (the zero-point correction of the activations).
        bits, K: code width and the reduction length (columns before padding).
    """

    def __init__(self, packed: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, bits: int, K: int,
                 colsum: torch.Tensor | None = None):
        self.packed, self.bits, self.K = packed, bits, K
        self.scale = scale.float().reshape(-1).contiguous()
        self.zero_point = zero_point.round().to(torch.int32).reshape(-1).contiguous()
        if colsum is None:
            colsum = unpack_lowbit(packed, bits, K).sum(1, dtype=torch.int32)
        self.colsum = colsum.to(torch.int32).reshape(-1).contiguous()

    @classmethod
    def from_float(cls, w: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, bits: int) -> "LowbitWeight":
        """Codes of a float weight (N, ...) on the per-output-channel grid ``(scale, zero_point)`` (N,), exactly
        as :func:`zsqfast.fake_quantize` with ``axis=0`` rounds them."""
        N = w.size(0)
        w2 = w.detach().reshape(N, -1).float()
        q = torch.round(w2 * torch.reciprocal(scale.float().reshape(N, 1))) + zero_point.float().reshape(N, 1)
        q = torch.clamp(q, 0, (1 << bits) - 1).to(torch.uint8)
        return cls(pack_lowbit(q, bits), scale, zero_point, bits, w2.size(1))

    def dequantize(self) -> torch.Tensor:
        """fp32 (N, K): ``scale * (u - zero_point)``."""
        u = unpack_lowbit(self.packed, self.bits, self.K).float()
        return (u - self.zero_point.float().reshape(-1, 1)) * self.scale.reshape(-1, 1)
