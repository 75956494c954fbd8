"""Real evaluation images for ``zsqfast eval`` / ``quantize --eval-data``: an .npz file or an image folder.

* ``.npz`` (the layout of ../shared/data/cifar10/test_dev_5k.npz): ``images`` uint8 (N, H, W, C) (or (N, H, W)
  grayscale), ``labels`` int (N,). Images whose size differs from the model's input are resized (bilinear).
* a directory ``root/<class>/<image>`` (torchvision ImageFolder: classes in sorted order = label ids):
  resized so the short side is ``H / 0.875`` then center-cropped to H x W (H == W <= 64: resized directly).

Both are scaled to [0, 1] then normalised with the model's mean / std
(:func:`zsqfast.models.loading.input_config`). Returns float32 (N, C, H, W) and int64 (N,).
"""
from __future__ import annotations

import os

import numpy as np
import torch
import torch.nn.functional as F


def _normalize(x: torch.Tensor, mean, std) -> torch.Tensor:
    c = x.shape[1]
    m = torch.tensor(mean[:c] if len(mean) >= c else mean * c, dtype=torch.float32).view(1, c, 1, 1)
    s = torch.tensor(std[:c] if len(std) >= c else std * c, dtype=torch.float32).view(1, c, 1, 1)
    return ((x - m) / s).contiguous()


def load_npz(path: str, input_size, mean, std, n: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    try:
        with np.load(path) as d:
            if "images" not in d or "labels" not in d:
                raise ValueError(f"{path} must hold arrays 'images' (N, H, W, C uint8) and 'labels' (N,); "
                                 f"it holds {sorted(d.keys())[:6]}")
            images, labels = d["images"][:n], d["labels"][:n]
    except (OSError, EOFError) as exc:  # not an npz / truncated
        raise ValueError(f"{path} is not a readable .npz file ({exc})") from None
    if images.ndim == 3:
        images = images[..., None]
    if images.dtype != np.uint8 or images.ndim != 4 or len(images) != len(labels):
        raise ValueError(f"{path}: expected uint8 images (N, H, W, C) and N labels, got {images.dtype} "
                         f"{images.shape} and {labels.shape}")
    c, h, w = input_size
    x = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float().div_(255.0)
    if x.shape[1] != c:
        raise ValueError(f"{path} has {x.shape[1]}-channel images but the model takes {c} channels")
    if tuple(x.shape[-2:]) != (h, w):
        x = F.interpolate(x, size=(h, w), mode="bilinear", align_corners=False, antialias=True)
    return _normalize(x, mean, std), torch.as_tensor(labels, dtype=torch.int64)


def load_folder(path: str, input_size, mean, std, n: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    from torchvision import datasets, transforms

    c, h, w = input_size
    resize = [transforms.Resize((h, w))] if max(h, w) <= 64 else [transforms.Resize(int(round(h / 0.875))),
                                                                  transforms.CenterCrop((h, w))]
    tf = transforms.Compose([transforms.Grayscale() if c == 1 else transforms.Lambda(lambda im: im.convert("RGB")),
                             *resize, transforms.ToTensor()])
    try:
        ds = datasets.ImageFolder(path, transform=tf)
    except (FileNotFoundError, RuntimeError) as exc:
        raise ValueError(f"{path}: not an image folder of class subdirectories ({exc})") from None
    idx = range(len(ds) if n is None else min(n, len(ds)))
    xs, ys = zip(*(ds[i] for i in idx))
    return _normalize(torch.stack(xs), mean, std), torch.tensor(ys, dtype=torch.int64)


def load_eval_data(path: str, input_size, mean, std, n: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Real labelled images from ``path`` (module docstring); the first ``n`` when given."""
    if not os.path.exists(path):
        raise FileNotFoundError(f"evaluation data {path} not found; pass an .npz file (images, labels) or an "
                                "image folder root/<class>/<image>")
    if os.path.isdir(path):
        return load_folder(path, input_size, mean, std, n)
    return load_npz(path, input_size, mean, std, n)
