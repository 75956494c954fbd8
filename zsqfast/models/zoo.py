"""Models by name, never with downloaded weights: ``cifar_resnet20``..., timm names, ``torchvision:<name>``."""
from __future__ import annotations

import torch.nn as nn

from .cifar_resnet import cifar_resnet


def build(name: str, num_classes: int | None = None) -> nn.Module:
    """Build a randomly initialised model (pretrained=False / weights=None; load your own checkpoint after).

    ``cifar_resnet<depth>`` -> :func:`cifar_resnet`; ``torchvision:<name>`` -> ``torchvision.models.<name>``;
    anything else -> ``timm.create_model(name, pretrained=False)``.
    """
    if name.startswith("cifar_resnet"):
        return cifar_resnet(int(name[len("cifar_resnet"):]), num_classes or 10)
    kw = {} if num_classes is None else {"num_classes": num_classes}
    if name.startswith("torchvision:"):
        import torchvision

        arch = name.split(":", 1)[1]
        if not hasattr(torchvision.models, arch):
            raise ValueError(f"torchvision has no model {arch!r}")
        return getattr(torchvision.models, arch)(weights=None, **kw)
    import timm

    if not timm.is_model(name):
        raise ValueError(f"unknown model {name!r}: not a timm model name, 'torchvision:<name>' or "
                         "'cifar_resnet<depth>'")
    return timm.create_model(name, pretrained=False, **kw)
