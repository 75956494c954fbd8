"""gaussian_lowpass: banded (C++ / Triton / reference op) and circulant fast paths against the official FFT
reference; the tap selection; the circular_conv_sep op itself (opcheck, gradient); amplitude spectrum."""
import pytest
import torch

import zsqfast
from zsqfast.ops import lowpass as lp
from zsqfast.ops.lowpass import amplitude_spectrum, band_taps, gaussian_lowpass

from .conftest import cpu_backends

BACKENDS = cpu_backends("circular_conv_sep")
SIZES = [(8, 8), (9, 13), (32, 32), (31, 64), (224, 224), (225, 224)]
D0S = [1.0, 4.0, 20.0, 80.0]


@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("d0", D0S)
@pytest.mark.parametrize("method", ["banded", "sepfft", "circulant", "rfft"])
def test_fast_paths_match_fft_reference(size, d0, method):
    x = torch.randn(2, 3, *size) * 2
    ref = gaussian_lowpass(x, d0, method="fft")
    assert (gaussian_lowpass(x, d0, method=method) - ref).abs().max() <= 1e-5


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("size,d0", [((8, 8), 2.0), ((13, 9), 80.0), ((31, 64), 4.0), ((64, 64), 20.0),
                                     ((100, 37), 10.0), ((224, 224), 20.0)])
def test_banded_backends(backend, size, d0):
    if backend == "triton" and size[0] * size[1] > 2048:
        pytest.skip("large planes are slow under the Triton interpreter")
    x = torch.randn(2, 3, *size) * 2
    ref = gaussian_lowpass(x, d0, method="fft")
    with zsqfast.use_backend(backend):
        got = gaussian_lowpass(x, d0, method="banded")
    assert got.shape == x.shape and got.dtype == x.dtype
    assert (got - ref).abs().max() <= 1e-5


def test_cpp_every_isa(cpu_isa):
    x = torch.randn(2, 3, 37, 45) * 2       # widths with vector tails at every ISA
    ref = gaussian_lowpass(x, 8.0, method="fft")
    with zsqfast.use_backend("cpp"):
        assert (gaussian_lowpass(x, 8.0, method="banded") - ref).abs().max() <= 1e-5


@pytest.mark.parametrize("backend", BACKENDS)
def test_banded_non_contiguous_and_low_precision(backend):
    base = torch.randn(3, 40, 2, 33)
    x = base.permute(0, 2, 1, 3)[:, :, ::2, 1:]   # (3, 2, 20, 32), strided
    ref = gaussian_lowpass(x.contiguous(), 6.0, method="fft")
    with zsqfast.use_backend(backend):
        assert (gaussian_lowpass(x, 6.0, method="banded") - ref).abs().max() <= 1e-5
        h = gaussian_lowpass(x.to(torch.bfloat16), 6.0, method="banded")
    assert h.dtype == torch.bfloat16 and (h.float() - ref).abs().max() <= 0.05


def test_tap_selection_reads_the_kernel_decay():
    # the mask has decayed at Nyquist: a short band (21 taps at 224, d0 = 20) holds all but 1e-7 of it
    t = band_taps(224, 20.0)
    assert len(t) == 21 and torch.allclose(t, t.flip(0))
    c = lp.kernel_1d(224, 20.0)
    assert c.abs().sum() - t.abs().sum() <= lp.TAP_TOL
    # wide kernels fall back to every offset: small d0 (wide spatial Gaussian) and the default d0 = 80 at 224,
    # where the mask is still 0.375 at Nyquist and the kernel decays like 1/k^2
    for n, d0 in ((224, 1.0), (224, 80.0), (32, 80.0), (9, 3.0)):
        t = band_taps(n, d0)
        assert len(t) == n + 1 - n % 2
        assert torch.allclose(t.sum(), torch.tensor(1.0, dtype=torch.float64))  # DC gain 1: nothing dropped
    # auto: banded only when it is cheaper; wide kernels on the CPU: the separable FFT kernel
    x = torch.randn(1, 1, 224, 224)
    assert torch.equal(gaussian_lowpass(x, 20.0), gaussian_lowpass(x, 20.0, method="banded"))
    small = torch.randn(2, 3, 32, 32)
    want = "sepfft" if lp._sepfft_native() else None  # without the C++ kernel: the older crossovers (below)
    for t in (x, small):
        chosen = lp.auto_method(*t.shape[-2:], 80.0)
        assert chosen == (want or ("rfft" if t.shape[-1] > 128 else "circulant"))
        assert torch.equal(gaussian_lowpass(t, 80.0), gaussian_lowpass(t, 80.0, method=chosen))
    # sizes with a prime factor past the FFT kernel's radices, and other devices: the older crossovers
    assert lp.auto_method(67, 67, 80.0) == "circulant" and lp.auto_method(134, 134, 80.0) == "rfft"
    assert lp.auto_method(224, 224, 80.0, "cuda") == "rfft" and lp.auto_method(32, 32, 80.0, "cuda") == "circulant"
    # fp64 images: sepfft would run its rfft2 reference, so the older crossovers apply (and the result is fp64)
    assert lp.auto_method(32, 32, 80.0, "cpu", torch.float64) == "circulant"
    assert lp.auto_method(224, 224, 80.0, "cpu", torch.float64) == "rfft"
    x64 = small.double()
    assert torch.equal(gaussian_lowpass(x64, 80.0), gaussian_lowpass(x64, 80.0, method="circulant"))
    with zsqfast.use_backend("reference"):  # no C++ kernel in use: sepfft would be its rfft2 reference
        assert lp.auto_method(32, 32, 80.0) == "circulant" and lp.auto_method(224, 224, 80.0) == "rfft"


