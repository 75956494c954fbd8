"""Fake quantization (quantize-dequantize) with a straight-through estimator.

Semantics (defined by :func:`reference`, in fp32 for fp32/fp16/bf16 inputs, fp64 for fp64)::

    v   = x * (1 / scale)                 # reciprocal rounded once to the compute dtype, as torch's own op
    q   = round_half_even(v) + zero_point
    out = (clamp(q, qmin, qmax) - zero_point) * scale

per tensor (``scale``, ``zero_point`` of shape (1,)) or per channel along ``axis`` (shape (C,)). With the
ZeroQ-lineage parameters of :func:`zsqfast.minmax_qparams` this is their grid
``D * clamp(round(x / D), z0, z0 + 2^b - 1)``. Gradient (STE): ``ste="identity"`` passes ``dL/dout`` to
``x`` unchanged (GDFQ / HAST / SynQ); ``ste="clipped"`` zeroes it where ``q`` fell outside
``[qmin, qmax]``. ``scale`` and ``zero_point`` receive no gradient (use LSQ for a learned step).

Non-finite inputs: NaN stays NaN (its clipped gradient is 0); +-Inf saturate to the ends of the grid
(gradient 0 when clipped).

Kernel contract (what every non-reference backend implements; see :mod:`zsqfast.ops._layout`)::

    fake_quant(x, scale, inv_scale, zero_point, qmin, qmax, inner, C, need_mask) -> (out, mask)
    fake_quant_backward(grad, mask) -> grad_x

``x`` is dense (any dimension order) in fp32/fp16/bf16 and is walked in memory order; ``out`` has ``x``'s
strides. ``scale``, ``inv_scale``, ``zero_point`` are contiguous fp32 ``(C,)``; the element at memory
offset o uses channel ``(o // inner) % C``. ``mask`` is uint8 ``(ceil(numel / 8),)``, bit ``o & 7`` of byte
``o >> 3`` set when element o was inside the grid (padding bits 0), or an empty ``(0,)`` tensor when
``need_mask`` is false. ``grad`` has the forward input's memory layout; ``grad_x`` has ``grad``'s strides.
"""
from __future__ import annotations

import torch

from . import _common as C
from ._dispatch import define_op
from ._layout import channel_geometry, dense, mask_bytes, normalize_axis


def reference(x, scale, zero_point, qmin: int, qmax: int, axis, need_mask: bool):
    """Pure-PyTorch semantics of ``zsqfast::fake_quant``. Returns ``(out, mask)``."""
    xd = dense(x)
    shape = C.broadcast_shape(xd, axis)
    ct = C.compute_dtype(xd)
    s = scale.to(ct).reshape(shape)
    zp = zero_point.to(ct).reshape(shape)
    q = torch.round(xd.to(ct) * torch.reciprocal(s)) + zp
    out = ((torch.clamp(q, qmin, qmax) - zp) * s).to(xd.dtype)
    out = C.empty_strided_like(out, xd.stride())
    if not need_mask:
        return out, xd.new_empty((0,), dtype=torch.uint8)
    inside = (q >= qmin) & (q <= qmax)
    return out, C.pack_bits(C.memory_flat(C.empty_strided_like(inside, xd.stride())))


def reference_backward(grad, mask):
    """Pure-PyTorch semantics of ``zsqfast::fake_quant_backward``: ``grad * bit(mask)``."""
    gd = dense(grad)
    keep = C.unpack_bits(mask, gd.numel())
    out = torch.empty_like(gd)
    C.memory_flat(out).copy_(torch.where(keep, C.memory_flat(gd), torch.zeros((), dtype=gd.dtype)))
    return out


def _fake(x, scale, zero_point, qmin, qmax, axis, need_mask):
    xd = dense(x)
    return torch.empty_like(xd), xd.new_empty((mask_bytes(xd.numel()) if need_mask else 0,), dtype=torch.uint8)


def _fake_backward(grad, mask):
    return torch.empty_like(dense(grad))


