"""zsqfast::fft_filter_sep (the separable FFT kernel behind gaussian_lowpass(method="sepfft")) against its
torch.fft reference: awkward lengths (every radix, primes up to and past the kernel's limit), every ISA level,
random symmetric masks, strides and dtypes, the fallbacks, opcheck and the gradient."""
import pytest
import torch

import zsqfast
from zsqfast.ops import fft_filter as ff
from zsqfast.ops.lowpass import gaussian_lowpass

from .conftest import cpu_backends

BACKENDS = cpu_backends("fft_filter_sep")
# radix 8, 4, 2, 3, 5, 7, generic odd (11, 13, 61), n = 1, 2 and a prime past MAX_PRIME (67: reference)
LENGTHS = [1, 2, 3, 5, 6, 7, 8, 9, 11, 12, 13, 16, 31, 32, 33, 40, 49, 61, 67, 96, 98, 224, 225]


def sym_mask(n: int, gen: torch.Generator) -> torch.Tensor:
    """A random real mask with g[k] = g[(n - k) % n]."""
    g = torch.rand(n, generator=gen, dtype=torch.float64)
    return (g + g[(-torch.arange(n)) % n]) / 2


def fp64_reference(x, gh, gw):
    spec = torch.fft.fft2(x.double()) * (gh.double()[:, None] * gw.double()[None, :])
    return torch.fft.ifft2(spec).real


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("h", LENGTHS)
def test_matches_fp64_fft(backend, h):
    gen = torch.Generator().manual_seed(h)
    for w in (h, 8, 15, 224 if h < 64 else 1):
        x = torch.randn(2, 3, h, w, generator=gen) * 2
        gh, gw = sym_mask(h, gen).float(), sym_mask(w, gen).float()
        with zsqfast.use_backend(backend):
            got = ff.fft_filter_sep(x, gh, gw)
        assert got.shape == x.shape and got.dtype == x.dtype
        err = (got.double() - fp64_reference(x, gh, gw)).abs().max().item()
        assert err <= 1e-5, (h, w, err)


def test_every_isa(cpu_isa):
    gen = torch.Generator().manual_seed(0)
    # vector tails, partial lane groups, one row / column, two radix-8 stages (64, 512), a generic odd radix
    for h, w in ((37, 45), (32, 32), (224, 98), (17, 40), (5, 1), (1, 64), (64, 1), (512, 8), (8, 512), (61, 33)):
        x = torch.randn(3, 2, h, w, generator=gen)
        gh, gw = sym_mask(h, gen).float(), sym_mask(w, gen).float()
        with zsqfast.use_backend("cpp"):
            got = ff.fft_filter_sep(x, gh, gw)
        assert (got.double() - fp64_reference(x, gh, gw)).abs().max() <= 1e-5, (cpu_isa, h, w)


@pytest.mark.parametrize("backend", BACKENDS)
def test_strides_dtypes_and_leading_dims(backend):
    gen = torch.Generator().manual_seed(1)
    base = torch.randn(3, 40, 2, 33, generator=gen)
    x = base.permute(0, 2, 1, 3)[:, :, ::2, 1:]             # (3, 2, 20, 32), not contiguous
    gh, gw = sym_mask(20, gen).float(), sym_mask(32, gen).float()
    want = fp64_reference(x, gh, gw)
    with zsqfast.use_backend(backend):
        assert (ff.fft_filter_sep(x, gh, gw).double() - want).abs().max() <= 1e-5
        b = ff.fft_filter_sep(x.to(torch.bfloat16), gh, gw)
        d = ff.fft_filter_sep(x.double(), gh.double(), gw.double())
        one = ff.fft_filter_sep(x[0, 0], gh, gw)             # (H, W): no leading dims
    assert b.dtype == torch.bfloat16 and (b.double() - want).abs().max() <= 0.05
    assert d.dtype == torch.float64 and (d - want).abs().max() <= 1e-12
    assert (one.double() - want[0, 0]).abs().max() <= 1e-5


@pytest.mark.skipif("cpp" not in BACKENDS, reason="the C++ extension is not loaded")
def test_the_kernel_runs():
    # the op must reach the C++ kernel for the masks gaussian_lowpass builds (the adapter's symmetry check
    # passes them): bitwise equal to a direct call of the kernel, and not bitwise equal to the reference
    from zsqfast.ops.lowpass import fft_mask_1d

    x = torch.randn(4, 3, 32, 24)
    gh, gw = fft_mask_1d(32, 80.0, torch.float32, "cpu"), fft_mask_1d(24, 80.0, torch.float32, "cpu")
    with zsqfast.use_backend("cpp"):
        got = ff.fft_filter_sep(x, gh, gw)
    direct = torch.ops.zsqfast_ext.fft_filter_sep(x.reshape(-1, 32, 24), gh, gw).reshape(x.shape)
    assert torch.equal(got, direct) and not torch.equal(got, ff.reference(x, gh, gw))
    assert (got - ff.reference(x, gh, gw)).abs().max() <= 1e-5


