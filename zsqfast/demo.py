"""Models, data and the kernel-speed line of ``zsqfast demo`` (the pipeline itself: :mod:`zsqfast.demo_pipeline`).

Model and real held-out images: the pretrained CIFAR-10 ResNet-20 and test_dev_5k from the data directory
when present; otherwise a small BatchNorm CNN trained here in seconds on scikit-learn's bundled digits
(8x8 images; 1,437 to train, 360 held out). No downloads.
"""
from __future__ import annotations

import time

import torch
import torch.nn as nn
import torch.nn.functional as F


class DigitsCNN(nn.Module):
    """A BatchNorm CNN for 1x8x8 digits: three conv-BN-ReLU stages, global average pool, linear head."""

    def __init__(self, width: int = 32, num_classes: int = 10):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, width, 3, padding=1, bias=False), nn.BatchNorm2d(width), nn.ReLU(),
            nn.Conv2d(width, 2 * width, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(2 * width), nn.ReLU(),
            nn.Conv2d(2 * width, 2 * width, 3, padding=1, bias=False), nn.BatchNorm2d(2 * width), nn.ReLU(),
        )
        self.head = nn.Linear(2 * width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x).mean(dim=(2, 3)))


def digits_data(seed: int = 0):
    """``(x_train, y_train, x_test, y_test)``: scikit-learn's digits as normalised float (N, 1, 8, 8)."""
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.tensor(d.images, dtype=torch.float32).unsqueeze(1) / 16.0
    y = torch.tensor(d.target, dtype=torch.int64)
    x = (x - 0.3) / 0.4
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
    x, y = x[perm], y[perm]
    return x[:1437], y[:1437], x[1437:], y[1437:]


def train_digits(x, y, epochs: int = 15, seed: int = 0) -> nn.Module:
    """Adam, batch 64, cosine LR: ~97 % held-out accuracy in a few seconds on 2 cores."""
    torch.manual_seed(seed)
    model = DigitsCNN()
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, epochs * ((len(y) + 63) // 64))
    for _ in range(epochs):
        model.train()
        for idx in torch.randperm(len(y)).split(64):
            opt.zero_grad()
            F.cross_entropy(model(x[idx]), y[idx]).backward()
            opt.step()
            sched.step()
    return model.eval()


@torch.no_grad()
def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch: int = 500) -> float:
    model.eval()
    correct = sum(int((model(xb).argmax(1) == yb).sum()) for xb, yb in zip(x.split(batch), y.split(batch)))
    return 100.0 * correct / len(y)


def _load(data: str | None, quick: bool, seed: int):
    from zsqfast import data as zdata

    try:
        from zsqfast.models import load_cifar_resnet

        x_test, y_test = zdata.load_cifar10_test(n=1256 if quick else None, root=data)
        model = load_cifar_resnet(20, root=data).eval()
        # no training images are shipped: the "real calibration" rows (a reference, not zero-shot) use test
        # images 0..255, which are therefore left out of every evaluation
        return "CIFAR-10 ResNet-20 (pretrained, ../shared/data)", model, x_test[:256], x_test[256:], y_test[256:]
    except FileNotFoundError as exc:
        print(f"(CIFAR data not found: {exc}; using scikit-learn digits instead)")
    x_train, y_train, x_test, y_test = digits_data(seed)
    t0 = time.perf_counter()
    model = train_digits(x_train, y_train, epochs=8 if quick else 15, seed=seed)
    print(f"trained DigitsCNN in {time.perf_counter() - t0:.1f} s")
    return "DigitsCNN (trained here on sklearn digits)", model, x_train[:256], x_test, y_test


def time_fwd_bwd(fn, x: torch.Tensor, reps: int = 10) -> float:
    """Median seconds of ``fn(x).backward(g)``."""
    g = torch.randn_like(x)
    times = []
    for i in range(reps + 2):
        t0 = time.perf_counter()
        fn(x).backward(g)
        x.grad = None
        if i >= 2:
            times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2]


def _kernel_speed() -> str:
    import zsqfast

    x = torch.randn(64, 64, 32, 32, requires_grad=True)
    s, z = zsqfast.minmax_qparams(x, 4)
    zc = int(z.clamp(0, 15))
    t_ours = time_fwd_bwd(lambda t: zsqfast.fake_quantize(t, s, z, 4, ste="clipped"), x)
    t_torch = time_fwd_bwd(lambda t: torch.fake_quantize_per_tensor_affine(t, float(s), zc, 0, 15), x)
    return (f"fake-quant fwd+bwd 64x64x32x32 (clipped STE): zsqfast[{zsqfast.active_backend()}] "
            f"{t_ours * 1e3:.2f} ms vs torch.fake_quantize_per_tensor_affine {t_torch * 1e3:.2f} ms "
            f"({t_torch / t_ours:.1f}x)")

