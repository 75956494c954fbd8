"""Triton BatchNorm-input statistics and their backward affine map.

Contract and math: ``zsqfast/ops/bn_stats.py``. Statistics: grid (C, programs per channel), each program
sums d = x - K_c and d^2 (K_c = the channel's first element: the shifted-data algorithm) over part of channel c (memory viewed as (outer, C, inner)) in fp32 and stores the two
partials; they are combined in float64 in a fixed order (deterministic, no atomics, no host sync).
Backward: elementwise ``out = (a_c + b_c * x) + grad``.
"""
import torch
import triton
import triton.language as tl

from ._common import COMPILE_OPTIONS, block_size, check_size, store_rounded, to_f32


@triton.jit
def bn_stats_kernel(x_ptr, partial_ptr, per_channel, per_program, inner, C, BLOCK: tl.constexpr):
    c = tl.program_id(0)
    j = tl.program_id(1)
    k_c = to_f32(tl.load(x_ptr + c * inner))      # shift: sums of x - K_c do not cancel
    s = tl.zeros((BLOCK,), dtype=tl.float32)
    q = tl.zeros((BLOCK,), dtype=tl.float32)
    start = j * per_program
    stop = tl.minimum(start + per_program, per_channel)
    for k0 in range(start, stop, BLOCK):
        k = k0 + tl.arange(0, BLOCK)
        offs = (k // inner) * (C * inner) + c * inner + k % inner
        v = tl.where(k < stop, to_f32(tl.load(x_ptr + offs, mask=k < stop, other=0.0)) - k_c, 0.0)
        s += v
        q += v * v
    base = (c * tl.num_programs(1) + j) * 2
    tl.store(partial_ptr + base, tl.sum(s, axis=0))
    tl.store(partial_ptr + base + 1, tl.sum(q, axis=0))


@triton.jit
def bn_stats_bwd_kernel(g_ptr, x_ptr, out_ptr, a_ptr, b_ptr, n, inner, C, HAS_GRAD: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    valid = offs < n
    c = (offs // inner) % C
    a = tl.load(a_ptr + c, mask=valid, other=0.0)
    b = tl.load(b_ptr + c, mask=valid, other=0.0)
    y = a + b * to_f32(tl.load(x_ptr + offs, mask=valid, other=0.0))   # dx = a_c + b_c x
    if HAS_GRAD:
        y = y + to_f32(tl.load(g_ptr + offs, mask=valid, other=0.0))
    store_rounded(out_ptr, offs, y, valid)


def bn_stats(x, inner, C):
    """Kernel contract of ``zsqfast::bn_stats``: ``(mean, biased var)`` fp32 (C,)."""
    n = x.numel()
    check_size(n)
    if C == 1:
        inner = n
    per_channel = n // C
    block = block_size()
    per_program = block * max(1, min(64, triton.cdiv(per_channel, block * 8)))
    programs = triton.cdiv(per_channel, per_program)
    partial = torch.empty(C, programs, 2, dtype=torch.float32, device=x.device)
    bn_stats_kernel[(C, programs)](x, partial, per_channel, per_program, inner, C, BLOCK=block, **COMPILE_OPTIONS)
    sums = partial.double().sum(dim=1)
    d = sums[:, 0] / per_channel                          # mean of x - K_c
    var = (sums[:, 1] / per_channel - d * d).clamp_(min=0.0)
    shift = x.as_strided((C,), (inner,)).double()         # K_c = x at offset c * inner
    return (shift + d).float(), var.float()


def bn_stats_backward(grad, x, a, b, inner, C):
    """Kernel contract of ``zsqfast::bn_stats_backward``: ``grad + a_c + b_c * x`` with x's strides."""
    n = x.numel()
    check_size(n)
    out = torch.empty_like(x)
    block = block_size()
    bn_stats_bwd_kernel[(triton.cdiv(n, block),)](x if grad is None else grad, x, out, a, b, n, inner, C,
                                                  HAS_GRAD=grad is not None, BLOCK=block, **COMPILE_OPTIONS)
    return out
