"""Triton LSQ: forward, and a backward that writes grad_x and reduces the step gradient in one pass.

Contract and math: ``zsqfast/ops/lsq.py``. The backward grid is (C, programs per channel): program (c, j)
walks part of channel c's elements, viewing memory as (outer, C, inner), and stores one fp32 partial sum;
the (C, programs) partials are then summed in a fixed order (deterministic, no atomics, no host sync).
"""
import torch
import triton
import triton.language as tl

from ._common import COMPILE_OPTIONS, block_size, check_size, clamp_nan, rne, store_rounded


@triton.jit
def lsq_fwd_kernel(x_ptr, out_ptr, s_ptr, inv_ptr, n, inner, C, qmin, qmax, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    valid = offs < n
    c = (offs // inner) % C
    s = tl.load(s_ptr + c, mask=valid, other=1.0)
    inv = tl.load(inv_ptr + c, mask=valid, other=1.0)
    x = tl.load(x_ptr + offs, mask=valid, other=0.0).to(tl.float32)
    y = clamp_nan(rne(x * inv), qmin, qmax) * s            # out = clamp(rne(x / s)) * s
    store_rounded(out_ptr, offs, y, valid)


@triton.jit
def lsq_bwd_kernel(g_ptr, x_ptr, gx_ptr, partial_ptr, inv_ptr, per_channel, per_program, inner, C, qmin, qmax,
                   BLOCK: tl.constexpr):
    c = tl.program_id(0)
    j = tl.program_id(1)
    inv = tl.load(inv_ptr + c)
    acc = tl.zeros((BLOCK,), dtype=tl.float32)
    start = j * per_program
    stop = tl.minimum(start + per_program, per_channel)
    for k0 in range(start, stop, BLOCK):
        k = k0 + tl.arange(0, BLOCK)                        # k-th element of channel c
        valid = k < stop
        offs = (k // inner) * (C * inner) + c * inner + k % inner
        g = tl.load(g_ptr + offs, mask=valid, other=0.0).to(tl.float32)
        v = tl.load(x_ptr + offs, mask=valid, other=0.0).to(tl.float32) * inv
        below = v < qmin
        above = v > qmax
        gx = tl.where(below | above, 0.0, g)                # grad_x = 0 outside the grid
        store_rounded(gx_ptr, offs, gx, valid)
        dstep = tl.where(below, qmin, tl.where(above, qmax, rne(v) - v))
        acc += tl.where(valid, g * dstep, 0.0)
    tl.store(partial_ptr + c * tl.num_programs(1) + j, tl.sum(acc, axis=0))


def lsq_fake_quant(x, step, inv_step, qmin, qmax, inner, C):
    """Kernel contract of ``zsqfast::lsq_fake_quant``."""
    n = x.numel()
    check_size(n)
    out = torch.empty_like(x)
    if n:
        block = block_size()
        lsq_fwd_kernel[(triton.cdiv(n, block),)](x, out, step, inv_step, n, inner, C, float(qmin), float(qmax),
                                                 BLOCK=block, **COMPILE_OPTIONS)
    return out


def lsq_fake_quant_backward(grad, x, step, inv_step, qmin, qmax, inner, C, grad_scale):
    """Kernel contract of ``zsqfast::lsq_fake_quant_backward``: ``(grad_x, grad_step fp32 (C,))``."""
    n = x.numel()
    check_size(n)
    grad_x = torch.empty_like(x)
    if n == 0:
        return grad_x, torch.zeros(C, dtype=torch.float32, device=x.device)
    if C == 1:
        inner = n  # one channel: one long run
    per_channel = n // C
    block = block_size()
    per_program = block * max(1, min(64, triton.cdiv(per_channel, block * 8)))
    programs = triton.cdiv(per_channel, per_program)
    partial = torch.empty(C, programs, dtype=torch.float32, device=x.device)
    lsq_bwd_kernel[(C, programs)](grad, x, grad_x, partial, inv_step, per_channel, per_program, inner, C,
                                  float(qmin), float(qmax), BLOCK=block, **COMPILE_OPTIONS)
    return grad_x, partial.sum(dim=1) * grad_scale
