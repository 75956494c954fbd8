"""SynQ's Gaussian low-pass filter of image batches, and the amplitude spectrum of SynQ's Fig. 5.

Official semantics (SynQ ``apply_filters``; :func:`reference`): for x (B, C, H, W),
``ifft2(ifftshift(fftshift(fft2(x)) * h)).real`` with ``h = exp(-d^2 / (2 d0^2))``,
``d^2 = (u - H//2)^2 + (v - W//2)^2`` in integer bins of the shifted spectrum; the same mask for every
sample and channel; DC gain 1.

The mask is separable, ``h = g_H(u) g_W(v)``, and symmetric in frequency, so the filter is the real
circulant map ``X -> A_H X A_W^T`` with ``A_N = F^-1 diag(g_N) F``: a separable circular convolution with
the real symmetric kernel ``c_N = ifft(g_N)``. Two fast paths, both built in float64 once per
(N, d0) and cached, no complex arithmetic:

* **banded** (``zsqfast::circular_conv_sep``, C++ and Triton kernels): per axis only the taps
  ``|k| <= r`` of c_N, r the smallest radius whose dropped tail has ``sum_{|k|>r} |c_N[k]| <= TAP_TOL``
  (1e-7), so ``|banded - exact| <= ~2e-7 max|x|`` plus fp32 rounding. A Gaussian of sigma
  ``N / (2 pi d0)`` pixels would need few taps, but the official mask is cut at the Nyquist bin, where it
  is still ``exp(-N^2 / (8 d0^2))`` (0.375 for N = 224, d0 = 80): that kink makes c_N decay only like
  1/k^2 and the kernel is then as wide as the image. r is therefore read off the kernel itself, never
  assumed; when the mask has decayed at Nyquist (e.g. N = 224, d0 = 20: 21 taps) the banded path costs
  O(r) per pixel instead of O(N).
* **circulant** (dense): two real matrix products ``A_H X A_W^T`` (BLAS), for kernels too wide to band.
* **sepfft** (``zsqfast::fft_filter_sep``, C++ CPU kernel, zsqfast/ops/fft_filter.py): the real symmetric
  1-D masks applied by an own mixed-radix FFT per axis, two real rows packed into one complex signal (A_N is
  real) and 16 rows or columns per AVX-512 instruction: O(log N) per pixel for the wide kernels that cannot be
  banded (the default d0 = 80). Other devices, or a build without the extension, run its reference (rfft2).
* **rfft**: the same real mask applied to ``rfft2(x)`` (half spectrum, cached mask) and ``irfft2``: exact
  like the others, and cheaper than O(N) dense products per pixel once the image is large.

``method="auto"`` picks banded when the taps of both axes sum to at most :data:`BANDED_FRACTION` of
``H + W``; else, on the CPU with the C++ kernel in use and images not fp64, sepfft when both sizes factor into
primes <= 64; else circulant when ``H + W <=`` :data:`RFFT_MIN_SIZE`, else rfft (measured crossovers).
"""
from __future__ import annotations

import functools

import torch

from .. import _backend
from ._common import check_input
from ._dispatch import define_op
from .fft_filter import fft_filter_sep, supported_length

#: dropped kernel mass allowed per axis on the banded path (sum of |taps| left out)
TAP_TOL = 1e-7
#: ``method="auto"`` takes the banded path when ``taps_H + taps_W <= BANDED_FRACTION * (H + W)``: on the
#: project's CPU a folded tap of the banded kernel and a BLAS tap of the dense products cost about the same
#: (measured), and BLAS wins small full-width kernels (32x32, d0 = 80: 33 taps).
BANDED_FRACTION = 0.75
#: wide kernels on images with H + W above this run the rfft path (BLAS wins at 32x32, rfft2 at 224x224)
RFFT_MIN_SIZE = 256


def _mask_1d(n: int, d0: float) -> torch.Tensor:
    f = torch.arange(n, dtype=torch.float64) - n // 2  # frequency of each bin of the shifted spectrum
    return torch.exp(-(f * f) / (2.0 * d0 * d0))


