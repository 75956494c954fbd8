"""bn_stats op (every backend and ISA against the reference) and BNSLoss (fused against the hook reference)."""
import pytest
import torch
import torch.nn as nn

import zsqfast
from zsqfast.models import build
from zsqfast.ops import bn_stats as B
from zsqfast.ops._common import empty_strided_like

from .conftest import cpu_backends

BACKENDS = [b for b in cpu_backends("bn_stats") if b != "reference"]


def _inputs(dtype=torch.float32):
    g = torch.Generator().manual_seed(5)
    r = lambda *s: (torch.randn(*s, generator=g) * 3 + 2).to(dtype)  # noqa: E731  (a non-zero mean)
    return [
        ("4x6x5x7", r(4, 6, 5, 7)),
        ("nchw-8x16x33x35", r(8, 16, 33, 35)),
        ("nhwc-8x64x16x16", r(8, 64, 16, 16).contiguous(memory_format=torch.channels_last)),
        ("nhwc-2x300x9x31", r(2, 300, 9, 31).contiguous(memory_format=torch.channels_last)),
        ("2d-17x5", r(17, 5)),
        ("sliced", r(6, 12, 9, 9)[:, ::2, 1:, :]),
        ("one-channel", r(9, 1, 7, 7)),
    ]


def _compare(backend, x):
    a = torch.randn(x.size(1))
    b = torch.randn(x.size(1))
    g = empty_strided_like(torch.randn(x.shape).to(x.dtype), B.dense(x).stride())
    with zsqfast.use_backend("reference"):
        want = B.bn_stats(x) + (B.bn_stats_backward(g, x, a, b), B.bn_stats_backward(None, x, a, b))
    with zsqfast.use_backend(backend):
        got = B.bn_stats(x) + (B.bn_stats_backward(g, x, a, b), B.bn_stats_backward(None, x, a, b))
    tol = 1e-6 if x.dtype == torch.float32 else 1e-2
    assert torch.allclose(got[0], want[0], rtol=1e-6, atol=1e-6)
    assert torch.allclose(got[1], want[1], rtol=1e-5, atol=1e-6)
    for k in (2, 3):
        assert got[k].stride() == want[k].stride()
        assert torch.allclose(got[k].float(), want[k].float(), rtol=tol, atol=tol)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name,x", _inputs(), ids=[c[0] for c in _inputs()])
def test_bn_stats_backend_matches_reference(backend, name, x):
    _compare(backend, x)


@pytest.mark.parametrize("name,x", _inputs(), ids=[c[0] for c in _inputs()])
def test_bn_stats_every_isa(cpu_isa, name, x):
    _compare("cpp", x)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_bn_stats_half(backend, dtype):
    for _, x in _inputs(dtype)[:3]:
        _compare(backend, x)


def test_bn_stats_large_mean_is_accurate():
    """fp64 accumulation: the variance survives a mean 1000x the standard deviation."""
    x = torch.randn(16, 8, 64, 64, dtype=torch.float64) * 0.01 + 10.0
    want = x.var(dim=(0, 2, 3), unbiased=False)
    for backend in cpu_backends("bn_stats"):
        with zsqfast.use_backend(backend):
            _, var = B.bn_stats(x.float())
        assert torch.allclose(var.double(), want, rtol=2e-2), backend


@pytest.mark.parametrize("backend", cpu_backends("bn_stats"))
def test_bn_stats_gradient_and_tap(backend):
    x = (torch.randn(5, 7, 6, 4, dtype=torch.float32) + 1).requires_grad_(True)
    with zsqfast.use_backend(backend):
        mean, var = B.batch_stats(x)
        (mean.pow(2).sum() + var.sin().sum()).backward()
        g_op = x.grad.clone()
        x.grad = None
        y, mean, var = B.batch_stats(x, tap=True)
        (y.tanh().sum() + mean.pow(2).sum() + var.sin().sum()).backward()
        g_tap = x.grad.clone()
    x.grad = None
    m, v = x.mean((0, 2, 3)), x.var((0, 2, 3), unbiased=False)
    (m.pow(2).sum() + v.sin().sum()).backward()
    assert torch.allclose(g_op, x.grad, atol=1e-6)
    x.grad = None
    (x.tanh().sum() + x.mean((0, 2, 3)).pow(2).sum() + x.var((0, 2, 3), unbiased=False).sin().sum()).backward()
    assert torch.allclose(g_tap, x.grad, atol=1e-6)


