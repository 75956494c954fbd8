"""fake_quantize: reference semantics, every available backend against it (exact), STE gradients, errors."""
import numpy as np
import pytest
import torch

import zsqfast
from zsqfast.ops import fake_quantize as fq_mod
from zsqfast.ops._common import qrange

from ._shapes import awkward_inputs, with_ties
from .conftest import cpu_backends

BACKENDS = cpu_backends("fake_quant")
CASES = awkward_inputs()


def _params(x, axis, bits, symmetric):
    scale, zp = zsqfast.minmax_qparams(x, bits, axis=axis, symmetric=symmetric)
    return scale, (None if symmetric else zp)


def _run(backend, x, scale, zp, bits, axis, ste, symmetric):
    """Forward + backward through the public API on ``backend``; returns (out, grad_x)."""
    xr = x.detach().clone().requires_grad_(True)
    with zsqfast.use_backend(backend):
        out = zsqfast.fake_quantize(xr, scale, zp, bits, axis=axis, ste=ste, symmetric=symmetric)
        g = torch.randn(out.shape, generator=torch.Generator().manual_seed(1)).to(out.dtype)
        out.backward(g)
    return out.detach(), xr.grad


def test_reference_equals_torch_fused_ops():
    """The reference is bit-identical to PyTorch's own fused fake-quant ops where those apply."""
    x = torch.randn(8, 6, 5, 4) * 2
    for bits in range(2, 9):
        s, zp = zsqfast.minmax_qparams(x, bits, axis=1)
        zp_ok = zp.clamp(0, 2**bits - 1)  # torch's op requires the zero point inside the grid
        ours = zsqfast.fake_quantize(x, s, zp_ok, bits, axis=1)
        theirs = torch.fake_quantize_per_channel_affine(x, s, zp_ok.int(), 1, 0, 2**bits - 1)
        assert torch.equal(ours, theirs)
        st, zt = zsqfast.minmax_qparams(x, bits)
        ours = zsqfast.fake_quantize(x, st, zt, bits)
        theirs = torch.fake_quantize_per_tensor_affine(x, float(st), int(zt), 0, 2**bits - 1)
        assert torch.equal(ours, theirs)


def test_zeroq_grid():
    """minmax_qparams + fake_quantize reproduce the ZeroQ-lineage quantizer (up to the fp32 reciprocal)."""
    x = torch.randn(16, 50, dtype=torch.float64) * 3
    for bits in (2, 3, 4, 8):
        n = 2**bits - 1
        mn, mx = x.amin(1, keepdim=True), x.amax(1, keepdim=True)
        s = n / (mx - mn).clamp(min=1e-8)
        zp = torch.round(s * mn) + 2 ** (bits - 1)
        q = torch.clamp(torch.round(s * x - zp), -(2 ** (bits - 1)), 2 ** (bits - 1) - 1)
        zeroq = (q + zp) / s
        scale, z = zsqfast.minmax_qparams(x, bits, axis=0)
        ours = zsqfast.fake_quantize(x, scale, z, bits, axis=0)
        assert torch.allclose(ours, zeroq, atol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name,x,axis", CASES, ids=[c[0] for c in CASES])
@pytest.mark.parametrize("bits", [3, 4])
@pytest.mark.parametrize("ste", ["identity", "clipped"])
def test_backend_matches_reference_awkward(backend, name, x, axis, bits, ste):
    scale, zp = _params(x, axis, bits, False)
    scale = scale * 0.7  # shrink the range so some values clamp
    xt = with_ties(x, scale, axis)
    want = _run("reference", xt, scale, zp, bits, axis, ste, False)
    got = _run(backend, xt, scale, zp, bits, axis, ste, False)
    assert got[0].stride() == want[0].stride()
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("bits", range(2, 9))
@pytest.mark.parametrize("symmetric", [False, True])
@pytest.mark.parametrize("axis", [None, 1])
def test_backend_matches_reference_every_bits(backend, bits, symmetric, axis):
    x = torch.randn(5, 37, 9) * 2
    scale, zp = _params(x, axis, bits, symmetric)
    for ste in ("identity", "clipped"):
        want = _run("reference", x, scale * 0.8, zp, bits, axis, ste, symmetric)
        got = _run(backend, x, scale * 0.8, zp, bits, axis, ste, symmetric)
        assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_backend_half_precision(backend, dtype):
    for name, x, axis in awkward_inputs(dtype)[:6]:
        scale, zp = _params(x, axis, 4, False)
        want = _run("reference", x, scale, zp, 4, axis, "clipped", False)
        got = _run(backend, x, scale, zp, 4, axis, "clipped", False)
        assert got[0].dtype == dtype
        assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1]), name


