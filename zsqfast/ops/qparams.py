"""Min/max quantization parameters, as the ZeroQ lineage (ZeroQ, GDFQ, Qimera, IntraQ, HAST, SynQ) computes them.

Asymmetric (their ``AsymmetricQuantFunction``): with ``n = 2^b - 1`` and ``range = max(max - min, 1e-8)``::

    scale = range / n,   zero_point = -round(min * n / range)

so that :func:`zsqfast.fake_quantize` maps ``x`` to ``scale * clamp(round(x / scale), z0, z0 + n)``,
``z0 = round(min / scale)``: their grid. Their code stores ``zp' = round(s min) + 2^(b-1)`` and a signed
``q' = q - 2^(b-1)``; ours is the same grid written with an unsigned ``q`` (PyTorch's convention). The one
deliberate difference: the kernel multiplies by ``1 / scale`` rounded once to fp32 where theirs multiplies
by ``n / range``; the two may differ in the last bit, which can only move a value lying within one ulp of
a rounding tie. Like theirs, the range does not have to contain 0.

Symmetric: ``scale = max(|min|, |max|, 1e-8) / (2^(b-1) - 1)``, ``zero_point = 0``.
"""
from __future__ import annotations

import torch

from . import _common as C
from ._layout import normalize_axis


def minmax_qparams(x: torch.Tensor, bits: int, axis: int | None = None, symmetric: bool = False,
                   eps: float = 1e-8) -> tuple[torch.Tensor, torch.Tensor]:
    """``(scale, zero_point)`` from the min and max of ``x`` (per tensor, or per channel along ``axis``).

    Args:
        x: float tensor. Non-finite values are rejected on CPU (a check that would cost a host sync on a
            GPU is skipped there: NaN/Inf then give non-finite parameters).
        bits: 2..8.
    Returns:
        fp32 tensors of shape ``(1,)`` per tensor or ``(x.size(axis),)`` per channel; ``zero_point`` holds
        integer values (fp32, so it can be learned or exported as is).
    """
    C.check_input(x)
    C.check_bits(bits)
    if x.numel() == 0:
        raise ValueError("minmax_qparams needs a non-empty tensor")
    axis = normalize_axis(x, axis)
    xf = x.detach().float()
    if axis is None:
        mn, mx = torch.aminmax(xf.reshape(1, -1), dim=1)
    else:
        mn, mx = torch.aminmax(xf.movedim(axis, 0).reshape(x.size(axis), -1), dim=1)
    if C.values_checkable(xf):
        if not bool(torch.isfinite(mn).all() & torch.isfinite(mx).all()):
            raise ValueError("minmax_qparams: x contains NaN or Inf")
    return qparams_from_range(mn, mx, bits, symmetric, eps)


def qparams_from_range(mn: torch.Tensor, mx: torch.Tensor, bits: int, symmetric: bool = False,
                       eps: float = 1e-8) -> tuple[torch.Tensor, torch.Tensor]:
    """``(scale, zero_point)`` for a given range (tensors of equal shape), by the formulas above; no checks,
    no host synchronisation (what an activation observer calls every step)."""
    if symmetric:
        scale = torch.clamp(torch.maximum(mn.abs(), mx.abs()), min=eps) / ((1 << (bits - 1)) - 1)
        return scale, torch.zeros_like(scale)
    n = (1 << bits) - 1
    rng = torch.clamp(mx - mn, min=eps)
    return rng / n, -torch.round(mn * (n / rng))