@pytest.mark.parametrize("backend", cpu_backends("bn_stats"))
def test_bn_stats_opcheck(backend):
    x = torch.randn(3, 5, 4, 6).contiguous(memory_format=torch.channels_last)
    with zsqfast.use_backend(backend):
        torch.library.opcheck(B.bn_stats, (x.requires_grad_(),))
        torch.library.opcheck(B.bn_stats_backward, (torch.randn(3, 5, 4, 6), torch.randn(3, 5, 4, 6), torch.randn(5), torch.randn(5)))
        torch.library.opcheck(B.bn_stats_backward, (None, torch.randn(3, 5, 4, 6), torch.randn(5), torch.randn(5)))


@pytest.mark.parametrize("form", ["hast", "deepinversion", "genie"])
@pytest.mark.parametrize("model_name,size", [("cifar_resnet20", 32), ("mobilenetv2_100", 64)])
def test_bnsloss_fused_matches_reference(form, model_name, size):
    torch.manual_seed(0)
    model = build(model_name).eval()
    with torch.no_grad():  # non-trivial running statistics
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
    x = torch.randn(4, 3, size, size)
    out = []
    for fused in (False, True):
        xi = x.clone().requires_grad_(True)
        with zsqfast.BNSLoss(model, form, fused=fused) as bns:
            logits, loss = bns(xi)
            (loss + 0.1 * logits.logsumexp(1).mean()).backward()
        out.append((logits.detach(), loss.detach(), xi.grad))
    assert torch.allclose(out[0][0], out[1][0], atol=1e-5)
    assert torch.allclose(out[0][1], out[1][1], rtol=1e-5)
    assert torch.allclose(out[0][2], out[1][2], rtol=1e-4, atol=1e-6 * float(out[0][2].abs().max()))


def test_bnsloss_hast_value_by_hand():
    torch.manual_seed(1)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 5, 3), nn.BatchNorm2d(5)).eval()
    x = torch.randn(6, 3, 9, 9)
    with zsqfast.BNSLoss(model, "hast", layer_weights=[0.2, 1.1]) as bns:
        _, loss = bns(x)
    a1 = model[0](x)
    a2 = model[3](model[2](model[1](a1)))
    def term(a, bn):
        return (((a.mean((0, 2, 3)) - bn.running_mean) ** 2).mean() +
                ((a.var((0, 2, 3), unbiased=False) - bn.running_var) ** 2).mean())
    want = (0.2 * term(a1, model[1]) + 1.1 * term(a2, model[4])) / 2
    assert torch.allclose(loss, want, rtol=1e-5)


def test_bnsloss_errors_and_hook_removal():
    with pytest.raises(ValueError, match="no BatchNorm2d"):
        zsqfast.BNSLoss(nn.Sequential(nn.Conv2d(3, 3, 1), nn.ReLU()))
    model = build("cifar_resnet20").eval()
    with pytest.raises(ValueError, match="form"):
        zsqfast.BNSLoss(model, "deep")
    with pytest.raises(ValueError, match="layer_weights"):
        zsqfast.BNSLoss(model, layer_weights=[1.0, 2.0])
    with zsqfast.BNSLoss(model) as bns:
        bns(torch.randn(2, 3, 32, 32))
        assert all(len(m._forward_pre_hooks) == 1 for m in bns.layers)
    assert all(len(m._forward_pre_hooks) == 0 for m in bns.layers)


@pytest.mark.parametrize("fused", [True, False])
def test_bnsloss_empty_batch_and_syncbn_errors(fused):
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU()).eval()
    with zsqfast.BNSLoss(model, fused=fused) as bns:
        with pytest.raises(ValueError, match="non-empty batch"):
            bns(torch.randn(0, 3, 8, 8, requires_grad=True))
        assert torch.isfinite(bns(torch.randn(2, 3, 8, 8))[1])
    with pytest.raises(ValueError, match="non-empty batch"):
        B.batch_stats(torch.randn(0, 4, 5, 5, requires_grad=True))
    with pytest.raises(ValueError, match="SyncBatchNorm is not supported"):
        zsqfast.BNSLoss(nn.SyncBatchNorm.convert_sync_batchnorm(model), fused=fused)
