"""Bit-dense storage of low-bit codes: the on-disk form of integer weights (:func:`zsqfast.save_integer_model`).

The kernel layout (:func:`zsqfast.pack_lowbit`) pads every row to ``K_pad = ceil(K / 128) * 128`` codes and
keeps 2- and 3-bit codes in nibbles, so a file holding it is up to 2x larger than the codes (K = 144 -> 256).
The dense form holds exactly ``bits`` bits per code and nothing else::

    codes u[n, k] (N, K), row-major, flattened to a stream c[i], i = n * K + k, i < N * K
    groups of 8 codes -> ``bits`` bytes: code 8 g + j occupies bits [bits * j, bits * j + bits) of the
    little-endian (8 * bits)-bit integer stored in bytes bits * g .. bits * g + bits - 1
    total: ceil(N * K * bits / 8) bytes (the last group is cut after its last used byte; unused bits are 0)

So 4 bits: byte i = c[2i] | c[2i+1] << 4; 3 bits: 8 codes in 3 bytes; 8 bits: the codes themselves. Both
directions are a handful of whole-tensor integer ops (shifts and a sum over a length-8 axis; the bit fields
are disjoint, so the sum is their OR), no Python loop over codes; the group words are int32 (3 bits: 24-bit words) or int64 (5..7 bits: at most 56 bits).
2, 4 and 8 bits (whole codes per byte) take a uint8 shortcut giving the same bytes.
"""
from __future__ import annotations

import torch

from . import _common as C


def dense_nbytes(numel: int, bits: int) -> int:
    """Bytes of the dense form of ``numel`` codes of ``bits`` bits: ``ceil(numel * bits / 8)``."""
    C.check_bits(bits)
    return -(-numel * bits // 8)


def _word_dtype(bits: int) -> torch.dtype:
    """Signed integer type holding an (8 * bits)-bit group word: int32 up to 24 bits, else int64."""
    return torch.int32 if 8 * bits < 32 else torch.int64


def pack_dense(q: torch.Tensor, bits: int) -> torch.Tensor:
    """Dense form of the codes ``q`` (any shape, integer, values in ``[0, 2^bits - 1]``): uint8 1-D tensor of
    :func:`dense_nbytes` ``(q.numel(), bits)`` bytes, on ``q``'s device. Raises ValueError for codes out of
    range, TypeError for a non-integer tensor."""
    C.check_bits(bits)
    if not isinstance(q, torch.Tensor) or q.is_floating_point() or q.is_complex() or q.dtype == torch.bool:
        raise TypeError(f"pack_dense takes an integer tensor of codes, got {getattr(q, 'dtype', type(q))}")
    flat = q.reshape(-1)
    n = flat.numel()
    if n and (int(flat.min()) < 0 or int(flat.max()) > (1 << bits) - 1):
        raise ValueError(f"codes must lie in [0, {(1 << bits) - 1}] for {bits} bits")
    if 8 % bits == 0:  # 2, 4, 8 bits: whole codes per byte, byte i = sum_j c[per i + j] << (bits j)
        per = 8 // bits
        c = torch.zeros(-(-n // per) * per, dtype=torch.uint8, device=q.device)
        c[:n] = flat
        c = c.view(-1, per)
        out = c[:, 0].clone()
        for j in range(1, per):  # over the <= 4 fields of a byte, not over codes
            out |= c[:, j] << (bits * j)
        return out
    groups = -(-n // 8)
    c = torch.zeros(groups * 8, dtype=_word_dtype(bits), device=q.device)
    c[:n] = flat
    word = (c.view(groups, 8) << (torch.arange(8, device=q.device) * bits)).sum(1)  # disjoint fields: sum = OR
    out = (word.unsqueeze(1) >> (torch.arange(bits, device=q.device) * 8)) & 0xFF  # (groups, bits) bytes
    return out.to(torch.uint8).reshape(-1)[:dense_nbytes(n, bits)].clone()


def unpack_dense(data: torch.Tensor, bits: int, shape) -> torch.Tensor:
    """Inverse of :func:`pack_dense`: uint8 codes of ``shape`` (e.g. ``(N, K)``) from the dense bytes ``data``.

    Raises ValueError when ``data`` is not a 1-D uint8 tensor of exactly ``dense_nbytes(prod(shape), bits)``
    bytes or its unused trailing bits are not 0 (a truncated or corrupted stream)."""
    C.check_bits(bits)
    shape = tuple(int(s) for s in shape)
    n = 1
    for s in shape:
        n *= s
    nbytes = dense_nbytes(n, bits)
    if not isinstance(data, torch.Tensor) or data.dtype != torch.uint8 or data.dim() != 1 or data.numel() != nbytes:
        got = f"{data.dtype} of shape {tuple(data.shape)}" if isinstance(data, torch.Tensor) else type(data).__name__
        raise ValueError(f"dense {bits}-bit codes of shape {shape} take {nbytes} uint8 bytes (1-D), got {got}")
    if 8 % bits == 0:
        shifts = torch.arange(0, 8, bits, dtype=torch.uint8, device=data.device)
        codes = ((data.unsqueeze(1) >> shifts) & ((1 << bits) - 1)).reshape(-1)
    else:
        groups = -(-n // 8)
        b = torch.zeros(groups * bits, dtype=_word_dtype(bits), device=data.device)
        b[:nbytes] = data
        word = (b.view(groups, bits) << (torch.arange(bits, device=data.device) * 8)).sum(1)
        codes = ((word.unsqueeze(1) >> (torch.arange(8, device=data.device) * bits)) & ((1 << bits) - 1)).reshape(-1)
    if n < codes.numel() and bool(codes[n:].any()):
        raise ValueError(f"dense {bits}-bit codes of shape {shape}: non-zero padding bits (corrupted data)")
    return codes[:n].to(torch.uint8).reshape(shape)