@pytest.mark.parametrize("backend", BACKENDS)
def test_circular_conv_sep_op(backend):
    x = torch.randn(2, 3, 11, 17)
    wh, ww = torch.tensor([0.1, 0.3, 0.2, 0.3, 0.1]), torch.tensor([0.25, 0.5, 0.25])
    want = lp.conv_reference(x.double(), wh.double(), ww.double()).float()
    with zsqfast.use_backend(backend):
        got = lp.circular_conv_sep(x, wh, ww)
    assert (got - want).abs().max() <= 1e-6
    long, x3 = torch.rand(9), x[:, :, :3]  # 9 taps on a 3-row axis: offsets wrap more than once
    with zsqfast.use_backend(backend):
        got3 = lp.circular_conv_sep(x3, long, ww)
    want3 = sum(long[a] * torch.roll(x3.double(), 4 - a, dims=-2) for a in range(9))
    want3 = sum(ww[b] * torch.roll(want3, 1 - b, dims=-1) for b in range(3))
    assert (got3 - want3.float()).abs().max() <= 1e-5
    # reference semantics spelled out once: out[i, j] = sum wh[a] ww[b] x[(i + a - 2) % H, (j + b - 1) % W]
    i, j = 0, 16
    direct = sum(wh[a] * ww[b] * x[1, 2, (i + a - 2) % 11, (j + b - 1) % 17] for a in range(5) for b in range(3))
    assert abs(float(want[1, 2, i, j]) - float(direct)) < 1e-5


def test_circular_conv_sep_opcheck_and_gradient():
    x = torch.randn(2, 9, 7, dtype=torch.float64, requires_grad=True)
    wh, ww = torch.tensor([0.2, 0.6, 0.2], dtype=torch.float64), torch.tensor([0.1, 0.2, 0.4, 0.2, 0.1], dtype=torch.float64)
    torch.autograd.gradcheck(lambda t: lp.circular_conv_sep(t, wh, ww), (x,))
    torch.library.opcheck(lp.circular_conv_sep, (torch.randn(3, 8, 8), wh.float(), ww.float()))
    xf = torch.randn(3, 10, 12, requires_grad=True)
    gaussian_lowpass(xf, 3.0, method="banded").square().sum().backward()
    xr = xf.detach().double().requires_grad_(True)
    gaussian_lowpass(xr, 3.0, method="fft").square().sum().backward()
    assert (xf.grad - xr.grad).abs().max() <= 1e-4


def test_reference_is_the_official_formula_fp64():
    x = torch.randn(2, 3, 10, 7, dtype=torch.float64)
    h, w, d0 = 10, 7, 3.0
    spec = torch.fft.fftshift(torch.fft.fft2(x), dim=(-2, -1))
    u = torch.arange(h)[:, None] - h // 2
    v = torch.arange(w)[None, :] - w // 2
    mask = torch.exp(-(u**2 + v**2).double() / (2 * d0**2))
    want = torch.fft.ifft2(torch.fft.ifftshift(spec * mask, dim=(-2, -1))).real
    for method in ("fft", "circulant", "banded", "sepfft", "rfft"):
        assert torch.allclose(gaussian_lowpass(x, d0, method=method), want, atol=1e-12)


def test_dc_gain_one_and_smoothing():
    x = torch.full((1, 1, 16, 16), 3.0)
    assert torch.allclose(gaussian_lowpass(x, 1.0), x, atol=1e-6)
    noise = torch.randn(4, 3, 32, 32)
    r, before = amplitude_spectrum(noise)
    _, after = amplitude_spectrum(gaussian_lowpass(noise, 4.0))
    assert after[-1] < 0.01 * before[-1] and abs(after[0] / before[0] - 1) < 1e-6


def test_errors():
    with pytest.raises(ValueError, match="d0"):
        gaussian_lowpass(torch.randn(1, 1, 4, 4), 0.0)
    with pytest.raises(ValueError, match="method"):
        gaussian_lowpass(torch.randn(1, 1, 4, 4), 1.0, method="dct")
    with pytest.raises(TypeError):
        gaussian_lowpass(torch.ones(1, 1, 4, 4, dtype=torch.int64), 1.0)


def test_empty_planes_and_low_dim_errors():
    for shape in [(1, 1, 0, 8), (2, 3, 8, 0), (8,)]:
        with pytest.raises(ValueError, match="H, W >= 1"):
            gaussian_lowpass(torch.randn(shape), 3.0)
    for shape in [(8,), (1, 0, 4)]:
        with pytest.raises(ValueError, match="H, W >= 1"):
            amplitude_spectrum(torch.randn(shape))
    x = torch.randn(9, 8, dtype=torch.float64)
    r2, a2 = amplitude_spectrum(x)  # one (H, W) image: its own spectrum
    r4, a4 = amplitude_spectrum(x[None, None])
    assert torch.equal(r2, r4) and torch.allclose(a2, a4, rtol=1e-12)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_fft_reference_half_precision_on_cpu(dtype):
    """torch.fft has no CPU half kernels: the reference runs in fp32 and casts back (as the other methods)."""
    x = torch.randn(2, 3, 9, 8).to(dtype)
    y = gaussian_lowpass(x, 3.0, method="fft")
    assert y.dtype == dtype and torch.equal(y, gaussian_lowpass(x.float(), 3.0, method="fft").to(dtype))
    assert torch.allclose(y.float(), gaussian_lowpass(x, 3.0, method="circulant").float(), atol=2e-2)
