"""lsq_fake_quantize: the step gradient against autograd of the naive LSQ formula; backends against the
reference."""
import math

import pytest
import torch

import zsqfast
from zsqfast.ops import lsq as lsq_mod

from ._shapes import awkward_inputs
from .conftest import cpu_backends

BACKENDS = cpu_backends("lsq_fake_quant")


def _naive(x, step, qmin, qmax, axis, grad_scale):
    """LSQ as papers write it: round with a straight-through estimator, step gradient scaled by g."""
    shape = [1] * x.dim()
    if axis is not None:
        shape[axis] = -1
    s = step.reshape(shape)
    s = s * grad_scale + (s - s * grad_scale).detach()  # value s, gradient scaled by g
    v = torch.clamp(x / s, qmin, qmax)
    return (v + (torch.round(v) - v).detach()) * s


def _init_step(x, axis, qmax):
    axis = None if axis is None else axis % x.dim()
    dims = [d for d in range(x.dim()) if d != axis]
    m = x.detach().abs().float().mean(dim=dims) if dims else x.detach().abs().float()
    return (2 * m / math.sqrt(qmax)).reshape(-1)


@pytest.mark.parametrize("signed", [True, False])
@pytest.mark.parametrize("axis", [None, 0, 2])
def test_reference_against_naive_autograd_fp64(signed, axis):
    x = (torch.randn(6, 5, 7, dtype=torch.float64) * 2).requires_grad_(True)
    qmin, qmax = zsqfast.ops._common.qrange(3, signed)
    step = _init_step(x, axis, qmax).double().requires_grad_(True)
    g = torch.randn_like(x)
    out = zsqfast.lsq_fake_quantize(x, step, 3, signed=signed, axis=axis)
    gx, gs = torch.autograd.grad(out, (x, step), g)
    xn, sn = x.detach().clone().requires_grad_(True), step.detach().clone().requires_grad_(True)
    n = x.numel() // step.numel()
    naive = _naive(xn, sn, qmin, qmax, axis, 1.0 / math.sqrt(n * qmax))
    gxn, gsn = torch.autograd.grad(naive, (xn, sn), g)
    assert torch.allclose(out, naive, atol=1e-12)
    assert torch.allclose(gx, gxn, rtol=1e-12, atol=0)  # s * (1/s) is not exactly 1 in the naive form
    assert torch.allclose(gs, gsn, rtol=1e-10, atol=1e-12)


def _run(backend, x, step, bits, axis, signed):
    xr, sr = x.detach().clone().requires_grad_(True), step.detach().clone().requires_grad_(True)
    with zsqfast.use_backend(backend):
        out = zsqfast.lsq_fake_quantize(xr, sr, bits, signed=signed, axis=axis)
        out.backward(torch.randn(out.shape, generator=torch.Generator().manual_seed(2)).to(out.dtype))
    return out.detach(), xr.grad, sr.grad


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name,x,axis", awkward_inputs(), ids=[c[0] for c in awkward_inputs()])
@pytest.mark.parametrize("bits,signed", [(2, True), (3, False), (4, True), (8, False)])
def test_backend_matches_reference(backend, name, x, axis, bits, signed):
    step = _init_step(x, axis, 2 ** (bits - 1))
    want = _run("reference", x, step, bits, axis, signed)
    got = _run(backend, x, step, bits, axis, signed)
    assert got[0].stride() == want[0].stride()
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
    assert torch.allclose(got[2], want[2], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_backend_half_precision(backend, dtype):
    x = (torch.randn(9, 31) * 2).to(dtype)
    step = _init_step(x, 0, 7)
    want, got = _run("reference", x, step, 4, 0, True), _run(backend, x, step, 4, 0, True)
    assert got[0].dtype == dtype and torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
    assert torch.allclose(got[2], want[2], rtol=1e-4, atol=1e-5)


def test_matches_torch_learnable_fake_quant():
    """Same forward as PyTorch's learnable fake-quant at zero point 0, and the same step gradient for
    every element not within half a step outside the grid (where torch rounds before its range test)."""
    x = torch.randn(4096) * 2
    scale = torch.tensor([0.3], requires_grad=True)
    zp = torch.tensor([0.0], requires_grad=True)
    x = x[((x / 0.3).abs() < 6.9) | ((x / 0.3).abs() > 8.6)]  # drop the slivers (7, 7.5), (-8.5, -8)
    ours_s = torch.tensor([0.3], requires_grad=True)
    ours = zsqfast.lsq_fake_quantize(x, ours_s, 4, signed=True, grad_scale=1.0)
    theirs = torch._fake_quantize_learnable_per_tensor_affine(x, scale, zp, -8, 7, 1.0)
    assert torch.equal(ours, theirs)
    g = torch.randn_like(x)
    ours.backward(g)
    theirs.backward(g)
    assert torch.allclose(ours_s.grad, scale.grad, rtol=1e-4)


@pytest.mark.parametrize("backend", BACKENDS)
def test_opcheck(backend):
    x = torch.randn(4, 6, 5)
    step = _init_step(x, 1, 7).requires_grad_(True)
    with zsqfast.use_backend(backend):
        torch.library.opcheck(lsq_mod.lsq_fake_quant, (x.requires_grad_(), step, -8, 7, 1, 0.1))
        torch.library.opcheck(lsq_mod.lsq_fake_quant, (x, step[:1].detach(), 0, 15, None, 0.5))
        torch.library.opcheck(lsq_mod.lsq_fake_quant_backward,
                              (torch.randn(4, 6, 5), x.detach(), step.detach(), -8, 7, 1, 0.1))


def test_errors():
    x = torch.randn(4, 5)
    with pytest.raises(ValueError, match="bits"):
        zsqfast.lsq_fake_quantize(x, torch.ones(1), 9)
    with pytest.raises(ValueError, match="expected 5"):
        zsqfast.lsq_fake_quantize(x, torch.ones(4), 4, axis=1)
    with pytest.raises(TypeError, match="step"):
        zsqfast.lsq_fake_quantize(x, 0.1, 4)


@pytest.mark.parametrize("bad", [0.0, -0.5, float("nan"), float("inf")])
def test_step_must_be_positive_and_finite(bad):
    step = torch.tensor([0.1, bad, 0.2], requires_grad=True)
    with pytest.raises(ValueError, match="step must be positive and finite"):
        zsqfast.lsq_fake_quantize(torch.randn(2, 3), step, 4, axis=1)


@pytest.mark.parametrize("backend", BACKENDS)
def test_single_element_with_expanded_gradient(backend):
    """``.sum().backward()`` of a 1-element output hands the op a stride-0 gradient."""
    x = torch.tensor([[0.33]], requires_grad=True)
    s = torch.tensor([0.1], requires_grad=True)
    with zsqfast.use_backend(backend):
        zsqfast.lsq_fake_quantize(x, s, 4).sum().backward()
    assert x.grad.item() == 1.0 and s.grad.shape == (1,) and torch.isfinite(s.grad).all()
