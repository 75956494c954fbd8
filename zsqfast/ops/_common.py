"""Argument checks and small tensor helpers shared by the quantization ops."""
from __future__ import annotations

import math
import numbers

import torch

#: dtypes the compiled and Triton kernels take; others (float64) run the reference.
KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
FLOAT_DTYPES = KERNEL_DTYPES + (torch.float64,)


def check_bits(bits: int) -> int:
    """``bits`` as an int: any integral number (``int``, a NumPy integer) in 2..8; bools are rejected."""
    if isinstance(bits, bool) or not isinstance(bits, numbers.Integral) or not 2 <= bits <= 8:
        raise ValueError(f"bits must be an integer in 2..8, got {bits!r}")
    return int(bits)


def qrange(bits: int, signed: bool) -> tuple[int, int]:
    """Integer grid ``[qmin, qmax]``: ``[-2^(b-1), 2^(b-1)-1]`` when signed, else ``[0, 2^b-1]``."""
    bits = check_bits(bits)
    return (-(1 << (bits - 1)), (1 << (bits - 1)) - 1) if signed else (0, (1 << bits) - 1)


def check_input(x: torch.Tensor, name: str = "x") -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be float32, float16, bfloat16 or float64, got {x.dtype}")


def values_checkable(t: torch.Tensor) -> bool:
    """Whether a check may read ``t``'s values: on the CPU outside ``torch.compile``. On a GPU the read would
    be a host synchronisation, so value checks (:func:`check_scale`, :func:`check_zero_point`, NaN checks)
    are skipped there."""
    return t.device.type == "cpu" and not torch.compiler.is_compiling()


def check_scale(s: torch.Tensor, name: str = "scale") -> None:
    """ValueError unless every element of ``s`` is positive and finite (when :func:`values_checkable`)."""
    if values_checkable(s) and not bool(((s > 0) & (s < math.inf)).all()):
        raise ValueError(f"{name} must be positive and finite")  # (NaN fails s > 0)


def check_zero_point(zp: torch.Tensor, name: str = "zero_point") -> None:
    """ValueError unless ``zp`` holds integer values: integer dtypes always do; a float tensor is read (when
    :func:`values_checkable`) and must have no fractional part (NaN / Inf have none of their own: rejected).
    The integer kernels take zero points as int32, so a fractional one would be truncated there but used as
    is by the float reference."""
    if zp.is_floating_point() and values_checkable(zp) and not bool((torch.frac(zp) == 0).all()):
        raise ValueError(f"{name} must hold integer values (a grid offset in codes), got a fractional or "
                         "non-finite value")


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    """fp32 arithmetic for every kernel dtype; float64 inputs keep float64 (reference only)."""
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def channel_param(p, x: torch.Tensor, axis: int | None, name: str, default: float | None = None) -> torch.Tensor:
    """A scale / zero point as a 1-D tensor in ``x``'s compute dtype on ``x``'s device: ``(1,)`` per
    tensor, ``(x.size(axis),)`` per channel (a single value is shared by every channel)."""
    want = 1 if axis is None else x.size(axis)
    ct = compute_dtype(x)
    if isinstance(p, torch.Tensor) and p.dtype == ct and p.dim() == 1 and p.numel() == want and p.device == x.device:
        return p  # already in kernel form: the common case of layers and observers
    if p is None:
        if default is None:
            raise ValueError(f"{name} is required")
        p = default
    p = torch.as_tensor(p, device=x.device)
    if p.device != x.device:
        raise ValueError(f"{name} is on {p.device} but x is on {x.device}")
    if not (p.is_floating_point() or p.dtype in (torch.int8, torch.uint8, torch.int16, torch.int32, torch.int64)):
        raise TypeError(f"{name} must be a real tensor, got {p.dtype}")
    if p.numel() == 1 and want != 1:  # one value shared by every channel
        p = p.reshape(1).expand(want)
    if p.numel() != want:
        where = "per tensor" if axis is None else f"per channel along axis {axis} (size {want})"
        raise ValueError(f"{name} has {p.numel()} elements, expected {want} for quantization {where}")
    return p.reshape(want).to(ct)


def broadcast_shape(x: torch.Tensor, axis: int | None) -> list[int]:
    """Shape that broadcasts a ``(C,)`` parameter along ``axis`` of ``x`` (all ones per tensor)."""
    shape = [1] * x.dim()
    if axis is not None:
        shape[axis] = -1
    return shape


def memory_flat(t: torch.Tensor) -> torch.Tensor:
    """A 1-D view of a dense tensor in memory order (element i = i-th element in storage)."""
    perm = sorted(range(t.dim()), key=lambda d: (-t.stride(d), -t.size(d)))
    return t.permute(perm).reshape(-1)


def pack_bits(flags: torch.Tensor) -> torch.Tensor:
    """Pack a 1-D bool tensor into uint8, LSB first (bit i&7 of byte i>>3); padding bits are 0."""
    n = flags.numel()
    padded = torch.zeros(((n + 7) // 8) * 8, dtype=torch.uint8, device=flags.device)
    padded[:n] = flags.to(torch.uint8)
    weights = (1 << torch.arange(8, device=flags.device, dtype=torch.int32)).to(torch.uint8)
    return (padded.view(-1, 8) * weights).sum(-1, dtype=torch.int32).to(torch.uint8)


def unpack_bits(mask: torch.Tensor, n: int) -> torch.Tensor:
    """Inverse of :func:`pack_bits`: the first ``n`` flags as a bool tensor."""
    shifts = torch.arange(8, device=mask.device, dtype=torch.uint8)
    return ((mask.view(-1, 1) >> shifts) & 1).reshape(-1)[:n].bool()


def empty_strided_like(t: torch.Tensor, stride: tuple[int, ...]) -> torch.Tensor:
    """``t`` laid out with ``stride`` (copies only when the strides differ)."""
    if tuple(t.stride()) == tuple(stride) or t.numel() <= 1:
        return t
    out = torch.empty_strided(t.shape, stride, dtype=t.dtype, device=t.device)
    out.copy_(t)
    return out