def _adapter(impl, x, scale, zero_point, qmin, qmax, axis, need_mask):
    if x.dtype not in C.KERNEL_DTYPES:
        return reference(x, scale, zero_point, qmin, qmax, axis, need_mask)
    xd = dense(x)
    inner, nch = channel_geometry(xd, axis)
    s = scale.float().contiguous()
    return impl(xd, s, torch.reciprocal(s), zero_point.float().contiguous(), qmin, qmax, inner, nch, need_mask)


def _adapter_backward(impl, grad, mask):
    if grad.dtype not in C.KERNEL_DTYPES:
        return reference_backward(grad, mask)
    return impl(dense(grad), mask)


fake_quant = define_op(
    "fake_quant",
    "(Tensor x, Tensor scale, Tensor zero_point, int qmin, int qmax, int? axis, bool need_mask) -> (Tensor, Tensor)",
    reference, _fake, _adapter)
fake_quant_backward = define_op(
    "fake_quant_backward", "(Tensor grad, Tensor mask) -> Tensor",
    reference_backward, _fake_backward, _adapter_backward)


def _setup_context(ctx, inputs, output):
    out, mask = output
    ctx.need_mask = inputs[-1]
    ctx.stride = out.stride()
    ctx.save_for_backward(mask)
    ctx.mark_non_differentiable(mask)


def _backward(ctx, grad_out, _grad_mask):
    if not ctx.need_mask:  # identity STE: d out / d x := 1
        return grad_out, None, None, None, None, None, None
    (mask,) = ctx.saved_tensors
    grad = fake_quant_backward(C.empty_strided_like(grad_out, ctx.stride), mask)
    return grad, None, None, None, None, None, None


torch.library.register_autograd("zsqfast::fake_quant", _backward, setup_context=_setup_context, lib=None)


def fake_quantize(x: torch.Tensor, scale, zero_point=None, bits: int = 8, axis: int | None = None,
                  ste: str = "identity", symmetric: bool = False) -> torch.Tensor:
    """Quantize-dequantize ``x`` on a ``bits``-bit uniform grid, with a straight-through gradient.

    Args:
        x: float32 / float16 / bfloat16 / float64 tensor of any shape and layout (fp64 runs the reference).
        scale: step size, a positive float or tensor: ``()`` / ``(1,)`` per tensor, ``(x.size(axis),)``
            per channel.
        zero_point: integer-valued offset, same shape as ``scale`` (int or float dtype; a float one with a
            fractional part is a ValueError). Asymmetric grid: ``q in [0, 2^bits - 1]``. ``None`` means 0.
        bits: 2..8 (any integral number).
        axis: ``None`` per tensor, else the channel dimension.
        ste: ``"identity"`` (gradient passes unchanged) or ``"clipped"`` (zero where clamped).
        symmetric: signed grid ``q in [-2^(bits-1), 2^(bits-1) - 1]``; ``zero_point`` must be ``None`` or 0.

    Returns:
        Tensor of ``x``'s shape and dtype (``x``'s strides when ``x`` is dense, else contiguous).

    The values of ``scale`` and ``zero_point`` are checked on the CPU only (on a GPU the read would be a host
    synchronisation).
    """
    C.check_input(x)
    if ste not in ("identity", "clipped"):
        raise ValueError(f"ste must be 'identity' or 'clipped', got {ste!r}")
    axis = normalize_axis(x, axis)
    qmin, qmax = C.qrange(bits, symmetric)
    s = C.channel_param(scale, x, axis, "scale")
    zp = C.channel_param(zero_point, x, axis, "zero_point", default=0.0)
    if symmetric and zero_point is not None and not torch.compiler.is_compiling() and bool((zp != 0).any()):
        raise ValueError("symmetric fake quantization takes no zero point (pass None or 0)")
    C.check_scale(s)
    if zero_point is not None:
        C.check_zero_point(zp)
    out, _ = fake_quant(x, s, zp, qmin, qmax, axis, ste == "clipped")
    return out
