"""zsqfast::cam_mse (SynQ's fused CAM-alignment loss): the C++ CPU kernel against the pure-PyTorch reference
(forward and dL/dA) on awkward shapes, flat maps, exact ties, non-contiguous inputs, NaN, every ISA level;
opcheck; gradcheck in float64 (the reference); the upsample tables against F.interpolate."""
import pytest
import torch
import torch.nn.functional as F

import zsqfast
from zsqfast.finetune.cam_loss import cam_mse
from zsqfast.finetune.gradcam import finish_map
from zsqfast.ops import cam_mse as op

from .conftest import cpu_backends

pytestmark = pytest.mark.skipif("cpp" not in cpu_backends("cam_mse"), reason="the C++ extension is not loaded")


def _loss_and_grad(backend, a, alpha, t):
    a = a.detach().requires_grad_(True)
    with zsqfast.use_backend(backend):
        loss = cam_mse(a, alpha, t)
        (g,) = torch.autograd.grad(loss, a)
    return loss, g


def _compare(a, alpha, t, rtol=2e-5, gtol=2e-5):
    l_ref, g_ref = _loss_and_grad("reference", a, alpha, t)
    l_cpp, g_cpp = _loss_and_grad("cpp", a, alpha, t)
    assert l_cpp.shape == () and l_cpp.dtype == torch.float32 and g_cpp.shape == a.shape
    assert torch.allclose(l_cpp, l_ref, rtol=rtol, atol=1e-7), (l_cpp.item(), l_ref.item())
    scale = g_ref.abs().max().clamp(min=1e-30)
    assert ((g_cpp - g_ref).abs().max() / scale).item() <= gtol
    return l_ref, g_ref, l_cpp, g_cpp


SHAPES = [  # (B, K, h, w, H, W)
    (1, 1, 1, 1, 224, 224), (5, 3, 7, 8, 32, 224), (1, 64, 8, 8, 32, 32), (5, 1, 7, 7, 224, 224),
    (2, 3, 8, 7, 33, 31), (5, 64, 1, 7, 17, 224), (1, 3, 7, 1, 224, 5), (2, 5, 8, 8, 8, 8), (3, 4, 7, 8, 5, 3),
]


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_matches_reference(shape):
    b, k, h, w, H, W = shape
    g = torch.Generator().manual_seed(sum(shape))
    a = torch.randn(b, k, h, w, generator=g)
    alpha = torch.rand(b, k, generator=g) - 0.2     # some negative weights: ReLU zeroes part of the map
    t = torch.rand(b, H, W, generator=g)
    _compare(a, alpha, t)


def test_every_isa(cpu_isa):
    g = torch.Generator().manual_seed(3)
    a, alpha = torch.randn(3, 19, 7, 9, generator=g), torch.rand(3, 19, generator=g)
    t = torch.rand(3, 37, 45, generator=g)
    _compare(a, alpha, t)


def test_upsample_tables_are_torch_bilinear():
    for h, w, H, W in [(7, 7, 224, 224), (8, 8, 32, 32), (1, 7, 33, 5), (7, 8, 3, 2), (64, 64, 224, 224)]:
        m = torch.rand(2, 1, h, w)
        iy, wy = op.interp_table(h, H)
        ix, wx = op.interp_table(w, W)
        r = m[..., ix[:, 0]] * wx[:, 0] + m[..., ix[:, 1]] * wx[:, 1]
        u = r[..., iy[:, 0], :] * wy[:, 0, None] + r[..., iy[:, 1], :] * wy[:, 1, None]
        assert (u - F.interpolate(m, size=(H, W), mode="bilinear", align_corners=False)).abs().max() <= 3e-7


def test_flat_map_all_zero_after_relu():
    """max == min == 0 (every s <= 0): n = 0, L = mean(T^2), and the gradient is exactly zero (ReLU)."""
    a = -torch.rand(3, 4, 7, 7) - 0.1
    alpha = torch.rand(3, 4) + 0.1
    t = torch.rand(3, 32, 32)
    l_ref, g_ref, l_cpp, g_cpp = _compare(a, alpha, t)
    assert torch.allclose(l_cpp, t.square().mean(), rtol=1e-6)
    assert torch.equal(g_cpp, torch.zeros_like(a)) and torch.equal(g_ref, g_cpp)