@pytest.mark.parametrize("backend", BACKENDS)
def test_ties_round_half_to_even(backend):
    scale = torch.tensor([0.125])
    x = torch.tensor([0.5, 1.5, 2.5, -0.5, -1.5, -2.5, 3.5, 0.49999997]) * 0.125
    with zsqfast.use_backend(backend):
        out = zsqfast.fake_quantize(x, scale, torch.tensor([8.0]), 5)
    want = torch.tensor([0.0, 2.0, 2.0, 0.0, -2.0, -2.0, 4.0, 0.0]) * 0.125
    assert torch.equal(out, want)


@pytest.mark.parametrize("backend", BACKENDS)
def test_nan_inf(backend):
    """NaN propagates (clipped gradient 0); +-Inf saturate to the ends of the grid (gradient 0)."""
    x = torch.tensor([float("nan"), float("inf"), -float("inf"), 0.3, 100.0] * 7)
    s, zp = torch.tensor([0.1]), torch.tensor([3.0])
    out, grad = _run(backend, x, s, zp, 4, None, "clipped", False)
    lo, hi = (0 - 3) * 0.1, (15 - 3) * 0.1
    assert torch.isnan(out[0]) and out[1].item() == pytest.approx(hi) and out[2].item() == pytest.approx(lo)
    assert out[4].item() == pytest.approx(hi)
    assert grad[0] == 0 and grad[1] == 0 and grad[2] == 0 and grad[3] != 0 and grad[4] == 0
    want = _run("reference", x, s, zp, 4, None, "clipped", False)
    assert torch.equal(out, want[0]) is False  # NaN != NaN: compare with equal_nan instead
    assert torch.allclose(out, want[0], equal_nan=True, rtol=0, atol=0) and torch.equal(grad, want[1])


def test_ste_formulas_fp64():
    """fp64 reference gradients equal autograd of the textbook STE formulas, element for element.

    (torch.autograd.gradcheck cannot apply: an STE is by design not the derivative of round, whose finite
    differences are 0; so the autograd formula is checked against the naive STE written with detach().)"""
    x = (torch.randn(6, 7, 5, dtype=torch.float64) * 2).requires_grad_(True)
    scale, zp = zsqfast.minmax_qparams(x, 3, axis=1)
    scale64, zp64 = (scale * 0.6).double().view(1, -1, 1), zp.double().view(1, -1, 1)
    g = torch.randn(6, 7, 5, dtype=torch.float64)
    for ste in ("identity", "clipped"):
        out = zsqfast.fake_quantize(x, scale * 0.6, zp, 3, axis=1, ste=ste)
        (gx,) = torch.autograd.grad(out, x, g)
        xn = x.detach().clone().requires_grad_(True)
        q = torch.round(xn / scale64) + zp64
        hard = (torch.clamp(q, 0, 7) - zp64) * scale64
        inside = ((q >= 0) & (q <= 7)).to(x.dtype) if ste == "clipped" else 1.0
        naive = xn * inside + (hard - xn * inside).detach()
        (gn,) = torch.autograd.grad(naive, xn, g)
        assert out.dtype == torch.float64 and torch.allclose(out, hard, atol=1e-12)
        assert torch.equal(gx, gn)


@pytest.mark.parametrize("backend", BACKENDS)
def test_opcheck(backend):
    x = torch.randn(4, 6, 5)
    s, zp = zsqfast.minmax_qparams(x, 4, axis=1)
    cl = torch.randn(2, 3, 4, 5).contiguous(memory_format=torch.channels_last)
    with zsqfast.use_backend(backend):
        for need_mask in (False, True):
            torch.library.opcheck(fq_mod.fake_quant, (x.requires_grad_(), s, zp, 0, 15, 1, need_mask))
            torch.library.opcheck(fq_mod.fake_quant, (cl, torch.tensor([0.1]), torch.tensor([2.0]), -8, 7, None, need_mask))
        _, mask = fq_mod.fake_quant(x.detach(), s, zp, 0, 15, 1, True)
        torch.library.opcheck(fq_mod.fake_quant_backward, (torch.randn(4, 6, 5), mask))


