"""LSQ: fake quantization with a learned step size (Esser et al., ICLR 2020), as GenQ's QAT uses it.

Forward (fp32 arithmetic; ``v = x * (1 / step)`` with the reciprocal rounded once)::

    out = clamp(round_half_even(v), qmin, qmax) * step

Backward, with ``outside = v < qmin or v > qmax`` (so the grid ends count as inside, as in
``torch.clamp``'s gradient, and a NaN ``v`` is inside)::

    dL/dx       = 0 if outside else dL/dout
    dL/dstep[c] = grad_scale * sum_{i in c} dL/dout_i * (round(v_i) - v_i   if not outside
                                                          qmin             if v_i < qmin
                                                          qmax             if v_i > qmax)

which is the autograd of ``round_ste(clamp(x / step, qmin, qmax)) * step`` times ``grad_scale`` (LSQ's
``g = 1 / sqrt(N_c * qmax)`` by default, ``N_c`` the elements per step). Fast backends compute the step
gradient from in-kernel partial sums: no per-element temporaries, no host synchronisation. NaN inputs
propagate to the output and to the step gradient.

Kernel contract (layout rules as in :mod:`zsqfast.ops.fake_quantize`)::

    lsq_fake_quant(x, step, inv_step, qmin, qmax, inner, C) -> out
    lsq_fake_quant_backward(grad, x, step, inv_step, qmin, qmax, inner, C, grad_scale) -> (grad_x, grad_step)

``grad`` has ``x``'s strides; ``grad_step`` is fp32 ``(C,)``.
"""
from __future__ import annotations

import math

import torch

from . import _common as C
from ._dispatch import define_op
from ._layout import channel_geometry, dense, normalize_axis


def _views(x, step, axis):
    xd = dense(x)
    shape = C.broadcast_shape(xd, axis)
    ct = C.compute_dtype(xd)
    s = step.to(ct).reshape(shape)
    return xd, s, xd.to(ct) * torch.reciprocal(s)


def reference(x, step, qmin: int, qmax: int, axis, grad_scale: float):
    """Pure-PyTorch semantics of ``zsqfast::lsq_fake_quant``."""
    xd, s, v = _views(x, step, axis)
    return C.empty_strided_like((torch.clamp(torch.round(v), qmin, qmax) * s).to(xd.dtype), xd.stride())


def reference_backward(grad, x, step, qmin: int, qmax: int, axis, grad_scale: float):
    """Pure-PyTorch semantics of ``zsqfast::lsq_fake_quant_backward``: ``(grad_x, grad_step)``."""
    xd, s, v = _views(x, step, axis)
    g = dense(grad).to(v.dtype)
    below, above = v < qmin, v > qmax
    dstep = torch.where(below, float(qmin), torch.where(above, float(qmax), torch.round(v) - v))
    dims = [d for d in range(xd.dim()) if d != axis]
    gs = (g * dstep).sum(dim=dims) if dims else g * dstep
    grad_x = C.empty_strided_like(torch.where(below | above, 0.0, g).to(grad.dtype), xd.stride())
    return grad_x, (gs.reshape(-1) * grad_scale).to(step.dtype)


def _fake(x, step, qmin, qmax, axis, grad_scale):
    return torch.empty_like(dense(x))


def _fake_backward(grad, x, step, qmin, qmax, axis, grad_scale):
    return torch.empty_like(dense(x)), torch.empty_like(step)


def _contract(x, step, axis):
    xd = dense(x)
    inner, nch = channel_geometry(xd, axis)
    s = step.float().contiguous()
    return xd, s, torch.reciprocal(s), inner, nch


def _adapter(impl, x, step, qmin, qmax, axis, grad_scale):
    if x.dtype not in C.KERNEL_DTYPES:
        return reference(x, step, qmin, qmax, axis, grad_scale)
    xd, s, inv, inner, nch = _contract(x, step, axis)
    return impl(xd, s, inv, qmin, qmax, inner, nch)


def _adapter_backward(impl, grad, x, step, qmin, qmax, axis, grad_scale):
    if x.dtype not in C.KERNEL_DTYPES:
        return reference_backward(grad, x, step, qmin, qmax, axis, grad_scale)
    xd, s, inv, inner, nch = _contract(x, step, axis)
    gx, gs = impl(C.empty_strided_like(grad, xd.stride()), xd, s, inv, qmin, qmax, inner, nch, grad_scale)
    return gx, gs.to(step.dtype)


lsq_fake_quant = define_op(
    "lsq_fake_quant", "(Tensor x, Tensor step, int qmin, int qmax, int? axis, float grad_scale) -> Tensor",
    reference, _fake, _adapter)
lsq_fake_quant_backward = define_op(
    "lsq_fake_quant_backward",
    "(Tensor grad, Tensor x, Tensor step, int qmin, int qmax, int? axis, float grad_scale) -> (Tensor, Tensor)",
    reference_backward, _fake_backward, _adapter_backward)


def _setup_context(ctx, inputs, output):
    x, step, qmin, qmax, axis, grad_scale = inputs
    ctx.args = (qmin, qmax, axis, grad_scale)
    ctx.save_for_backward(x, step)


def _backward(ctx, grad_out):
    x, step = ctx.saved_tensors
    grad_x, grad_step = lsq_fake_quant_backward(grad_out, x, step, *ctx.args)
    return grad_x, grad_step, None, None, None, None


torch.library.register_autograd("zsqfast::lsq_fake_quant", _backward, setup_context=_setup_context)


def lsq_fake_quantize(x: torch.Tensor, step: torch.Tensor, bits: int, *, signed: bool = True,
                      axis: int | None = None, grad_scale: float | None = None) -> torch.Tensor:
    """LSQ fake quantization: ``clamp(round(x / step), qmin, qmax) * step`` with a learned ``step``.

    Args:
        x: float32 / float16 / bfloat16 / float64 tensor, any shape and layout.
        step: positive finite step size, a tensor (usually an ``nn.Parameter``) of shape ``()``/``(1,)`` per
            tensor or ``(x.size(axis),)`` per channel; it receives the LSQ gradient. Its values are checked
            on the CPU (as :func:`zsqfast.fake_quantize` checks ``scale``).
        bits: 2..8. ``signed=True``: ``q in [-2^(b-1), 2^(b-1)-1]`` (weights); ``False``: ``[0, 2^b-1]``.
        axis: ``None`` per tensor, else the channel dimension of ``step``.
        grad_scale: multiplies the step gradient; default ``1 / sqrt(N_c * qmax)`` (the LSQ paper).
    Returns:
        Tensor of ``x``'s shape and dtype.
    """
    C.check_input(x)
    if not isinstance(step, torch.Tensor) or not step.is_floating_point():
        raise TypeError("step must be a floating-point tensor (an nn.Parameter to learn it)")
    axis = normalize_axis(x, axis)
    qmin, qmax = C.qrange(bits, signed)
    want = 1 if axis is None else x.size(axis)
    if step.numel() != want:
        raise ValueError(f"step has {step.numel()} elements, expected {want}")
    if step.device != x.device:
        raise ValueError(f"step is on {step.device} but x is on {x.device}")
    C.check_scale(step.detach(), "step")
    if grad_scale is None:
        grad_scale = 1.0 / math.sqrt(max(x.numel() // want, 1) * qmax)
    shaped = step.reshape(want)
    return lsq_fake_quant(x, shaped, qmin, qmax, axis, float(grad_scale))
