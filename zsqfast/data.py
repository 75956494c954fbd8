"""Where the real evaluation data lives (``$ZSQFAST_DATA``, default ``<repo>/../shared/data``) and loaders.

Nothing is ever downloaded: a missing file raises FileNotFoundError saying where it was looked for.
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch

#: Input normalisation the CIFAR checkpoints of ../shared/data expect (ImageNet constants, RGB).
CIFAR_MEAN = (0.485, 0.456, 0.406)
CIFAR_STD = (0.229, 0.224, 0.225)


def data_dir(root: str | os.PathLike | None = None) -> Path:
    """``root`` if given, else ``$ZSQFAST_DATA``, else ``<repo root>/../shared/data`` (repo root: the parent
    of the ``zsqfast`` package directory). The directory may not exist: loaders raise FileNotFoundError."""
    if root is not None:
        return Path(root)
    env = os.environ.get("ZSQFAST_DATA")
    if env:
        return Path(env)
    return Path(__file__).resolve().parent.parent.parent / "shared" / "data"


def data_file(*parts: str, root: str | os.PathLike | None = None) -> Path:
    """Path of a data file; FileNotFoundError (with the place looked at and how to point elsewhere) if absent."""
    path = data_dir(root).joinpath(*parts)
    if not path.exists():
        raise FileNotFoundError(f"{path} not found (set ZSQFAST_DATA to the directory holding cifar10/)")
    return path


def normalize(images_uint8_nhwc: np.ndarray | torch.Tensor) -> torch.Tensor:
    """uint8 (N, H, W, 3) RGB (numpy or torch) -> float32 (N, 3, H, W): pixels / 255, then (x - mean) / std
    with :data:`CIFAR_MEAN` / :data:`CIFAR_STD`, what the CIFAR checkpoints expect (no resize or crop)."""
    x = torch.as_tensor(np.asarray(images_uint8_nhwc))
    if x.dtype != torch.uint8 or x.dim() != 4 or x.size(-1) != 3:
        raise ValueError(f"normalize expects uint8 images (N, H, W, 3), got {x.dtype} {tuple(x.shape)}")
    x = x.permute(0, 3, 1, 2).float().div_(255.0)
    mean = torch.tensor(CIFAR_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(CIFAR_STD).view(1, 3, 1, 1)
    return ((x - mean) / std).contiguous()


def load_cifar10_test(n: int | None = None, root: str | os.PathLike | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The 5,000 real CIFAR-10 test images of test_dev_5k.npz (class-balanced; JPEG-decoded pixels).

    Returns ``(images float32 (N, 3, 32, 32) normalised, labels int64 (N,))``, the first ``n`` when given.
    """
    with np.load(data_file("cifar10", "test_dev_5k.npz", root=root)) as d:
        images, labels = d["images"], d["labels"]
    if n is not None:
        images, labels = images[:n], labels[:n]
    return normalize(images), torch.as_tensor(labels, dtype=torch.int64)