def _fft_dtype(x: torch.Tensor) -> torch.dtype:
    """x's dtype where ``torch.fft`` takes it (fp32, fp64; fp16 on CUDA for power-of-two sizes, cuFFT's half
    precision), else float32 (fp16 elsewhere, bf16), the compute dtype of the other methods."""
    if x.dtype in (torch.float32, torch.float64):
        return x.dtype
    pow2 = all(n & (n - 1) == 0 for n in x.shape[-2:])
    return x.dtype if x.dtype == torch.float16 and x.device.type == "cuda" and pow2 else torch.float32


def reference(x: torch.Tensor, d0: float) -> torch.Tensor:
    """The official FFT implementation (complex arithmetic in x's precision; fp32 -> complex64; a half
    precision x that torch.fft does not take, see :func:`_fft_dtype`, runs in fp32 and is cast back)."""
    h, w = x.shape[-2:]
    mask = (_mask_1d(h, d0)[:, None] * _mask_1d(w, d0)[None, :]).to(device=x.device)
    spec = torch.fft.fftshift(torch.fft.fft2(x.to(_fft_dtype(x))), dim=(-2, -1))
    spec = spec * mask.to(spec.real.dtype)
    return torch.fft.ifft2(torch.fft.ifftshift(spec, dim=(-2, -1))).real.to(x.dtype)


@functools.lru_cache(maxsize=128)
def kernel_1d(n: int, d0: float) -> torch.Tensor:
    """c_n (n,) float64: the circular kernel of the 1-D mask (``c[k]`` = weight of offset k mod n)."""
    g = torch.fft.ifftshift(_mask_1d(n, d0))                 # mask in unshifted bin order
    return torch.fft.ifft(g.to(torch.complex128)).real


@functools.lru_cache(maxsize=64)
def circulant(n: int, d0: float, dtype: torch.dtype, device: str) -> torch.Tensor:
    """A_n (n, n): the real circulant matrix of the 1-D mask, built in float64, cast to ``dtype``."""
    idx = (torch.arange(n)[:, None] - torch.arange(n)[None, :]) % n
    return kernel_1d(n, d0)[idx].to(dtype=dtype, device=device).contiguous()


@functools.lru_cache(maxsize=128)
def band_taps(n: int, d0: float, tol: float = TAP_TOL) -> torch.Tensor:
    """Symmetric taps (2r+1,) float64 for offsets -r..r of the circular kernel, r the smallest radius whose
    dropped tail ``sum_{|k|>r} |c[k]|`` is <= tol. When no radius below the full width qualifies, the taps
    cover every offset exactly once (even n: r = n/2 and the weight of offset n/2 is split over +-n/2), so
    the banded path is then the exact circulant."""
    c = kernel_1d(n, d0)
    a = c.abs()
    half = n // 2
    # tail[r] = sum over offsets with min(k, n - k) > r
    dist = torch.minimum(torch.arange(n), n - torch.arange(n))
    mass = torch.zeros(half + 1, dtype=torch.float64).index_add_(0, dist, a)
    tail = mass.flip(0).cumsum(0).flip(0) - mass               # tail[r] = sum_{d > r} mass[d]
    ok = (tail <= tol).nonzero()
    r = int(ok[0]) if len(ok) else half
    offsets = torch.arange(-r, r + 1) % n
    taps = c[offsets].clone()
    if n % 2 == 0 and r == half:
        taps[0] = taps[-1] = c[half] / 2                       # offsets -n/2 and n/2 are one and the same
    return taps


@functools.lru_cache(maxsize=64)
def fft_mask_1d(n: int, d0: float, dtype: torch.dtype, device: str) -> torch.Tensor:
    """g_n (n,) in FFT bin order (symmetric: g[k] = g[(n - k) % n]), built in float64, cast to ``dtype``."""
    return torch.fft.ifftshift(_mask_1d(n, d0)).to(dtype=dtype, device=device)