def test_asymmetric_mask_runs_the_reference():
    x = torch.randn(2, 8, 12)
    gh, gw = torch.rand(8), torch.rand(12)                   # not symmetric: the kernel's real trick fails
    with zsqfast.use_backend("cpp" if "cpp" in BACKENDS else "reference"):
        got = ff.fft_filter_sep(x, gh, gw)
    assert torch.equal(got, ff.reference(x, gh, gw))
    assert (got.double() - fp64_reference(x, gh, gw)).abs().max() <= 1e-5   # full complex spectrum
    assert not ff._symmetric(gh) and ff._symmetric(sym_mask(12, torch.Generator()).float())


def test_kernel_checks_symmetry_on_every_call():
    """The C++ kernel checks the masks itself, so an edit the version counter does not see (.data, numpy) still
    sends an asymmetric mask to the reference."""
    x = torch.randn(2, 8, 12)
    gh, gw = sym_mask(8, torch.Generator()).float(), sym_mask(12, torch.Generator()).float()
    with zsqfast.use_backend("cpp" if "cpp" in BACKENDS else "reference"):
        first = ff.fft_filter_sep(x, gh, gw)
        gw.numpy()[1] += 0.5                                  # now asymmetric, behind autograd's back
        got = ff.fft_filter_sep(x, gh, gw)
    assert not torch.equal(got, first) and torch.equal(got, ff.reference(x, gh, gw))
    assert (got.double() - fp64_reference(x, gh, gw)).abs().max() <= 1e-5
    if "cpp" in BACKENDS:
        with pytest.raises(ValueError, match=ff.ASYMMETRIC):
            torch.ops.zsqfast_ext.fft_filter_sep(x, gh, gw)


def test_supported_length():
    assert all(ff.supported_length(n) for n in (1, 2, 32, 224, 61, 64 * 61, 3 * 5 * 7 * 11 * 13))
    assert not any(ff.supported_length(n) for n in (0, 67, 2 * 67, 127))


def test_opcheck_and_gradient():
    gen = torch.Generator().manual_seed(2)
    gh, gw = sym_mask(7, gen), sym_mask(6, gen)
    x = torch.randn(2, 7, 6, dtype=torch.float64, requires_grad=True)
    torch.autograd.gradcheck(lambda t: ff.fft_filter_sep(t, gh, gw), (x,))
    torch.library.opcheck(ff.fft_filter_sep, (torch.randn(3, 7, 6), gh.float(), gw.float()))
    torch.library.opcheck(ff.fft_filter_sep, (torch.randn(3, 7, 6, requires_grad=True), gh.float(), gw.float()))
    xf = torch.randn(3, 12, 10, requires_grad=True)          # fp32: the C++ kernel forward and backward
    ff.fft_filter_sep(xf, sym_mask(12, gen).float(),
                      sym_mask(10, gen).float()).square().sum().backward()
    assert xf.grad is not None and torch.isfinite(xf.grad).all()


def test_gradient_matches_reference_fp32():
    gen = torch.Generator().manual_seed(3)
    gh, gw = sym_mask(12, gen).float(), sym_mask(10, gen).float()
    xf = torch.randn(3, 12, 10, generator=gen, requires_grad=True)
    ff.fft_filter_sep(xf, gh, gw).square().sum().backward()
    xr = xf.detach().double().requires_grad_(True)
    fp64_reference(xr, gh, gw).square().sum().backward()
    assert (xf.grad.double() - xr.grad).abs().max() <= 1e-4


def test_errors_and_empty():
    with pytest.raises(ValueError, match="masks of length"):
        ff.fft_filter_sep(torch.randn(2, 8, 8), torch.ones(7), torch.ones(8))
    empty = torch.randn(0, 3, 8, 8)
    assert ff.fft_filter_sep(empty, torch.ones(8), torch.ones(8)).shape == empty.shape


def test_gaussian_lowpass_sepfft_is_the_official_filter():
    for size, d0 in (((32, 32), 80.0), ((224, 224), 80.0), ((9, 13), 3.0), ((31, 64), 20.0)):
        x = torch.randn(2, 3, *size) * 2
        ref = gaussian_lowpass(x, d0, method="fft")
        assert (gaussian_lowpass(x, d0, method="sepfft") - ref).abs().max() <= 1e-5