def test_flat_map_one_pixel_and_half_flat_batch():
    """A 1x1 map upsampled: u is constant up to rounding, D ~ 1 ulp, so loss and gradient hang on 1-ulp
    differences of s and of the upsample (rounding noise in the reference too, ill-conditioned by nature):
    only finiteness and range are checked. A flat sample next to an ordinary one leaves the ordinary one's
    gradient intact."""
    alpha, t = torch.rand(2, 3), torch.rand(2, 224, 224)
    a = torch.randn(2, 3, 1, 1).abs()
    l_ref, g_ref = _loss_and_grad("reference", a, alpha, t)
    l_cpp, g_cpp = _loss_and_grad("cpp", a, alpha, t)
    assert 0 <= l_cpp <= 1 and torch.isfinite(g_cpp).all() and torch.isfinite(g_ref).all()
    a2 = torch.randn(2, 3, 7, 7)
    a2[0] = -1.0                                 # sample 0 flat (all zero after ReLU), sample 1 not
    _, g_ref, _, g_cpp = _compare(a2, alpha, t)
    assert torch.equal(g_cpp[0], torch.zeros_like(g_cpp[0])) and g_cpp[1].abs().max() > 0


@pytest.mark.parametrize("size", [(32, 32), (17, 31), (60, 68), (224, 224), (33, 225)])
def test_upsample_rounds_like_torch(size):
    """A 1x1 map (K = 1, alpha = 1: s exact in both) upsampled is constant up to torch's rounding (D ~ 1 ulp,
    n in {0, 1, ...}; or exactly flat, n = 0): the loss equals the reference's only if u is bit-identical to
    F.interpolate's (both of torch's kernels: H + W <= 128 and > 128)."""
    a = torch.rand(3, 1, 1, 1) + 0.1
    alpha, t = torch.ones(3, 1), torch.rand(3, *size)
    l_ref, _ = _loss_and_grad("reference", a, alpha, t)
    l_cpp, _ = _loss_and_grad("cpp", a, alpha, t)
    assert torch.allclose(l_cpp, l_ref, rtol=1e-5)


def test_exact_ties_take_the_first_index():
    """Exact ties of the min (ReLU zeros) and of the max (two equal peaks, clamped corner blocks): the
    gradient goes where torch's min / max put it (the first occurrence), as in the reference."""
    s = torch.zeros(2, 1, 7, 8)
    s[:, 0, 0, 0] = 3.0          # the max at a corner: the whole clamped corner block of u ties exactly
    s[:, 0, 6, 7] = 3.0          # a second equal peak at the opposite corner
    s[:, 0, 3, 4] = 1.5
    s[1, 0, 2, 2] = -1.0
    a = torch.cat([s, 0.5 * s], 1)
    alpha = torch.tensor([[1.0, 2.0], [0.5, 1.0]])
    t = torch.rand(2, 224, 224)
    u = op._normalise(torch.einsum("bchw,bc->bhw", a, alpha), t)[0]
    assert ((u == u.max(1, keepdim=True)[0]).sum(1) > 100).all() and ((u == 0).sum(1) > 100).all()  # real ties
    _compare(a, alpha, t)  # a tie resolved to another index would move an O(1) share of the gradient


def test_non_contiguous_and_channels_last():
    g = torch.Generator().manual_seed(1)
    a = torch.randn(4, 9, 16, 14, generator=g)[:, ::3, ::2, 1::2]          # (4, 3, 8, 7), strided
    alpha = torch.rand(3, 4, generator=g).t()                                 # transposed
    t = torch.rand(4, 40, 33, generator=g).transpose(1, 2)                  # (4, 33, 40), transposed
    _compare(a, alpha, t)
    _compare(torch.randn(2, 8, 7, 7).contiguous(memory_format=torch.channels_last), torch.rand(2, 8),
             torch.rand(2, 32, 32))


def test_nan_propagates_like_the_reference():
    """Documented choice: no error; a NaN in A makes the loss NaN and that sample's whole gradient NaN (the
    NaN reaches min / max), the other samples' gradients stay finite, as in the reference."""
    a = torch.randn(3, 4, 7, 7)
    a[1, 2, 3, 3] = float("nan")
    alpha, t = torch.rand(3, 4) + 0.1, torch.rand(3, 32, 32)
    l_ref, g_ref = _loss_and_grad("reference", a, alpha, t)
    l_cpp, g_cpp = _loss_and_grad("cpp", a, alpha, t)
    assert torch.isnan(l_ref) and torch.isnan(l_cpp)
    assert torch.equal(torch.isnan(g_cpp), torch.isnan(g_ref))
    assert torch.isnan(g_cpp[1]).all() and torch.isfinite(g_cpp[[0, 2]]).all()
    assert torch.allclose(g_cpp[[0, 2]], g_ref[[0, 2]], rtol=1e-4, atol=1e-7)