@functools.lru_cache(maxsize=32)
def rfft_mask(h: int, w: int, d0: float, dtype: torch.dtype, device: str) -> torch.Tensor:
    """The official mask in ``rfft2`` bin order (h, w // 2 + 1), built in float64."""
    g_h = torch.fft.ifftshift(_mask_1d(h, d0))
    g_w = torch.fft.ifftshift(_mask_1d(w, d0))[: w // 2 + 1]
    return (g_h[:, None] * g_w[None, :]).to(dtype=dtype, device=device)


def conv_reference(x: torch.Tensor, wh: torch.Tensor, ww: torch.Tensor) -> torch.Tensor:
    """Semantics of ``zsqfast::circular_conv_sep``: for x (..., H, W) and odd-length taps wh (2rh+1,),
    ww (2rw+1,), ``out[i, j] = sum_a sum_b wh[a] ww[b] x[(i + a - rh) mod H, (j + b - rw) mod W]`` in fp32
    (fp64 for fp64 x); output dtype = x's."""
    ct = torch.float64 if x.dtype == torch.float64 else torch.float32
    xf = x.to(ct)
    rh, rw = (wh.numel() - 1) // 2, (ww.numel() - 1) // 2
    y = sum(wh[a].to(ct) * torch.roll(xf, rh - a, dims=-2) for a in range(wh.numel()))
    y = sum(ww[b].to(ct) * torch.roll(y, rw - b, dims=-1) for b in range(ww.numel()))
    return y.to(x.dtype)


def _conv_fake(x, wh, ww):
    return torch.empty_like(x, memory_format=torch.contiguous_format)


def _conv_adapter(impl, x, wh, ww):
    if x.dim() < 2 or wh.numel() % 2 == 0 or ww.numel() % 2 == 0:
        raise ValueError("circular_conv_sep needs (..., H, W) input and odd-length taps")
    h, w = x.shape[-2:]
    if x.dtype == torch.float64 or x.numel() == 0 or wh.numel() > 2 * h + 1 or ww.numel() > 2 * w + 1:
        return conv_reference(x, wh, ww)  # the kernels wrap each offset at most once
    xf = x.reshape(-1, h, w).to(torch.float32).contiguous()
    wf = [t.to(device=x.device, dtype=torch.float32).contiguous() for t in (wh, ww)]
    return impl(xf, *wf).reshape(x.shape).to(x.dtype)


circular_conv_sep = define_op("circular_conv_sep", "(Tensor x, Tensor wh, Tensor ww) -> Tensor", conv_reference,
                              _conv_fake, _conv_adapter)


def _conv_setup(ctx, inputs, output):
    ctx.taps = inputs[1], inputs[2]


def _conv_backward(ctx, grad):
    wh, ww = ctx.taps  # adjoint of a correlation: the reversed taps (the same taps when symmetric)
    return circular_conv_sep(grad.contiguous(), wh.flip(0), ww.flip(0)), None, None


torch.library.register_autograd("zsqfast::circular_conv_sep", _conv_backward, setup_context=_conv_setup)


def _sepfft_native() -> bool:
    """True when fft_filter_sep would run its C++ kernel now (the extension is loaded and the requested
    backend is auto or cpp); otherwise its reference is an rfft2 and the older crossovers apply."""
    return _native_for(_backend.get_backend())


@functools.lru_cache(maxsize=8)
def _native_for(backend: str) -> bool:
    # cached per requested backend: the extension loads once per process, so the answer cannot change
    return backend in ("auto", "cpp") and _backend.unavailable_reason("cpp", "cpu", "fft_filter_sep") is None


def auto_method(h: int, w: int, d0: float, device: str = "cpu", dtype: torch.dtype = torch.float32) -> str:
    """What ``method="auto"`` runs for (H, W, d0) on ``device`` and images of ``dtype``: banded, sepfft,
    circulant or rfft (module docstring). The sepfft kernel is fp32 (bf16 / fp16 are converted to it); fp64
    images take the older crossovers, since sepfft would run its rfft2 reference for them."""
    if len(band_taps(h, d0)) + len(band_taps(w, d0)) <= BANDED_FRACTION * (h + w):
        return "banded"
    if (str(device).partition(":")[0] == "cpu" and dtype != torch.float64 and supported_length(h)
            and supported_length(w) and _sepfft_native()):
        return "sepfft"
    return "rfft" if h + w > RFFT_MIN_SIZE else "circulant"


def check_images(x: torch.Tensor, what: str) -> None:
    """A float (..., H, W) tensor with H, W >= 1 (the filters and spectra act on the last two dims)."""
    check_input(x)
    if x.dim() < 2 or 0 in x.shape[-2:]:
        raise ValueError(f"{what} needs (..., H, W) images with H, W >= 1, got shape {tuple(x.shape)}")


def gaussian_lowpass(x: torch.Tensor, d0: float, *, method: str = "auto") -> torch.Tensor:
    """SynQ's low-pass filter of a batch of images.

    Args:
        x: float (B, C, H, W) (any leading dims; the filter acts on the last two, H, W >= 1), any strides.
        d0: cutoff in DFT bins (SynQ's ``--d_zero``, default 80), > 0.
        method: ``"banded"`` (separable circular convolution with the kernel's significant taps),
            ``"sepfft"`` (own separable FFT kernel), ``"circulant"`` (two dense real matmuls), ``"rfft"``
            (half-spectrum FFT), ``"fft"`` (the official reference) or ``"auto"`` (banded when the kernels are
            narrow enough, see BANDED_FRACTION, else sepfft on the CPU, else circulant for small images and
            rfft for large ones, see RFFT_MIN_SIZE).
    Returns:
        Tensor like x (contiguous). Every method is within 1e-5 of the reference in fp32 for |x| <~ 10.
        A NaN / Inf pixel spreads over its whole plane in "fft", "sepfft" and "circulant" but only over the band
        (+-r pixels) in "banded"; SynQ applies ``nan_to_num`` after the filter either way.
    """
    check_images(x, "gaussian_lowpass")
    if not d0 > 0:
        raise ValueError(f"d0 must be positive, got {d0}")
    if method not in ("auto", "banded", "sepfft", "circulant", "rfft", "fft"):
        raise ValueError(f"method must be 'auto', 'banded', 'sepfft', 'circulant', 'rfft' or 'fft', got {method!r}")
    if method == "fft":
        return reference(x, d0)
    h, w = x.shape[-2:]
    method = auto_method(h, w, float(d0), x.device.type, x.dtype) if method == "auto" else method
    ct = torch.float64 if x.dtype == torch.float64 else torch.float32
    if method == "sepfft":
        g_h, g_w = (fft_mask_1d(n, float(d0), ct, str(x.device)) for n in (h, w))
        return fft_filter_sep(x, g_h, g_w)
    if method == "banded":
        t_h, t_w = band_taps(h, float(d0)), band_taps(w, float(d0))
        return circular_conv_sep(x, t_h.to(device=x.device, dtype=ct), t_w.to(device=x.device, dtype=ct))
    if method == "rfft":
        spec = torch.fft.rfft2(x.to(ct)) * rfft_mask(h, w, float(d0), ct, str(x.device))
        return torch.fft.irfft2(spec, s=(h, w)).to(x.dtype)
    a_h = circulant(h, float(d0), ct, str(x.device))
    a_w = circulant(w, float(d0), ct, str(x.device))
    y = torch.matmul(x.to(ct), a_w.t())                       # rows:    X A_W^T
    y = torch.matmul(a_h, y)                                  # columns: A_H (X A_W^T)
    return y.to(x.dtype)


def amplitude_spectrum(x: torch.Tensor, num_bins: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Radial amplitude distribution (SynQ Fig. 5): mean |fftshift(fft2(x))| per integer radius.

    Args:
        x: float (B, C, H, W) (any leading dims, H, W >= 1). num_bins: radii 0..num_bins-1 (default:
            min(H, W) // 2 + 1).
    Returns:
        ``(radius float (R,), mean amplitude float64 (R,))`` averaged over samples, channels and the bins of
        each ring.
    """
    check_images(x, "amplitude_spectrum")
    h, w = x.shape[-2:]
    amp = torch.fft.fftshift(torch.fft.fft2(x.double()), dim=(-2, -1)).abs()
    if x.dim() > 2:  # (mean over dim=() would reduce every dim of a single (H, W) image)
        amp = amp.mean(dim=tuple(range(x.dim() - 2)))
    yy = torch.arange(h, dtype=torch.float64)[:, None] - h // 2
    xx = torch.arange(w, dtype=torch.float64)[None, :] - w // 2
    r = torch.sqrt(yy * yy + xx * xx).round().long()
    nb = num_bins or min(h, w) // 2 + 1
    sel = r < nb
    total = torch.zeros(nb, dtype=torch.float64).index_add_(0, r[sel], amp[sel])
    count = torch.zeros(nb, dtype=torch.float64).index_add_(0, r[sel], torch.ones_like(amp[sel]))
    return torch.arange(nb, dtype=torch.float64), total / count.clamp(min=1)
