"""The pretrained CIFAR ResNets of ../shared/data load strictly and reach their documented accuracy."""
import pytest
import torch

import zsqfast
from zsqfast.data import data_dir, load_cifar10_test
from zsqfast.models import build, cifar_resnet, load_cifar_resnet


def _need_data():
    if not (data_dir() / "cifar10" / "test_dev_5k.npz").exists():
        pytest.skip(f"real data not found under {data_dir()} (set ZSQFAST_DATA)")


@torch.no_grad()
def _accuracy(model, x, y):
    return sum(int((model(xb).argmax(1) == yb).sum()) for xb, yb in zip(x.split(1000), y.split(1000))) / len(y)


@pytest.mark.parametrize("depth,expected", [(20, 0.810), (56, 0.832)])
def test_pretrained_cifar_resnet_accuracy(depth, expected):
    """Documented FP32 top-1 on the JPEG-decoded test set: ResNet-20 81.0 %, ResNet-56 83.2 % (+-1.5)."""
    _need_data()
    x, y = load_cifar10_test()
    acc = _accuracy(load_cifar_resnet(depth), x, y)
    assert abs(acc - expected) < 0.015, acc


def test_round_to_nearest_w8a8_keeps_accuracy():
    _need_data()
    x, y = load_cifar10_test(2000)
    fp = load_cifar_resnet(20)
    q = zsqfast.calibrate(zsqfast.quantize_model(fp, 8, 8), [torch.randn(64, 3, 32, 32) for _ in range(4)])
    assert _accuracy(q, x, y) > _accuracy(fp, x, y) - 0.01


def test_missing_data_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="ZSQFAST_DATA"):
        load_cifar10_test(root=tmp_path)
    with pytest.raises(FileNotFoundError, match="resnet20"):
        load_cifar_resnet(20, root=tmp_path)


def test_builders():
    assert cifar_resnet(32)(torch.randn(2, 3, 32, 32)).shape == (2, 10)
    with pytest.raises(ValueError, match="6n"):
        cifar_resnet(21)
    with pytest.raises(ValueError, match="unknown model"):
        build("no_such_model_xyz")
    assert build("torchvision:resnet18", num_classes=7)(torch.randn(1, 3, 64, 64)).shape == (1, 7)