def test_nan_in_the_first_map_row_every_isa(cpu_isa):
    """A NaN at the map's first element (row 0 of u, where the row's min / max are NaN themselves)."""
    a = torch.randn(3, 4, 7, 7)
    a[1, :, 0, 0] = float("nan")
    alpha, t = torch.rand(3, 4) + 0.1, torch.rand(3, 32, 32)
    l_ref, g_ref = _loss_and_grad("reference", a, alpha, t)
    l_cpp, g_cpp = _loss_and_grad("cpp", a, alpha, t)
    assert torch.isnan(l_ref) and torch.isnan(l_cpp)
    assert torch.equal(torch.isnan(g_cpp), torch.isnan(g_ref))
    assert torch.allclose(g_cpp[[0, 2]], g_ref[[0, 2]], rtol=1e-4, atol=1e-7)


def test_other_dtypes_run_the_reference_and_ints_are_refused():
    a = torch.randn(2, 3, 7, 7, dtype=torch.float64, requires_grad=True)
    alpha, t = torch.rand(2, 3, dtype=torch.float64), torch.rand(2, 16, 16, dtype=torch.float64)
    with zsqfast.use_backend("cpp"):
        got = cam_mse(a, alpha, t)
        bf = cam_mse(a.detach().bfloat16(), alpha.bfloat16(), t.bfloat16())
    assert got.dtype == torch.float64 and bf.dtype == torch.bfloat16
    assert torch.equal(got, op.reference(a, alpha, t)[0])
    with pytest.raises(TypeError, match="floating-point"):
        cam_mse(torch.ones(2, 3, 7, 7, dtype=torch.int32), alpha, t)
    with pytest.raises(RuntimeError, match="cam_mse"):      # the raw kernel checks its contract
        torch.ops.zsqfast_ext.cam_mse(a.detach(), alpha, t, *op._tables(7, 7, t))


def test_opcheck_and_gradcheck():
    a, alpha, t = torch.randn(2, 3, 7, 8, requires_grad=True), torch.rand(2, 3), torch.rand(2, 11, 13)
    torch.library.opcheck(op.cam_mse, (a, alpha, t))
    s = torch.randn(2, 7, 8)
    torch.library.opcheck(op.cam_mse_backward, (torch.tensor(1.5), s, alpha, t))
    a64 = torch.randn(2, 3, 4, 5, dtype=torch.float64, requires_grad=True)
    alpha64, t64 = torch.rand(2, 3, dtype=torch.float64) - 0.3, torch.rand(2, 9, 7, dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda v: cam_mse(v, alpha64, t64), (a64,))
    # the float32 C++ gradient against the float64 composite (finish_map + F.mse_loss) of the same inputs
    a32 = torch.randn(3, 5, 7, 7)
    alpha32, t32 = torch.rand(3, 5) - 0.2, torch.rand(3, 32, 32)
    with zsqfast.use_backend("cpp"):
        _, g_cpp = _loss_and_grad("cpp", a32, alpha32, t32)
    a_d = a32.double().requires_grad_(True)
    comp = F.mse_loss(finish_map((alpha32.double()[:, :, None, None] * a_d).sum(1, keepdim=True), (32, 32), "synq"),
                      t32.double())
    (g_d,) = torch.autograd.grad(comp, a_d)
    assert (g_cpp.double() - g_d).abs().max() <= 1e-4 * g_d.abs().max()


def test_cam_alignment_loss_same_through_either_kernel():
    """End to end (zsqfast.cam_alignment_loss, a CIFAR ResNet-20 teacher and its W4A4 student): the loss and the
    student's parameter gradients agree whichever kernel runs the fused node."""
    torch.manual_seed(0)
    teacher = zsqfast.models.build("cifar_resnet20").eval()
    student = zsqfast.calibrate(zsqfast.quantize_model(teacher, 4, 4), [torch.randn(8, 3, 32, 32)])
    x = torch.randn(4, 3, 32, 32)
    out = {}
    for backend in ("reference", "cpp"):
        student.zero_grad()
        with zsqfast.use_backend(backend):
            loss = zsqfast.cam_alignment_loss(teacher, student, x)
            loss.backward()
        out[backend] = loss.detach(), [p.grad.clone() for p in student.parameters() if p.grad is not None]
    (l_ref, g_ref), (l_cpp, g_cpp) = out["reference"], out["cpp"]
    assert torch.allclose(l_cpp, l_ref, rtol=1e-5) and len(g_cpp) == len(g_ref) > 0
    for a, b in zip(g_cpp, g_ref):
        assert (a - b).abs().max() <= 1e-4 * b.abs().max() + 1e-12
