"""SynQ's Gaussian low-pass filter of image batches, and the amplitude spectrum of SynQ's Fig. 5.

Official semantics (SynQ ``apply_filters``; :func:`reference`): for x (B, C, H, W),
``ifft2(ifftshift(fftshift(fft2(x)) * h)).real`` with ``h = exp(-d^2 / (2 d0^2))``,
``d^2 = (u - H//2)^2 + (v - W//2)^2`` in integer bins of the shifted spectrum; the same mask for every
sample and channel; DC gain 1.

The mask is separable, ``h = g_H(u) g_W(v)``, and symmetric in frequency, so the filter is the real
circulant map ``X -> A_H X A_W^T`` with ``A_N = F^-1 diag(g_N) F`` (a circular Gaussian blur of
sigma = N / (2 pi d0) pixels). The fast path applies it as two real matrix products with matrices built in
float64 once per (H, W, d0, dtype, device) and cached: no complex arithmetic, no FFT.
"""
from __future__ import annotations

import functools

import torch

from ._common import check_input


def _mask_1d(n: int, d0: float) -> torch.Tensor:
    f = torch.arange(n, dtype=torch.float64) - n // 2  # frequency of each bin of the shifted spectrum
    return torch.exp(-(f * f) / (2.0 * d0 * d0))


def reference(x: torch.Tensor, d0: float) -> torch.Tensor:
    """The official FFT implementation (complex arithmetic in x's precision; fp32 -> complex64)."""
    h, w = x.shape[-2:]
    mask = (_mask_1d(h, d0)[:, None] * _mask_1d(w, d0)[None, :]).to(device=x.device)
    spec = torch.fft.fftshift(torch.fft.fft2(x), dim=(-2, -1))
    spec = spec * mask.to(spec.real.dtype)
    return torch.fft.ifft2(torch.fft.ifftshift(spec, dim=(-2, -1))).real.to(x.dtype)


@functools.lru_cache(maxsize=64)
def circulant(n: int, d0: float, dtype: torch.dtype, device: str) -> torch.Tensor:
    """A_n (n, n): the real circulant matrix of the 1-D mask, built in float64, cast to ``dtype``."""
    g = torch.fft.ifftshift(_mask_1d(n, d0))                 # mask in unshifted bin order
    c = torch.fft.ifft(g.to(torch.complex128)).real          # first column of A: the circular kernel
    idx = (torch.arange(n)[:, None] - torch.arange(n)[None, :]) % n
    return c[idx].to(dtype=dtype, device=device).contiguous()


def gaussian_lowpass(x: torch.Tensor, d0: float, *, method: str = "auto") -> torch.Tensor:
    """SynQ's low-pass filter of a batch of images.

    Args:
        x: float (B, C, H, W) (any leading dims; the filter acts on the last two).
        d0: cutoff in DFT bins (SynQ's ``--d_zero``, default 80), > 0.
        method: ``"circulant"`` (two real matmuls, the fast path), ``"fft"`` (the official reference) or
            ``"auto"`` (circulant).
    Returns:
        Tensor like x. The two methods agree to ~1e-6 in fp32.
    """
    check_input(x)
    if x.dim() < 2:
        raise ValueError(f"gaussian_lowpass needs (..., H, W) images, got shape {tuple(x.shape)}")
    if not d0 > 0:
        raise ValueError(f"d0 must be positive, got {d0}")
    if method == "fft":
        return reference(x, d0)
    if method not in ("auto", "circulant"):
        raise ValueError(f"method must be 'auto', 'circulant' or 'fft', got {method!r}")
    h, w = x.shape[-2:]
    ct = torch.float64 if x.dtype == torch.float64 else torch.float32
    a_h = circulant(h, float(d0), ct, str(x.device))
    a_w = circulant(w, float(d0), ct, str(x.device))
    y = torch.matmul(x.to(ct), a_w.t())                       # rows:    X A_W^T
    y = torch.matmul(a_h, y)                                  # columns: A_H (X A_W^T)
    return y.to(x.dtype)


def amplitude_spectrum(x: torch.Tensor, num_bins: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Radial amplitude distribution (SynQ Fig. 5): mean |fftshift(fft2(x))| per integer radius.

    Args:
        x: float (B, C, H, W). num_bins: radii 0..num_bins-1 (default: min(H, W) // 2 + 1).
    Returns:
        ``(radius float (R,), mean amplitude float64 (R,))`` averaged over samples, channels and the bins of
        each ring.
    """
    check_input(x)
    h, w = x.shape[-2:]
    amp = torch.fft.fftshift(torch.fft.fft2(x.double()), dim=(-2, -1)).abs().mean(dim=tuple(range(x.dim() - 2)))
    yy = torch.arange(h, dtype=torch.float64)[:, None] - h // 2
    xx = torch.arange(w, dtype=torch.float64)[None, :] - w // 2
    r = torch.sqrt(yy * yy + xx * xx).round().long()
    nb = num_bins or min(h, w) // 2 + 1
    sel = r < nb
    total = torch.zeros(nb, dtype=torch.float64).index_add_(0, r[sel], amp[sel])
    count = torch.zeros(nb, dtype=torch.float64).index_add_(0, r[sel], torch.ones_like(amp[sel]))
    return torch.arange(nb, dtype=torch.float64), total / count.clamp(min=1)
