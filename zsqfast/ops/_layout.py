"""Memory-layout helpers shared by every op and backend.

Kernels of every backend walk a tensor in *memory order* (a flat loop over its storage), so a dense
tensor in any dimension order (contiguous, channels-last, transposed) is processed without a copy.
For a per-channel op along ``axis`` the channel of the element at memory offset ``o`` is

    c(o) = (o // inner) % C,   inner = x.stride(axis),   C = x.size(axis),

which holds for every non-overlapping dense layout. Per-tensor ops use ``inner = 1, C = 1``.
"""
from __future__ import annotations

import torch


def is_dense(x: torch.Tensor) -> bool:
    """True when ``x`` covers a contiguous block of memory in some dimension order (no gaps, no overlap)."""
    dims = sorted((s, n) for s, n in zip(x.stride(), x.shape) if n != 1)
    expected = 1
    for stride, size in dims:
        if stride != expected:
            return False
        expected *= size
    return True


def dense(x: torch.Tensor) -> torch.Tensor:
    """``x`` itself when dense, else a contiguous copy."""
    return x if is_dense(x) else x.contiguous()


def channel_geometry(x: torch.Tensor, axis: int | None) -> tuple[int, int]:
    """``(inner, C)`` such that the element at memory offset o belongs to channel (o // inner) % C."""
    if axis is None:
        return 1, 1
    c = x.size(axis)
    return (x.stride(axis) if c > 1 else 1), c


def normalize_axis(x: torch.Tensor, axis: int | None) -> int | None:
    if axis is None:
        return None
    if not -x.dim() <= axis < x.dim():
        raise ValueError(f"axis {axis} is out of range for a tensor with {x.dim()} dimensions")
    return axis % x.dim()


def mask_bytes(numel: int) -> int:
    """Bytes of the packed STE mask: one bit per element, LSB first (bit i&7 of byte i>>3)."""
    return (numel + 7) // 8
