"""Grad-CAM: the head-only fast path against the official SynQ procedure (full backward), gradients of the
CAM-alignment loss, standard mode."""
import pytest
import torch

import zsqfast
from zsqfast.finetune.gradcam import reference_gradcam
from zsqfast.models import build


@pytest.mark.parametrize("name,size", [("cifar_resnet20", 32), ("resnet18", 64), ("mobilenetv2_100", 64)])
def test_synq_mode_matches_official_procedure(name, size):
    torch.manual_seed(0)
    model = build(name).eval()
    x = torch.randn(6, 3, size, size)
    want = reference_gradcam(model, x)
    got = zsqfast.gradcam(model, x)
    assert got.shape == (6, size, size)
    assert torch.allclose(got, want, atol=1e-5)


def test_fast_path_builds_no_parameter_gradients():
    model = build("cifar_resnet20").eval()
    model.zero_grad(set_to_none=True)
    zsqfast.gradcam(model, torch.randn(2, 3, 32, 32))
    assert all(p.grad is None for p in model.parameters())


def test_cam_alignment_loss_trains_the_student():
    torch.manual_seed(0)
    teacher = build("cifar_resnet20").eval()
    student = zsqfast.calibrate(zsqfast.quantize_model(teacher, 4, 4), [torch.randn(8, 3, 32, 32)])
    x = torch.randn(4, 3, 32, 32)
    loss = zsqfast.cam_alignment_loss(teacher, student, x)
    loss.backward()
    assert loss.item() >= 0
    grads = [p.grad for p in student.parameters() if p.grad is not None]
    assert grads and any(g.abs().sum() > 0 for g in grads)
    assert all(p.grad is None for p in teacher.parameters())
    # identical models: zero loss
    assert zsqfast.cam_alignment_loss(teacher, teacher, x).item() < 1e-10


def test_standard_mode_and_layer_selection():
    torch.manual_seed(1)
    model = build("cifar_resnet20").eval()
    x = torch.randn(3, 3, 32, 32)
    by_name = zsqfast.gradcam(model, x, layer="layer3.2.conv2", mode="standard")
    by_module = zsqfast.gradcam(model, x, layer=model.layer3[2].conv2, mode="standard")
    assert torch.equal(by_name, by_module)
    assert by_name.min() >= 0 and by_name.max() <= 1 + 1e-6
    with pytest.raises(ValueError, match="mode"):
        zsqfast.gradcam(model, x, mode="cam++")
