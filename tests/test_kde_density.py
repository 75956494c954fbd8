"""zsqfast::kde_density (PSAQ-ViT's Gaussian KDE, C++ CPU kernels) against its fp64 reference: values and
gradients on awkward sizes (vector tails, several chunks), every ISA level, far-away values (exp underflow),
NaN, dtypes, opcheck, and the patch-similarity entropy built on it."""
import math

import pytest
import torch

import zsqfast
from zsqfast.ops import kde_density as kd
from zsqfast.synthesis.patch_entropy import kde_entropy

from .conftest import cpu_backends

BACKENDS = cpu_backends("kde_density")


def _case(b, m, k, seed, spread=1.0):
    g = torch.Generator().manual_seed(seed)
    v = (torch.rand(b, m, generator=g) * 2 - 1) * spread
    lo, hi = v.amin(1, keepdim=True), v.amax(1, keepdim=True)
    grid = (lo + (hi - lo) * torch.linspace(0, 1, k)).contiguous()
    return v, grid


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("b,m,k", [(1, 1, 1), (2, 15, 10), (3, 17, 7), (4, 1000, 10), (2, 8192 * 2 + 5, 10)])
@pytest.mark.parametrize("bw", [0.01, 0.3])
def test_matches_fp64_reference_and_gradient(backend, b, m, k, bw):
    v, grid = _case(b, m, k, seed=m + k)
    want = kd.reference(v.double(), grid.double(), bw)
    vr = v.double().requires_grad_(True)
    gp = torch.randn(b, k, dtype=torch.float64)
    (kd.reference(vr, grid.double(), bw) * gp).sum().backward()
    vv = v.clone().requires_grad_(True)
    with zsqfast.use_backend(backend):
        got = kd.kde_density(vv, grid, bw)
        (got * gp.float()).sum().backward()
    scale = want.abs().max().item() + 1e-30
    assert (got.double() - want).abs().max().item() <= 1e-5 * scale
    gscale = vr.grad.abs().max().item() + 1e-30
    assert (vv.grad.double() - vr.grad).abs().max().item() <= 2e-5 * gscale


def test_every_isa(cpu_isa):
    v, grid = _case(3, 1003, 10, seed=1)
    want = kd.reference(v.double(), grid.double(), 0.01)
    gp = torch.randn(3, 10)
    wgrad = kd.backward_reference(gp.double(), v.double(), grid.double(), 0.01)
    with zsqfast.use_backend("cpp"):
        got = kd.kde_density(v, grid, 0.01)
        ggot = kd.kde_density_backward(gp, v, grid, 0.01)
    assert (got.double() - want).abs().max() <= 1e-5 * want.abs().max()
    assert (ggot.double() - wgrad).abs().max() <= 2e-5 * wgrad.abs().max()


@pytest.mark.parametrize("backend", BACKENDS)
def test_underflow_nan_and_dtypes(backend):
    v = torch.tensor([[0.0, 5.0, -5.0, 1e-3] * 5])                 # far from the grid: exp underflows to 0
    grid = torch.tensor([[0.0, 0.5, 1.0]])
    with zsqfast.use_backend(backend):
        p = kd.kde_density(v, grid, 0.01)
        assert torch.allclose(p.double(), kd.reference(v.double(), grid.double(), 0.01), rtol=1e-5, atol=1e-30)
        assert p[0, 2] == 0 and p[0, 0] > 0
        bad = v.clone()
        bad[0, 3] = float("nan")
        assert torch.isnan(kd.kde_density(bad, grid, 0.01)).all()
        d = kd.kde_density(v.double(), grid.double(), 0.01)
        h = kd.kde_density(v.to(torch.bfloat16), grid, 0.01)
    assert d.dtype == torch.float64 and h.dtype == torch.float32
    assert torch.allclose(d, kd.reference(v.double(), grid.double(), 0.01))


def test_errors_opcheck_gradcheck():
    with pytest.raises(ValueError, match="bandwidth"):
        kd.kde_density(torch.rand(2, 5), torch.rand(2, 3), 0.0)
    with pytest.raises(ValueError, match="values"):
        kd.kde_density(torch.rand(2, 5), torch.rand(3, 3), 0.1)
    v, grid = _case(2, 9, 4, seed=3)
    torch.library.opcheck(kd.kde_density, (v.requires_grad_(True), grid, 0.2))
    vd = v.detach().double().requires_grad_(True)
    torch.autograd.gradcheck(lambda t: kd.kde_density(t, grid.double(), 0.2), (vd,))


