"""Models by name, never with downloaded weights: ``cifar_resnet20``..., timm names, torchvision names."""
from __future__ import annotations

import torch.nn as nn

from .cifar_resnet import cifar_resnet


def build(name: str, num_classes: int | None = None, **kwargs) -> nn.Module:
    """Build a randomly initialised model (pretrained=False / weights=None; load your own checkpoint after).

    ``cifar_resnet<depth>`` -> :func:`cifar_resnet`; ``torchvision:<name>`` -> ``torchvision.models.<name>``;
    a timm name -> ``timm.create_model(name, pretrained=False, **kwargs)``; any other name that
    ``torchvision.models`` builds (``mobilenet_v2``, ``vit_b_16``, ...) -> torchvision (a name both know, such
    as ``resnet18``, is timm's; write ``torchvision:resnet18`` for torchvision's). ``kwargs`` go to the builder
    (timm: ``img_size``, ``depth``, ``drop_path_rate``, ...; the architecture of your checkpoint).
    """
    if name.startswith("cifar_resnet"):
        if kwargs:
            raise ValueError(f"{name} takes no model kwargs (got {sorted(kwargs)})")
        return cifar_resnet(int(name[len("cifar_resnet"):]), num_classes or 10)
    kw = dict(kwargs) if num_classes is None else dict(kwargs, num_classes=num_classes)
    import timm

    tv_name = name.split(":", 1)[1] if name.startswith("torchvision:") else None
    if tv_name is None and timm.is_model(name):
        return timm.create_model(name, pretrained=False, **kw)
    import torchvision

    arch = tv_name or name
    if arch not in torchvision.models.list_models(module=torchvision.models):
        if tv_name is not None:
            raise ValueError(f"torchvision has no model {arch!r} among its classification models")
        raise ValueError(f"unknown model {name!r}: not a timm model name, a torchvision classification model, "
                         "'torchvision:<name>' or 'cifar_resnet<depth>'")
    return torchvision.models.get_model(arch, weights=None, **kw)
