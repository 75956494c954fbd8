"""Triton separable circular convolution: the banded path of SynQ's low-pass filter.

Contract and math: ``zsqfast/ops/lowpass.py`` (``circular_conv_sep``): x fp32 (P, H, W) contiguous, odd
taps wh (2rh+1,), ww (2rw+1,). One 1-D pass kernel, launched twice: along H into a scratch tensor, then
along W into the output. A program owns a (BL along the convolved axis) x (BM along the other) tile of one
plane and accumulates ``sum_t w[t] x[(i + t - r) mod L]`` in fp32 (r <= L, so one wrap at most).
"""
import torch
import triton
import triton.language as tl

from zsqfast._triton import interpreted

from ._common import COMPILE_OPTIONS, check_size


@triton.jit
def circular_pass_kernel(x_ptr, out_ptr, w_ptr, L, M, s_plane, s_l, s_m, T, R, BL: tl.constexpr,
                         BM: tl.constexpr):
    """out[p, i, j] = sum_{t<T} w[t] x[p, (i + t - R) mod L, j]; element (p, i, j) at p*s_plane + i*s_l + j*s_m."""
    p = tl.program_id(0)
    i = tl.program_id(1) * BL + tl.arange(0, BL)
    j = tl.program_id(2) * BM + tl.arange(0, BM)
    valid = (i[:, None] < L) & (j[None, :] < M)
    base = p * s_plane
    col = j[None, :] * s_m
    acc = tl.zeros((BL, BM), dtype=tl.float32)
    for t in range(0, T):
        src = i + t - R
        src = tl.where(src < 0, src + L, src)
        src = tl.where(src >= L, src - L, src)
        v = tl.load(x_ptr + base + src[:, None] * s_l + col, mask=valid, other=0.0)
        acc += tl.load(w_ptr + t) * v
    tl.store(out_ptr + base + i[:, None] * s_l + col, acc, mask=valid)


#: (BL, BM) on a GPU: 32 x 64 tiles, 8 warps (COMPILE_OPTIONS), 8 elements a thread
GPU_TILES = (32, 64)


def tiles() -> tuple[int, int]:
    """(BL, BM): GPU_TILES on a GPU, 32 x 32 under the interpreter (fewer Python-loop programs)."""
    return (32, 32) if interpreted() else GPU_TILES


def circular_conv_sep(x, wh, ww):
    """Kernel contract of ``zsqfast::circular_conv_sep`` (see the module docstring)."""
    check_size(x.numel())
    planes, h, w = x.shape
    bl, bm = tiles()
    tmp = torch.empty_like(x)
    out = torch.empty_like(x)
    circular_pass_kernel[(planes, triton.cdiv(h, bl), triton.cdiv(w, bm))](
        x, tmp, wh, h, w, h * w, w, 1, wh.numel(), (wh.numel() - 1) // 2, BL=bl, BM=bm, **COMPILE_OPTIONS)
    circular_pass_kernel[(planes, triton.cdiv(w, bl), triton.cdiv(h, bm))](
        tmp, out, ww, w, h, h * w, 1, w, ww.numel(), (ww.numel() - 1) // 2, BL=bl, BM=bm, **COMPILE_OPTIONS)
    return out
