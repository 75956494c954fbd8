"""Calibration centers + layered BNS (SynQ --lbns): layer split, exact pooled statistics, the loss against the
official formula written out with hooks, centers classified as their class, resume with stored centers."""
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import zsqfast
from zsqfast.data import data_dir
from zsqfast.synthesis import recipes
from zsqfast.synthesis.centers import center_statistics, deep_mask
from zsqfast.synthesis.engine import _Objective

from ._shapes import tiny_bn_model


def test_deep_mask_is_synqs_split():
    for n in range(1, 25):
        want = [i >= (n + 2) // 2 - 2 for i in range(n)]  # SynQ: n >= (len + 2) // 2 - 2 is "deep"
        assert deep_mask(n) == want
    assert deep_mask(19) == [False] * 8 + [True] * 11  # CIFAR ResNet-20: 19 BatchNorm2d layers


def test_center_statistics_pool_exactly_over_chunks():
    model = tiny_bn_model()
    centers = torch.randn(7, 3, 8, 8)
    with zsqfast.BNSLoss(model) as bns:
        whole = center_statistics(bns, centers, batch_size=7)
        chunked = center_statistics(bns, centers, batch_size=3)
    for (m1, v1), (m2, v2) in zip(whole, chunked):
        assert torch.allclose(m1, m2, atol=1e-6) and torch.allclose(v1, v2, atol=1e-5)


def _official_lbns_loss(model, x, y, targets, hp):
    """SynQ's generation loss with --lbns, as its code computes it (hooks, x.mean / x.var, MSE)."""
    stats = []
    hs = [m.register_forward_hook(lambda mod, inp, out: stats.append(
        (inp[0].mean([0, 2, 3]), inp[0].var([0, 2, 3], unbiased=False), mod)))
        for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    out = model(x)
    for h in hs:
        h.remove()
    p = F.softmax(out, 1).gather(1, y[:, None]).squeeze(1)
    target = hp["hard_beta"] * ((1 - p).pow(hp["hard_gamma"]) * F.cross_entropy(out, y, reduction="none")).mean()
    n = len(stats)
    mean_loss = sum(F.mse_loss(m, mod.running_mean) for m, _, mod in stats) / n
    var_loss = sum(F.mse_loss(v, mod.running_var) for _, v, mod in stats) / n
    lbns = sum(F.mse_loss(m, tm) + F.mse_loss(v, tv) for i, ((m, v, _), (tm, tv)) in enumerate(zip(stats, targets))
               if i >= (n + 2) // 2 - 2) / (n * len(y))
    return 0.4 * (mean_loss + var_loss) + target + 0.02 * lbns


def test_lbns_loss_matches_the_official_formula():
    model = tiny_bn_model()
    x, y = torch.randn(6, 3, 8, 8), torch.randint(0, 4, (6,))
    hp = recipes.resolve("hast", {}, (3, 8, 8), model)
    targets = [(torch.randn(8) * 0.1, torch.rand(8) + 0.5) for _ in range(2)]
    obj = _Objective(model, hp, "fp32", "cpu")
    obj.targets = targets
    try:
        got = obj.loss(x, y)
    finally:
        obj.close()
    want = _official_lbns_loss(model, x, y, targets, hp)
    assert torch.allclose(got, want.squeeze(), rtol=1e-5, atol=1e-6), (got, want)


def test_centers_stored_and_resume_equals_uninterrupted(tmp_path):
    model = tiny_bn_model()
    kw = dict(batch_size=4, iterations=4, seed=1, progress=False, input_shape=(3, 8, 8), calibration_centers=True,
              center_iterations=10)
    full = zsqfast.synthesize(model, 8, **kw)
    zsqfast.synthesize(model, 8, out=tmp_path, max_batches=1, **kw)
    centers = torch.load(tmp_path / "centers.pt", weights_only=True)
    assert centers.shape == (4, 3, 8, 8) and centers.abs().max() <= 3.0  # one per class, clamped to [-3, 3]
    resumed = zsqfast.synthesize(model, 8, out=tmp_path, **kw)
    assert torch.equal(resumed.images, full.images)
    plain = zsqfast.synthesize(model, 8, **dict(kw, calibration_centers=False))
    assert not torch.equal(plain.images, full.images)  # the centers term changes the optimisation
    with pytest.raises(ValueError, match="calibration_centers"):
        zsqfast.synthesize(model, 2, method="psaq-vit", calibration_centers=True, progress=False)


def test_cifar_resnet20_centers_are_classified_as_their_class():
    if not (data_dir() / "cifar10" / "resnet20_cifar10.pt").exists():
        pytest.skip(f"pretrained checkpoint not found under {data_dir()} (set ZSQFAST_DATA)")
    from zsqfast.synthesis.centers import make_centers

    model = zsqfast.models.load_cifar_resnet(20).eval().requires_grad_(False)
    hp = recipes.resolve("hast", {"center_iterations": 50}, (3, 32, 32), model)
    with zsqfast.BNSLoss(model) as bns:
        centers = make_centers(bns, (3, 32, 32), 10, hp, seed=0, batch_size=256)
    with torch.no_grad():
        assert (model(centers).argmax(1) == torch.arange(10)).float().mean() >= 0.9


def test_centers_start_on_the_models_device():
    """make_centers draws its noise on the CPU (the same numbers everywhere) and optimises it on the model's
    device (the meta device stands in for a GPU: no optimisation steps, which need values)."""
    from zsqfast.synthesis.centers import make_centers

    model = tiny_bn_model()
    hp = recipes.resolve("hast", {"center_iterations": 0}, (3, 8, 8), model)
    with zsqfast.BNSLoss(model) as bns:
        on_cpu = make_centers(bns, (3, 8, 8), 4, hp, seed=0, batch_size=3)
    with zsqfast.BNSLoss(model.to("meta")) as bns:
        on_meta = make_centers(bns, (3, 8, 8), 4, hp, seed=0, batch_size=3)
    assert on_meta.device.type == "meta" and on_meta.shape == on_cpu.shape == (4, 3, 8, 8)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_calibration_centers_on_cuda():
    kw = dict(batch_size=4, iterations=3, seed=1, progress=False, input_shape=(3, 8, 8), calibration_centers=True,
              center_iterations=5)
    ds = zsqfast.synthesize(tiny_bn_model().cuda(), 8, **kw)
    assert ds.images.shape == (8, 3, 8, 8) and torch.isfinite(ds.images).all()
