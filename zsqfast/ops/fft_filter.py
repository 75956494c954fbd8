"""Separable real-mask FFT filter of image planes (``zsqfast::fft_filter_sep``): the wide-kernel fast path of
SynQ's low-pass filter (zsqfast/ops/lowpass.py).

Semantics (:func:`reference`): for x (..., H, W) and real masks gh (H,), gw (W,) in FFT bin order,
``ifft2(fft2(x) * gh[:, None] * gw[None, :]).real`` (output dtype = x's; fp64 math for fp64 x). The masks must
be symmetric, ``g[k] = g[(n - k) % n]``: then each 1-D filter ``A = F^-1 diag(g) F`` is a real symmetric
matrix, the filter is its own adjoint (the backward is the same op), and the real part drops nothing. The
masks are constants: no gradient flows to them (the backward returns None for both).

Kernel contract (C++ CPU): contiguous fp32 (planes, H, W), fp32 masks, H and W with prime factors <= 64. The
kernel checks the masks' symmetry on every call (O(H + W)) and raises :data:`ASYMMETRIC`; the adapter then runs
the reference. Two
real rows share one complex FFT (A real: filtering a + i b gives A a + i A b) and the SIMD lanes hold
independent rows or columns, so a mixed-radix Stockham FFT runs with broadcast twiddles and no shuffles;
O(log n) work per pixel per axis where the dense circulant costs O(n).
"""
from __future__ import annotations

import functools

import torch

from ._dispatch import define_op

#: bound on the prime factors of H and W the C++ kernel takes (its generic odd radix holds up to 64 points, so
#: primes up to 61); other sizes run the reference
MAX_PRIME = 64


@functools.lru_cache(maxsize=256)
def supported_length(n: int) -> bool:
    """True when every prime factor of n is <= MAX_PRIME (what the C++ kernel's FFT can factor)."""
    if n < 1:
        return False
    for p in (2, 3):
        while n % p == 0:
            n //= p
    p = 5
    while n > 1 and p <= MAX_PRIME:
        while n % p == 0:
            n //= p
        p += 2
    return n == 1


def _symmetric(g: torch.Tensor) -> bool:
    """g[k] == g[(n - k) % n] for every k (k = 0 maps to itself; the rest is g[1:] reversed)."""
    return bool(torch.equal(g[1:], g[1:].flip(0)))


#: the C++ kernel's error for a mask with g[k] != g[(n - k) % n] (checked there, on every call: O(H + W))
ASYMMETRIC = "fft_filter_sep masks must be symmetric"


def reference(x: torch.Tensor, gh: torch.Tensor, gw: torch.Tensor) -> torch.Tensor:
    """``ifft2(fft2(x) * gh[:, None] * gw[None, :]).real`` in x's precision; via rfft2 / irfft2 when the masks
    are symmetric (then the half spectrum carries everything and the real part drops nothing)."""
    ct = torch.float64 if x.dtype == torch.float64 else torch.float32
    if x.numel() == 0:
        return torch.empty_like(x, memory_format=torch.contiguous_format)
    h, w = x.shape[-2:]
    gh, gw = gh.to(device=x.device, dtype=ct), gw.to(device=x.device, dtype=ct)
    if _symmetric(gh) and _symmetric(gw):
        spec = torch.fft.rfft2(x.to(ct)) * (gh[:, None] * gw[None, : w // 2 + 1])
        return torch.fft.irfft2(spec, s=(h, w)).to(x.dtype)
    return torch.fft.ifft2(torch.fft.fft2(x.to(ct)) * (gh[:, None] * gw[None, :])).real.to(x.dtype)


def _fake(x, gh, gw):
    return torch.empty_like(x, memory_format=torch.contiguous_format)


def _adapter(impl, x, gh, gw):
    if x.dim() < 2 or gh.dim() != 1 or gw.dim() != 1 or (gh.numel(), gw.numel()) != tuple(x.shape[-2:]):
        raise ValueError(f"fft_filter_sep needs (..., H, W) input and masks of length H and W, got {tuple(x.shape)}"
                         f", {tuple(gh.shape)}, {tuple(gw.shape)}")
    h, w = x.shape[-2:]
    if x.dtype == torch.float64 or x.numel() == 0 or not (supported_length(h) and supported_length(w)):
        return reference(x, gh, gw)
    xf = x.reshape(-1, h, w)
    if xf.dtype != torch.float32 or not xf.is_contiguous():
        xf = xf.to(torch.float32).contiguous()
    gf = [g if g.dtype == torch.float32 and g.device == x.device and g.is_contiguous()
          else g.to(device=x.device, dtype=torch.float32).contiguous() for g in (gh, gw)]
    try:
        y = impl(xf, *gf).view(x.shape)
    except ValueError as exc:  # an asymmetric mask: the real-row trick does not hold, run the full complex FFT
        if ASYMMETRIC not in str(exc):
            raise
        return reference(x, gh, gw)
    return y if y.dtype == x.dtype else y.to(x.dtype)


fft_filter_sep = define_op("fft_filter_sep", "(Tensor x, Tensor gh, Tensor gw) -> Tensor", reference, _fake,
                           _adapter)


def _setup(ctx, inputs, output):
    ctx.masks = inputs[1], inputs[2]


def _backward(ctx, grad):
    gh, gw = ctx.masks  # symmetric masks: the filter is a real symmetric matrix, its own adjoint
    return fft_filter_sep(grad.contiguous(), gh, gw), None, None


torch.library.register_autograd("zsqfast::fft_filter_sep", _backward, setup_context=_setup)
