"""synthesize(): it works on the real CIFAR ResNet-20, resumes exactly, stores atomically, rejects bad input."""
import json

import pytest
import torch
import torch.nn as nn

import zsqfast
from zsqfast.data import data_dir
from zsqfast.models import build

from ._shapes import tiny_bn_model


def test_cifar_resnet20_short_run_matches_statistics_and_labels():
    if not (data_dir() / "cifar10" / "resnet20_cifar10.pt").exists():
        pytest.skip(f"pretrained checkpoint not found under {data_dir()} (set ZSQFAST_DATA)")
    model = zsqfast.models.load_cifar_resnet(20)
    ds = zsqfast.synthesize(model, 32, batch_size=32, iterations=40, seed=0, progress=False)
    assert ds.images.shape == (32, 3, 32, 32) and ds.labels.shape == (32,)
    with zsqfast.BNSLoss(model) as bns, torch.no_grad():
        _, before = bns(torch.randn(32, 3, 32, 32, generator=torch.Generator().manual_seed(9)))
        _, after = bns(ds.images)
        acc = (model(ds.images).argmax(1) == ds.labels).float().mean().item()
    assert after < before / 5, (before, after)
    assert acc > 0.5  # chance is 0.1
    assert all(p.requires_grad for p in model.parameters())  # restored


def test_resume_equals_uninterrupted(tmp_path):
    model = tiny_bn_model()
    kw = dict(batch_size=4, iterations=6, seed=3, progress=False, input_shape=(3, 8, 8))
    full = zsqfast.synthesize(model, 10, **kw)
    part = zsqfast.synthesize(model, 10, out=tmp_path, max_batches=1, **kw)  # "interrupted" after batch 0
    assert len(part) == 4
    index = json.loads((tmp_path / "index.json").read_text())
    assert sorted(index["batches"]) == ["0"] and index["meta"]["num_batches"] == 3
    resumed = zsqfast.synthesize(model, 10, out=tmp_path, **kw)
    assert torch.equal(resumed.images, full.images) and torch.equal(resumed.labels, full.labels)
    loaded = zsqfast.SyntheticDataset.load(tmp_path)
    assert torch.equal(loaded.images, full.images) and len(loaded.meta["final_losses"]) == 3
    assert not list(tmp_path.glob("*.tmp"))


def test_rejects_a_different_run_in_the_same_directory(tmp_path):
    model = tiny_bn_model()
    kw = dict(batch_size=4, iterations=2, progress=False, input_shape=(3, 8, 8))
    zsqfast.synthesize(model, 4, out=tmp_path, seed=0, **kw)
    with pytest.raises(ValueError, match="seed"):
        zsqfast.synthesize(model, 4, out=tmp_path, seed=1, **kw)


def test_incomplete_set_cannot_be_loaded(tmp_path):
    zsqfast.synthesize(tiny_bn_model(), 8, out=tmp_path, batch_size=4, iterations=1, max_batches=1,
                       progress=False, input_shape=(3, 8, 8))
    with pytest.raises(ValueError, match="incomplete"):
        zsqfast.SyntheticDataset.load(tmp_path)


def test_deepinversion_method_runs():
    ds = zsqfast.synthesize(tiny_bn_model(), 4, method="deepinversion", batch_size=4, iterations=3,
                            progress=False, input_shape=(3, 8, 8))
    assert torch.isfinite(ds.images).all()


def test_bad_inputs():
    with pytest.raises(ValueError, match="no BatchNorm2d"):
        zsqfast.synthesize(nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten(), nn.Linear(144, 3)), 4, iterations=1,
                           progress=False, input_shape=(3, 8, 8))
    with pytest.raises(ValueError, match="method"):
        zsqfast.synthesize(build("cifar_resnet20"), 4, method="gan")
    with pytest.raises(ValueError, match="unknown synthesis options"):
        zsqfast.synthesize(build("cifar_resnet20"), 4, learning_rate=1.0)
