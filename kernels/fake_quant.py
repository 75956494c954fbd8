"""Triton fake quantization: forward (output + 1-bit STE mask) and backward, one pass each.

Contract and math: ``zsqfast/ops/fake_quantize.py``. The element at memory offset o uses channel
``(o // inner) % C``; mask bit o&7 of byte o>>3 is set when ``qmin <= rne(x * inv) + zp <= qmax``.
BLOCK is a multiple of 8, so each program owns whole mask bytes.
"""
import torch
import triton
import triton.language as tl

from ._common import COMPILE_OPTIONS, block_size, check_size, clamp_nan, rne, store_rounded


@triton.jit
def fake_quant_fwd_kernel(x_ptr, out_ptr, mask_ptr, s_ptr, inv_ptr, zp_ptr, n, n_bytes, inner, C, qmin, qmax,
                          NEED_MASK: tl.constexpr, BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    offs = pid * BLOCK + tl.arange(0, BLOCK)
    valid = offs < n
    c = (offs // inner) % C
    s = tl.load(s_ptr + c, mask=valid, other=1.0)
    inv = tl.load(inv_ptr + c, mask=valid, other=1.0)
    zp = tl.load(zp_ptr + c, mask=valid, other=0.0)
    x = tl.load(x_ptr + offs, mask=valid, other=0.0).to(tl.float32)
    q = rne(x * inv) + zp                                  # q = rne(x / s) + zp
    y = (clamp_nan(q, qmin, qmax) - zp) * s                # out = (clamp(q) - zp) * s
    store_rounded(out_ptr, offs, y, valid)
    if NEED_MASK:
        inside = ((q >= qmin) & (q <= qmax) & valid).to(tl.int32)
        weights = 1 << tl.arange(0, 8)
        byte = tl.sum(tl.reshape(inside, (BLOCK // 8, 8)) * weights[None, :], axis=1)
        boffs = pid * (BLOCK // 8) + tl.arange(0, BLOCK // 8)
        tl.store(mask_ptr + boffs, byte.to(tl.uint8), mask=boffs < n_bytes)


@triton.jit
def fake_quant_bwd_kernel(g_ptr, mask_ptr, out_ptr, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    valid = offs < n
    bits = tl.load(mask_ptr + offs // 8, mask=valid, other=0).to(tl.int32)
    g = tl.load(g_ptr + offs, mask=valid, other=0.0)
    keep = ((bits >> (offs % 8)) & 1) != 0                 # grad_x = bit ? grad : 0
    tl.store(out_ptr + offs, tl.where(keep, g, tl.zeros_like(g)), mask=valid)


def fake_quant(x, scale, inv_scale, zero_point, qmin, qmax, inner, C, need_mask):
    """Kernel contract of ``zsqfast::fake_quant``: x dense (fp32/fp16/bf16), params fp32 (C,).
    Returns ``(out with x's strides, mask uint8 (ceil(n/8),) or (0,))``."""
    n = x.numel()
    check_size(n)
    out = torch.empty_like(x)
    n_bytes = (n + 7) // 8
    mask = torch.empty(n_bytes if need_mask else 0, dtype=torch.uint8, device=x.device)
    if n:
        block = block_size()
        fake_quant_fwd_kernel[(triton.cdiv(n, block),)](
            x, out, mask if need_mask else out, scale, inv_scale, zero_point, n, n_bytes, inner, C,
            float(qmin), float(qmax), NEED_MASK=bool(need_mask), BLOCK=block, **COMPILE_OPTIONS)
    return out, mask


def fake_quant_backward(grad, mask):
    """Kernel contract of ``zsqfast::fake_quant_backward``: ``grad * bit(mask)`` in grad's layout."""
    n = grad.numel()
    check_size(n)
    out = torch.empty_like(grad)
    if n:
        block = block_size()
        fake_quant_bwd_kernel[(triton.cdiv(n, block),)](grad, mask, out, n, BLOCK=block, **COMPILE_OPTIONS)
    return out
