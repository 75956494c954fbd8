"""gaussian_lowpass: the circulant fast path against the official FFT reference; amplitude spectrum."""
import pytest
import torch

import zsqfast
from zsqfast.ops.lowpass import amplitude_spectrum, gaussian_lowpass


@pytest.mark.parametrize("size", [(8, 8), (9, 13), (32, 32), (31, 64), (224, 224)])
@pytest.mark.parametrize("d0", [2.0, 20.0, 80.0])
def test_circulant_matches_fft_reference(size, d0):
    x = torch.randn(3, 3, *size) * 2
    ref = gaussian_lowpass(x, d0, method="fft")
    fast = gaussian_lowpass(x, d0)
    assert (fast - ref).abs().max() <= 1e-5


def test_reference_is_the_official_formula_fp64():
    x = torch.randn(2, 3, 10, 7, dtype=torch.float64)
    h, w, d0 = 10, 7, 3.0
    spec = torch.fft.fftshift(torch.fft.fft2(x), dim=(-2, -1))
    u = torch.arange(h)[:, None] - h // 2
    v = torch.arange(w)[None, :] - w // 2
    mask = torch.exp(-(u**2 + v**2).double() / (2 * d0**2))
    want = torch.fft.ifft2(torch.fft.ifftshift(spec * mask, dim=(-2, -1))).real
    assert torch.allclose(gaussian_lowpass(x, d0, method="fft"), want, atol=1e-12)
    assert torch.allclose(gaussian_lowpass(x, d0), want, atol=1e-12)


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
