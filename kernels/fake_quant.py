"""Triton fake quantization: forward (output + 1-bit STE mask) and backward, one pass each.

Contract and math: ``zsqfast/ops/fake_quantize.py``. Both kernels walk the dense tensor in memory order,
BLOCK elements a program (1-D grid). Per channel, the element at memory offset o uses channel
``(o // inner) % C``; per tensor (``PER_CHANNEL=False``) the parameters are three scalar loads. Mask bit
o&7 of byte o>>3 is set when ``qmin <= rne(x * inv) + zp <= qmax``; BLOCK is a multiple of 8, so every
program owns whole mask bytes.
"""
import torch
import triton
import triton.language as tl

from ._common import COMPILE_OPTIONS, block_size, check_size, clamp_nan, rne, store_rounded, to_f32


@triton.jit
def fake_quant_fwd_kernel(x_ptr, out_ptr, mask_ptr, s_ptr, inv_ptr, zp_ptr, n, inner, C, qmin, qmax,
                          PER_CHANNEL: tl.constexpr, NEED_MASK: tl.constexpr, BLOCK: tl.constexpr):
    """x, out: (n,) fp32/fp16/bf16 in memory order; mask: uint8 (ceil(n/8),); s, inv, zp: fp32 (C,)."""
    pid = tl.program_id(0)
    offs = pid * BLOCK + tl.arange(0, BLOCK)
    valid = offs < n
    if PER_CHANNEL:
        c = (offs // inner) % C
        s = tl.load(s_ptr + c, mask=valid, other=1.0)
        inv = tl.load(inv_ptr + c, mask=valid, other=1.0)
        zp = tl.load(zp_ptr + c, mask=valid, other=0.0)
    else:
        s = tl.load(s_ptr)
        inv = tl.load(inv_ptr)
        zp = tl.load(zp_ptr)
    x = to_f32(tl.load(x_ptr + offs, mask=valid, other=0.0))
    q = rne(x * inv) + zp                                  # q = rne(x * (1/s)) + zp
    y = (clamp_nan(q, qmin, qmax) - zp) * s                # out = (clamp(q, qmin, qmax) - zp) * s
    store_rounded(out_ptr, offs, y, valid)
    if NEED_MASK:
        # byte b = sum_i inside[8b + i] << i; padding elements (offs >= n) contribute 0
        inside = ((q >= qmin) & (q <= qmax) & valid).to(tl.int32)
        weights = 1 << tl.arange(0, 8)
        byte = tl.sum(tl.reshape(inside, (BLOCK // 8, 8)) * weights[None, :], axis=1)
        boffs = pid * (BLOCK // 8) + tl.arange(0, BLOCK // 8)
        tl.store(mask_ptr + boffs, byte.to(tl.uint8), mask=boffs < (n + 7) // 8)


@triton.jit
def fake_quant_bwd_kernel(g_ptr, mask_ptr, out_ptr, n, BLOCK: tl.constexpr):
    """g, out: (n,) fp32/fp16/bf16 in memory order; mask: uint8 (ceil(n/8),). A program takes BLOCK // 8
    mask bytes and the (BLOCK // 8, 8) tile of elements they cover: one byte load per 8 elements."""
    rows = tl.program_id(0) * (BLOCK // 8) + tl.arange(0, BLOCK // 8)
    bits = tl.load(mask_ptr + rows, mask=rows < (n + 7) // 8, other=0).to(tl.int32)
    offs = rows[:, None] * 8 + tl.arange(0, 8)[None, :]
    valid = offs < n
    g = tl.load(g_ptr + offs, mask=valid, other=0.0)
    keep = ((bits[:, None] >> tl.arange(0, 8)[None, :]) & 1) != 0
    tl.store(out_ptr + offs, tl.where(keep, g, tl.zeros_like(g)), mask=valid)   # grad_x = bit ? grad : 0


def fake_quant(x, scale, inv_scale, zero_point, qmin, qmax, inner, C, need_mask):
    """Kernel contract of ``zsqfast::fake_quant``.

    Args:
        x: dense tensor (any dimension order), fp32/fp16/bf16, walked in memory order.
        scale, inv_scale, zero_point: contiguous fp32 (C,); inv_scale = 1 / scale rounded once.
        qmin, qmax: integer grid ends. inner, C: channel of memory offset o is (o // inner) % C.
        need_mask: also return the packed STE mask.
    Returns:
        ``(out, mask)``: out like ``x`` (same strides, dtype); mask uint8 (ceil(numel / 8),), or (0,).
    """
    n = x.numel()
    check_size(n)
    out = torch.empty_like(x)
    mask = torch.empty((n + 7) // 8 if need_mask else 0, dtype=torch.uint8, device=x.device)
    if n:
        block = block_size()
        per_channel = C > 1
        fake_quant_fwd_kernel[(triton.cdiv(n, block),)](
            x, out, mask if need_mask else out, scale, inv_scale, zero_point, n, inner if per_channel else 1,
            C, float(qmin), float(qmax), PER_CHANNEL=per_channel, NEED_MASK=bool(need_mask), BLOCK=block,
            **COMPILE_OPTIONS)
    return out, mask


def fake_quant_backward(grad, mask):
    """Kernel contract of ``zsqfast::fake_quant_backward``: ``grad * bit(mask)``.

    Args:
        grad: dense fp32/fp16/bf16 tensor in the forward input's memory layout.
        mask: uint8 (ceil(numel / 8),) from :func:`fake_quant`.
    Returns:
        grad_x like ``grad`` (same strides, dtype).
    """
    n = grad.numel()
    check_size(n)
    out = torch.empty_like(grad)
    if n:
        block = block_size()
        fake_quant_bwd_kernel[(triton.cdiv(n, block),)](grad, mask, out, n, BLOCK=block, **COMPILE_OPTIONS)
    return out
