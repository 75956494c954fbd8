"""Triton LSQ: forward, and a backward that writes grad_x and reduces the step gradient in the same pass.

Contract and math: ``zsqfast/ops/lsq.py``. The forward walks memory order, BLOCK elements a program. The
backward grid is (C, programs per channel): viewing memory as (outer, C, inner), program (c, j) walks the
j-th run of channel c's ``outer * inner`` elements, BLOCK at a time, and stores one fp32 partial sum of
``grad * dstep``; the (C, programs) partials are then summed by torch in a fixed order (deterministic, no
atomics, no per-element temporaries, no host sync).
"""
import torch
import triton
import triton.language as tl

from ._common import COMPILE_OPTIONS, block_size, channel_split, check_size, clamp_nan, rne, store_rounded, to_f32


@triton.jit
def lsq_fwd_kernel(x_ptr, out_ptr, s_ptr, inv_ptr, n, inner, C, qmin, qmax, PER_CHANNEL: tl.constexpr,
                   BLOCK: tl.constexpr):
    """x, out: (n,) fp32/fp16/bf16 in memory order; s, inv: fp32 (C,)."""
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    valid = offs < n
    if PER_CHANNEL:
        c = (offs // inner) % C
        s = tl.load(s_ptr + c, mask=valid, other=1.0)
        inv = tl.load(inv_ptr + c, mask=valid, other=1.0)
    else:
        s = tl.load(s_ptr)
        inv = tl.load(inv_ptr)
    x = to_f32(tl.load(x_ptr + offs, mask=valid, other=0.0))
    y = clamp_nan(rne(x * inv), qmin, qmax) * s            # out = clamp(rne(x * (1/s)), qmin, qmax) * s
    store_rounded(out_ptr, offs, y, valid)


@triton.jit
def lsq_bwd_kernel(g_ptr, x_ptr, gx_ptr, partial_ptr, inv_ptr, per_channel, per_program, inner, C, qmin, qmax,
                   PER_CHANNEL: tl.constexpr, BLOCK: tl.constexpr):
    """g, x, gx: (n,) in memory order, n = C * per_channel; partial: fp32 (C, programs); inv: fp32 (C,)."""
    c = tl.program_id(0)
    j = tl.program_id(1)
    inv = tl.load(inv_ptr + c)
    acc = tl.zeros((BLOCK,), dtype=tl.float32)
    start = j * per_program
    stop = tl.minimum(start + per_program, per_channel)
    for k0 in range(start, stop, BLOCK):
        k = k0 + tl.arange(0, BLOCK)                        # k-th element of channel c
        valid = k < stop
        if PER_CHANNEL:
            # k = row * inner + i  ->  memory offset row * C * inner + c * inner + i
            offs = k + (k // inner) * ((C - 1) * inner) + c * inner
        else:
            offs = k
        g = tl.load(g_ptr + offs, mask=valid, other=0.0)
        v = to_f32(tl.load(x_ptr + offs, mask=valid, other=0.0)) * inv
        below = v < qmin
        above = v > qmax
        tl.store(gx_ptr + offs, tl.where(below | above, tl.zeros_like(g), g), mask=valid)  # 0 outside the grid
        dstep = tl.where(below, qmin, tl.where(above, qmax, rne(v) - v))  # d out / d step (without grad_scale)
        acc += tl.where(valid, to_f32(g) * dstep, 0.0)
    tl.store(partial_ptr + c * tl.num_programs(1) + j, tl.sum(acc, axis=0))


def lsq_fake_quant(x, step, inv_step, qmin, qmax, inner, C):
    """Kernel contract of ``zsqfast::lsq_fake_quant``.

    Args:
        x: dense fp32/fp16/bf16 tensor (any dimension order), walked in memory order.
        step, inv_step: contiguous fp32 (C,); inv_step = 1 / step rounded once.
        qmin, qmax: integer grid ends. inner, C: channel of memory offset o is (o // inner) % C.
    Returns:
        out like ``x`` (same strides, dtype).
    """
    n = x.numel()
    check_size(n)
    out = torch.empty_like(x)
    if n:
        block = block_size()
        per_channel = C > 1
        lsq_fwd_kernel[(triton.cdiv(n, block),)](x, out, step, inv_step, n, inner if per_channel else 1, C,
                                                 float(qmin), float(qmax), PER_CHANNEL=per_channel, BLOCK=block,
                                                 **COMPILE_OPTIONS)
    return out


def lsq_fake_quant_backward(grad, x, step, inv_step, qmin, qmax, inner, C, grad_scale):
    """Kernel contract of ``zsqfast::lsq_fake_quant_backward``.

    Args:
        grad: dense, with ``x``'s strides and dtype. x, step, inv_step, qmin, qmax, inner, C: as the forward.
        grad_scale: multiplies the step gradient.
    Returns:
        ``(grad_x like x, grad_step fp32 (C,))``.
    """
    n = x.numel()
    check_size(n)
    grad_x = torch.empty_like(x)
    if n == 0:
        return grad_x, torch.zeros(C, dtype=torch.float32, device=x.device)
    per_channel = n // C
    block = block_size()
    per_program, programs = channel_split(per_channel, C, block)
    partial = torch.empty(C, programs, dtype=torch.float32, device=x.device)
    lsq_bwd_kernel[(C, programs)](grad, x, grad_x, partial, inv_step, per_channel, per_program,
                                  inner if C > 1 else 1, C, float(qmin), float(qmax), PER_CHANNEL=C > 1,
                                  BLOCK=block, **COMPILE_OPTIONS)
    return grad_x, partial.sum(dim=1) * grad_scale
