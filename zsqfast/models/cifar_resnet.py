"""CIFAR ResNets (He et al. 2016, CIFAR variant) matching the checkpoints in ../shared/data.

Stem conv3x3(3->16)-BN-ReLU; three stages of n BasicBlocks (16/32/64 channels, stride 2 at the start of
stages 2 and 3); global average pool; Linear(64 -> classes). Depth = 6n + 2. Shortcut "option A":
parameter-free, ``x[:, :, ::2, ::2]`` zero-padded on channels. Every ReLU is its own module so that
:func:`zsqfast.quantize_model` can place an activation quantizer after each one.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..data import data_file


class ShortcutA(nn.Module):
    """Option-A shortcut: subsample by 2 and zero-pad ``pad`` channels on each side."""

    def __init__(self, pad: int):
        super().__init__()
        self.pad = pad

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.pad(x[:, :, ::2, ::2], (0, 0, 0, 0, self.pad, self.pad))


class BasicBlock(nn.Module):
    def __init__(self, in_planes: int, planes: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu1 = nn.ReLU()
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.relu2 = nn.ReLU()
        self.shortcut = ShortcutA((planes - in_planes) // 2) if stride != 1 or in_planes != planes else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu1(self.bn1(self.conv1(x)))
        return self.relu2(self.bn2(self.conv2(out)) + self.shortcut(x))


class CifarResNet(nn.Module):
    """Input (N, 3, H, W) normalised float; output (N, num_classes) logits."""

    def __init__(self, depth: int = 20, num_classes: int = 10):
        super().__init__()
        if (depth - 2) % 6 != 0 or depth < 8:
            raise ValueError(f"CIFAR ResNet depth must be 6n + 2 (20, 32, 44, 56, 110, ...), got {depth}")
        n = (depth - 2) // 6
        self.conv1 = nn.Conv2d(3, 16, 3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        self.relu = nn.ReLU()
        planes, layers = 16, []
        for i, width in enumerate((16, 32, 64)):
            blocks = []
            for j in range(n):
                blocks.append(BasicBlock(planes, width, stride=2 if (i > 0 and j == 0) else 1))
                planes = width
            layers.append(nn.Sequential(*blocks))
        self.layer1, self.layer2, self.layer3 = layers
        self.linear = nn.Linear(64, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.linear(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


def cifar_resnet(depth: int = 20, num_classes: int = 10) -> CifarResNet:
    """A randomly initialised CIFAR ResNet of the given depth."""
    return CifarResNet(depth, num_classes)


def load_cifar_resnet(depth: int = 20, path: str | None = None, root: str | None = None) -> CifarResNet:
    """The pretrained CIFAR-10 ResNet-``depth`` of ../shared/data (``path`` overrides), loaded with strict=True,
    in eval mode. Raises FileNotFoundError when the checkpoint is absent."""
    ckpt = path if path is not None else data_file("cifar10", f"resnet{depth}_cifar10.pt", root=root)
    model = CifarResNet(depth, 10)
    state = torch.load(ckpt, map_location="cpu", weights_only=True)
    model.load_state_dict(state, strict=True)
    return model.eval()
