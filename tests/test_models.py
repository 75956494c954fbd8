"""Model builders, data location, and the pretrained CIFAR ResNets of ../shared/data (strict load, documented
FP32 accuracy, W8A8 round-to-nearest). Tests needing the real data skip with a reason when it is absent."""
from pathlib import Path

import numpy as np
import pytest
import torch

import zsqfast.data
from zsqfast.data import data_dir, load_cifar10_test
from zsqfast.models import CIFAR_MEAN, CIFAR_STD, build, cifar_resnet, load_cifar_resnet, normalize
from zsqfast.quantize_model import calibrate, quantize_model


def _need(*parts):
    if not data_dir().joinpath("cifar10", *parts).exists():
        pytest.skip(f"real data cifar10/{'/'.join(parts)} not found under {data_dir()} (set ZSQFAST_DATA)")


@torch.inference_mode()
def _predict(model, x, batch=1000):
    """Top-1 predictions; channels_last runs ~30 % faster on this CPU (and exercises strided layouts)."""
    cl = torch.channels_last
    model = model.to(memory_format=cl)
    return torch.cat([model(xb.contiguous(memory_format=cl)).argmax(1) for xb in x.split(batch)])


def test_resnet20_checkpoint_strict_load_and_fp32_accuracy():
    """Documented FP32 top-1 on the 5,000 JPEG-decoded test images: ResNet-20 81.0 %."""
    _need("resnet20_cifar10.pt")
    _need("test_dev_5k.npz")
    state = torch.load(data_dir() / "cifar10" / "resnet20_cifar10.pt", map_location="cpu", weights_only=True)
    model = cifar_resnet(20)
    assert model.load_state_dict(state, strict=True) is not None  # strict: raises on any missing / extra key
    x, y = load_cifar10_test()
    assert x.shape == (5000, 3, 32, 32) and x.dtype == torch.float32 and y.dtype == torch.int64
    acc = (_predict(load_cifar_resnet(20), x) == y).float().mean().item()
    assert acc >= 0.79, acc


def test_resnet56_checkpoint_loads():
    """Strict load plus a cheap sanity check on 250 class-balanced images (full-set FP32: 83.2 %)."""
    _need("resnet56_cifar10.pt")
    _need("test_dev_5k.npz")
    model = load_cifar_resnet(56)
    assert not model.training and len(model.layer1) == 9
    x, y = load_cifar10_test(250)
    assert (_predict(model, x) == y).float().mean().item() >= 0.75


def test_round_to_nearest_w8a8_keeps_accuracy():
    """W8A8, activations calibrated zero-shot on Gaussian noise: predictions barely move (500 images)."""
    _need("resnet20_cifar10.pt")
    _need("test_dev_5k.npz")
    torch.manual_seed(0)
    x, y = load_cifar10_test(500)
    fp = load_cifar_resnet(20)
    q = calibrate(quantize_model(fp, 8, 8), [torch.randn(64, 3, 32, 32) for _ in range(4)])
    p_fp, p_q = _predict(fp, x), _predict(q, x)
    assert (p_fp == p_q).float().mean().item() >= 0.97  # measured 0.988
    assert (p_q == y).float().mean().item() >= (p_fp == y).float().mean().item() - 0.015


def test_missing_data_is_a_clear_error(tmp_path, monkeypatch):
    with pytest.raises(FileNotFoundError, match="ZSQFAST_DATA"):
        load_cifar10_test(root=tmp_path)
    with pytest.raises(FileNotFoundError, match="resnet20"):
        load_cifar_resnet(20, root=tmp_path)
    monkeypatch.setenv("ZSQFAST_DATA", str(tmp_path))
    assert data_dir() == tmp_path
    with pytest.raises(FileNotFoundError, match=str(tmp_path)):
        load_cifar10_test()


def test_default_data_dir_is_beside_the_repository(monkeypatch):
    monkeypatch.delenv("ZSQFAST_DATA", raising=False)
    repo_root = Path(zsqfast.data.__file__).resolve().parent.parent
    assert data_dir() == repo_root.parent / "shared" / "data"


def test_normalize():
    img = np.zeros((2, 4, 5, 3), dtype=np.uint8)
    img[1, 2, 3] = (255, 128, 0)
    x = normalize(img)
    assert x.shape == (2, 3, 4, 5) and x.dtype == torch.float32 and x.is_contiguous()
    expected = [(1.0 - CIFAR_MEAN[0]) / CIFAR_STD[0], (128 / 255 - CIFAR_MEAN[1]) / CIFAR_STD[1],
                -CIFAR_MEAN[2] / CIFAR_STD[2]]
    torch.testing.assert_close(x[1, :, 2, 3], torch.tensor(expected))
    torch.testing.assert_close(x[0, :, 0, 0], -torch.tensor(CIFAR_MEAN) / torch.tensor(CIFAR_STD))
    assert torch.equal(normalize(torch.from_numpy(img)), x)
    with pytest.raises(ValueError, match="uint8"):
        normalize(img.astype(np.float32))
    with pytest.raises(ValueError, match="uint8"):
        normalize(img.transpose(0, 3, 1, 2))  # NCHW by mistake


def test_cifar_resnet_architecture():
    model = cifar_resnet(20)
    keys = set(model.state_dict())
    assert {"conv1.weight", "bn1.running_var", "layer1.0.conv1.weight", "layer3.2.bn2.bias", "linear.weight",
            "linear.bias"} <= keys and "layer3.3.conv1.weight" not in keys
    assert not any("shortcut" in k for k in keys)  # option A: parameter-free shortcut
    assert sum(p.numel() for p in model.parameters()) == 269722  # He et al.: ResNet-20 "0.27M"
    r110 = cifar_resnet(110)
    assert [len(r110.layer1), len(r110.layer2), len(r110.layer3)] == [18, 18, 18]
    assert round(sum(p.numel() for p in r110.parameters()) / 1e6, 1) == 1.7  # ResNet-110 "1.7M"
    out = cifar_resnet(32, num_classes=100)(torch.randn(2, 3, 32, 32))
    assert out.shape == (2, 100)
    with pytest.raises(ValueError, match="6n"):
        cifar_resnet(21)


def test_build_by_name():
    assert build("cifar_resnet44")(torch.randn(1, 3, 32, 32)).shape == (1, 10)
    assert build("torchvision:resnet18", num_classes=7)(torch.randn(1, 3, 64, 64)).shape == (1, 7)
    assert build("mobilenetv2_100", num_classes=5).classifier.out_features == 5
    assert type(build("mobilenet_v2", num_classes=3)).__module__.startswith("torchvision")  # not a timm name
    assert build("deit_tiny_patch16_224", img_size=32, patch_size=8, depth=1).patch_embed.img_size == (32, 32)
    with pytest.raises(ValueError, match="unknown model"):
        build("no_such_model_xyz")
    with pytest.raises(ValueError, match="torchvision has no model"):
        build("torchvision:no_such_model_xyz")
