"""filter_images: energy by its formula, BN sensitivity against naive leave-one-out forward passes."""
import pytest
import torch
import torch.nn as nn

import zsqfast
from zsqfast.synthesis.filtering import bn_sensitivity_and_energy

from ._shapes import tiny_bn_model


def _naive_discrepancy(model, x):
    """D(batch) by running the batch through the model and measuring every BN input directly."""
    d = torch.zeros((), dtype=torch.float64)
    feats = []
    handles = [m.register_forward_pre_hook(lambda mod, inp: feats.append((mod, inp[0].double())))
               for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    with torch.no_grad():
        model(x)
    for h in handles:
        h.remove()
    for mod, a in feats:
        mean, var = a.mean((0, 2, 3)), a.var((0, 2, 3), unbiased=False)
        d += ((mean - mod.running_mean.double()) ** 2).sum() + ((var - mod.running_var.double()) ** 2).sum()
    return d


def test_bn_sensitivity_matches_naive_leave_one_out():
    model = tiny_bn_model()
    x = torch.randn(7, 3, 10, 10)
    x[2] *= 4  # an outlier
    energy, sens = bn_sensitivity_and_energy(model, x, batch_size=7)
    d_all = _naive_discrepancy(model, x)
    naive = torch.stack([d_all - _naive_discrepancy(model, torch.cat([x[:i], x[i + 1:]])) for i in range(7)])
    assert torch.allclose(sens, naive, rtol=1e-8, atol=1e-10)
    assert int(sens.abs().argmax()) == 2  # the outlier moves the statistics most
    with torch.no_grad():
        want = -torch.logsumexp(model(x).double(), dim=1)
    assert torch.allclose(energy, want)


def test_batches_are_balanced_so_no_image_is_scored_alone():
    """9 images at batch_size 8 form batches of 5 and 4: the last image gets a real leave-one-out score (a
    ragged split would leave it alone in its batch, with sensitivity 0)."""
    model = tiny_bn_model()
    x = torch.randn(9, 3, 8, 8)
    _, sens = bn_sensitivity_and_energy(model, x, batch_size=8)  # batches of 5 and 4
    _, first = bn_sensitivity_and_energy(model, x[:5], batch_size=5)
    _, second = bn_sensitivity_and_energy(model, x[5:], batch_size=4)
    assert torch.equal(sens, torch.cat([first, second])) and bool((sens != 0).all())
    with pytest.raises(ValueError, match="batch_size"):
        bn_sensitivity_and_energy(model, x, batch_size=0)


def test_filter_images_keeps_the_intersection():
    model = tiny_bn_model()
    x = torch.randn(20, 3, 10, 10)
    r = zsqfast.filter_images(model, x, energy_keep=0.5, bn_keep=0.5, batch_size=10)
    low_e = set(torch.argsort(r.energy)[:10].tolist())
    low_s = set(torch.argsort(r.bn_sensitivity)[:10].tolist())
    assert r.keep.tolist() == sorted(low_e & low_s)
    assert len(zsqfast.filter_images(model, x, energy_keep=1.0, bn_keep=1.0).keep) == 20


def test_filter_errors():
    with pytest.raises(ValueError, match="bn_keep"):
        zsqfast.filter_images(tiny_bn_model(), torch.randn(4, 3, 8, 8), bn_keep=0.0)
    with pytest.raises(ValueError, match="no BatchNorm2d"):
        zsqfast.filter_images(nn.Sequential(nn.Flatten(), nn.Linear(192, 2)), torch.randn(4, 3, 8, 8))


def test_scores_stay_on_the_models_device():
    """Every score is computed on the images' device (the meta device stands in for a GPU here)."""
    energy, sens = bn_sensitivity_and_energy(tiny_bn_model().to("meta"), torch.randn(6, 3, 8, 8, device="meta"),
                                             batch_size=4)
    assert energy.device.type == sens.device.type == "meta" and sens.shape == (6,)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_filter_images_on_cuda_equals_cpu():
    model, x = tiny_bn_model(), torch.randn(10, 3, 8, 8)
    cpu = zsqfast.filter_images(model, x, batch_size=4)
    gpu = zsqfast.filter_images(model.cuda(), x.cuda(), batch_size=4)
    assert torch.allclose(gpu.bn_sensitivity.cpu(), cpu.bn_sensitivity, rtol=1e-4, atol=1e-8)
    assert torch.allclose(gpu.energy.cpu(), cpu.energy, rtol=1e-4, atol=1e-6)