def test_kde_entropy_is_psaq_formula():
    # H = trapz(-(p + 1e-4) log(p + 1e-4)) with p the KDE at 10 points over [min, max] (PSAQ-ViT), gradient through p
    g = torch.Generator().manual_seed(4)
    v = torch.rand(3, 500, generator=g).requires_grad_(True)
    got = kde_entropy(v, 0.01, 10)
    vd = v.detach().double().requires_grad_(True)
    lo, hi = vd.detach().amin(1, keepdim=True), vd.detach().amax(1, keepdim=True)
    t = lo + (hi - lo) * torch.linspace(0, 1, 10, dtype=torch.float64)
    z = (t.unsqueeze(2) - vd.unsqueeze(1)) / 0.01
    p = torch.exp(-0.5 * z * z).mean(2) / (0.01 * math.sqrt(2 * math.pi))
    want = torch.trapezoid(-(p + 1e-4) * torch.log(p + 1e-4), t, dim=1)
    assert torch.allclose(got.double(), want, rtol=1e-4, atol=1e-6)  # fp32 grid, log and trapezoid
    got.sum().backward()
    want.sum().backward()
    assert (v.grad.double() - vd.grad).abs().max() <= 1e-4 * vd.grad.abs().max()
    # grid="batch": one grid over the whole batch's [min, max] (PSAQ-ViT's generate_data.py)
    w = v.detach() * torch.tensor([[1.0], [0.5], [0.25]])
    tb = w.double().min() + (w.double().max() - w.double().min()) * torch.linspace(0, 1, 10, dtype=torch.float64)
    zb = (tb.view(1, -1, 1) - w.double().unsqueeze(1)) / 0.01
    pb = torch.exp(-0.5 * zb * zb).mean(2) / (0.01 * math.sqrt(2 * math.pi))
    want_b = torch.trapezoid(-(pb + 1e-4) * torch.log(pb + 1e-4), tb.expand(3, -1), dim=1)
    assert torch.allclose(kde_entropy(w, 0.01, 10, grid="batch").double(), want_b, rtol=1e-4, atol=1e-6)
    assert not torch.allclose(kde_entropy(w, 0.01, 10).double(), want_b, rtol=1e-3)
    with pytest.raises(ValueError, match="grid"):
        kde_entropy(w, grid="row")


def test_grid_gradient_double_backward_and_isa_sizes(cpu_isa):
    # the grid's gradient (reference formula), a clear error for double backward, and small / multi-chunk rows
    # on every ISA level, with exponents below the -87 cutoff giving the same zeros everywhere
    for m in (1, 7, 15, 17, 8192 + 9):
        v, grid = _case(2, m, 5, seed=m)
        gp = torch.randn(2, 5, dtype=torch.float64)
        vr, tr = v.double().requires_grad_(True), grid.double().requires_grad_(True)
        (kd.reference(vr, tr, 0.05) * gp).sum().backward()
        vv, tt = v.clone().requires_grad_(True), grid.clone().requires_grad_(True)
        with zsqfast.use_backend("cpp"):
            (kd.kde_density(vv, tt, 0.05) * gp.float()).sum().backward()
        assert (vv.grad.double() - vr.grad).abs().max() <= 2e-5 * (vr.grad.abs().max() + 1e-30)
        assert (tt.grad.double() - tr.grad).abs().max() <= 2e-5 * (tr.grad.abs().max() + 1e-30)
    far = torch.full((1, 33), 13.3)                     # z^2 / 2 ~ 88.4 at bw 1: below the cutoff
    with zsqfast.use_backend("cpp"):
        assert torch.equal(kd.kde_density(far, torch.zeros(1, 2), 1.0), torch.zeros(1, 2))
    x = torch.rand(1, 20, requires_grad=True)
    gv, = torch.autograd.grad(kd.kde_density(x, torch.rand(1, 3), 0.1).sum(), x, create_graph=True)
    with pytest.raises(RuntimeError, match="double backward"):
        gv.sum().backward()