def test_torch_compile():
    def f(x, s, zp):
        return zsqfast.fake_quantize(x, s, zp, 4, axis=0, ste="clipped") * 2

    x = torch.randn(16, 33)
    s, zp = zsqfast.minmax_qparams(x, 4, axis=0)
    compiled = torch.compile(f, backend="aot_eager", fullgraph=True)
    assert torch.equal(compiled(x, s, zp), f(x, s, zp))


def test_numpy_integer_bits():
    x = torch.randn(5)
    assert torch.equal(zsqfast.fake_quantize(x, 0.1, 3, np.int64(4)), zsqfast.fake_quantize(x, 0.1, 3, 4))
    assert qrange(np.int32(3), True) == (-4, 3) and type(qrange(np.int64(4), False)[1]) is int


@pytest.mark.parametrize("backend", BACKENDS)
def test_zero_point_must_be_integer_valued(backend):
    """The C++ kernel truncates a fractional zero point, the reference would not: an error either way."""
    x = torch.randn(3, 4)
    with zsqfast.use_backend(backend):
        want = zsqfast.fake_quantize(x, 0.1, torch.tensor([3, -2, 0, 7]), 4, axis=1)
        assert torch.equal(zsqfast.fake_quantize(x, 0.1, torch.tensor([3.0, -2.0, 0.0, 7.0]), 4, axis=1), want)
        for bad in (0.5, torch.tensor([3.0, 2.5, 0.0, 7.0]), float("nan"), float("inf")):
            with pytest.raises(ValueError, match="zero_point must hold integer values"):
                zsqfast.fake_quantize(x, 0.1, bad, 4, axis=1)


@pytest.mark.parametrize("bits", [1, 9, 0, 4.0, True, "4"])
def test_bad_bits(bits):
    with pytest.raises(ValueError, match="bits"):
        zsqfast.fake_quantize(torch.randn(4), 0.1, 0, bits)


def test_bad_inputs():
    x = torch.randn(3, 4)
    with pytest.raises(TypeError, match="float"):
        zsqfast.fake_quantize(torch.ones(3, dtype=torch.int32), 0.1, 0, 4)
    with pytest.raises(ValueError, match="expected 4"):
        zsqfast.fake_quantize(x, torch.ones(3), torch.zeros(3), 4, axis=1)
    with pytest.raises(ValueError, match="axis"):
        zsqfast.fake_quantize(x, 0.1, 0, 4, axis=2)
    with pytest.raises(ValueError, match="ste"):
        zsqfast.fake_quantize(x, 0.1, 0, 4, ste="clip")
    with pytest.raises(ValueError, match="positive"):
        zsqfast.fake_quantize(x, -0.1, 0, 4)
    with pytest.raises(ValueError, match="positive"):
        zsqfast.fake_quantize(x, float("nan"), 0, 4)
    with pytest.raises(ValueError, match="zero point"):
        zsqfast.fake_quantize(x, 0.1, 3, 4, symmetric=True)
    with pytest.raises(ValueError, match="NaN"):
        zsqfast.minmax_qparams(torch.tensor([1.0, float("nan")]), 4)


def test_minmax_qparams_shapes_and_symmetric():
    x = torch.randn(5, 8, 3)
    s, z = zsqfast.minmax_qparams(x, 4, axis=1)
    assert s.shape == (8,) and z.shape == (8,) and s.dtype == torch.float32
    assert torch.equal(z, torch.round(z))
    s, z = zsqfast.minmax_qparams(x, 4, symmetric=True)
    assert s.shape == (1,) and float(z) == 0.0
    assert torch.allclose(s, x.abs().max() / 7)
    lo, hi = qrange(4, True)
    out = zsqfast.fake_quantize(x, s, None, 4, symmetric=True)
    assert (out / s).round().min() >= lo and (out / s).round().max() <= hi
