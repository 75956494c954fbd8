"""Pretrained models by name for the command line and the pipeline: never downloads anything.

* ``cifar_resnet<depth>``: the CIFAR ResNets; without ``checkpoint`` the pretrained ``resnet<depth>_cifar10.pt``
  of the data directory (``$ZSQFAST_DATA``, default ``../shared/data``).
* ``digits_cnn``: the demo's small BatchNorm CNN for 1x8x8 digits (needs ``checkpoint``).
* any timm model name (``resnet18``, ``deit_tiny_patch16_224``, ``swin_tiny_patch4_window7_224``...), a
  torchvision classification model name (``mobilenet_v2``...) or ``torchvision:<name>``: built with random
  weights (and the builder's ``model_kwargs``, e.g. timm's ``img_size``), then ``checkpoint`` (required: no
  weights are downloaded) is loaded into it.

Checkpoints: a plain state_dict, or a dict holding one under ``state_dict`` / ``model`` / ``model_state_dict``;
a ``module.`` prefix (DataParallel) is stripped. Loading is strict: a checkpoint of another architecture
raises ValueError naming the first missing / unexpected / mis-shaped keys.
"""
from __future__ import annotations

import os

import torch
import torch.nn as nn

from .zoo import build


def read_state_dict(path: str | os.PathLike) -> dict:
    """The state_dict stored in ``path`` (see the module docstring for the accepted layouts)."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint {path} not found; pass the path of a .pth/.pt state_dict")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # pickle errors, truncated files
        raise ValueError(f"{path} is not a readable PyTorch checkpoint ({type(exc).__name__}: "
                         f"{str(exc).splitlines()[0][:200]}); save it with torch.save(model.state_dict(), path)") from None
    if isinstance(obj, dict):
        for key in ("state_dict", "model", "model_state_dict"):
            if isinstance(obj.get(key), dict):
                obj = obj[key]
                break
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise ValueError(f"{path} holds no state_dict (expected a dict of tensors); save it with "
                         "torch.save(model.state_dict(), path)")
    if obj and all(k.startswith("module.") for k in obj):
        obj = {k[len("module."):]: v for k, v in obj.items()}
    return obj


def load_state(model: nn.Module, state: dict, what: str) -> nn.Module:
    """``model.load_state_dict(state, strict=True)`` with a ValueError saying what does not fit."""
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    shapes = [f"{k} {tuple(state[k].shape)} vs {tuple(v.shape)}" for k, v in own.items()
              if k in state and tuple(state[k].shape) != tuple(v.shape)]
    if missing or unexpected or shapes:
        parts = [f"{label}: {', '.join(items[:4])}{' ...' if len(items) > 4 else ''}"
                 for label, items in (("missing", missing), ("unexpected", unexpected), ("shape", shapes)) if items]
        raise ValueError(f"{what} does not fit model {type(model).__name__} ({'; '.join(parts)}); check --model "
                         "(and --num-classes) against the checkpoint")
    model.load_state_dict(state, strict=True)
    return model


def load_model(name: str, checkpoint: str | os.PathLike | None = None, *, num_classes: int | None = None,
               root: str | os.PathLike | None = None, model_kwargs: dict | None = None) -> nn.Module:
    """A pretrained float model in eval mode (module docstring); ``model_kwargs`` go to the timm / torchvision
    builder (e.g. ``{"img_size": 384}`` for a checkpoint of that size). Raises ValueError / FileNotFoundError
    with what to do for unknown names, bad kwargs, missing checkpoints and checkpoints of another
    architecture."""
    model_kwargs = dict(model_kwargs or {})
    if model_kwargs and (name.startswith("cifar_resnet") or name == "digits_cnn"):
        raise ValueError(f"--model {name} takes no --model-kwargs (they are for timm / torchvision builders)")
    if name.startswith("cifar_resnet") and checkpoint is None:
        from .cifar_resnet import load_cifar_resnet

        depth = name[len("cifar_resnet"):]
        if not depth.isdigit():
            raise ValueError(f"unknown model {name!r}: use cifar_resnet20, cifar_resnet56, ...")
        return load_cifar_resnet(int(depth), root=root)
    if name == "digits_cnn":
        from ..demo import DigitsCNN

        model = DigitsCNN(num_classes=num_classes or 10)
    else:
        try:
            model = build(name, num_classes, **model_kwargs)
        except TypeError as exc:  # an argument the builder does not take
            raise ValueError(f"--model {name} does not take these --model-kwargs {model_kwargs}: {exc}") from None
    if checkpoint is None:
        raise ValueError(f"--model {name} needs --checkpoint PATH: zsqfast never downloads weights (a model with "
                         "random weights cannot be quantized meaningfully)")
    return load_state(model, read_state_dict(checkpoint), f"checkpoint {checkpoint}").eval()


def timm_input_size(model: nn.Module) -> tuple[int, int, int] | None:
    """(C, H, W) a timm model takes: its ``pretrained_cfg['input_size']``, with H, W replaced by the patch
    embedding's ``img_size`` when the model was built with another one (``img_size=32`` keeps the 224 of the
    pretrained config, but a ViT / Swin then only accepts 32 x 32). None for a model without a timm config."""
    cfg = getattr(model, "pretrained_cfg", None) or getattr(model, "default_cfg", None)
    if not isinstance(cfg, dict) or "input_size" not in cfg:
        return None
    c, h, w = (int(v) for v in cfg["input_size"])
    size = getattr(getattr(model, "patch_embed", None), "img_size", None)
    if isinstance(size, (tuple, list)) and len(size) == 2 and all(isinstance(v, int) for v in size):
        h, w = size
    return (c, h, w)


def input_config(model: nn.Module) -> dict:
    """``{"input_size": (C, H, W), "mean": (...), "std": (...)}``: a timm model's (:func:`timm_input_size`), the
    demo's ``DigitsCNN`` (1, 8, 8), a torchvision model's (3, 224, 224), else the CIFAR checkpoints' (3, 32, 32),
    all with the ImageNet constants (the digits' own scaling for ``DigitsCNN``).

    Raises ValueError for any other model whose first convolution does not take 3 channels: its input size
    cannot be guessed (pass ``input_shape=`` to the function that asked)."""
    from ..data import CIFAR_MEAN, CIFAR_STD
    from ..demo import DigitsCNN

    cfg = getattr(model, "pretrained_cfg", None) or getattr(model, "default_cfg", None)
    if isinstance(cfg, dict) and "input_size" in cfg:
        return dict(input_size=timm_input_size(model), mean=tuple(cfg.get("mean", CIFAR_MEAN)),
                    std=tuple(cfg.get("std", CIFAR_STD)))
    first = next((m for m in model.modules() if isinstance(m, nn.Conv2d)), None)
    if isinstance(model, DigitsCNN):
        return dict(input_size=(1, 8, 8), mean=(0.3,), std=(0.4,))  # zsqfast.demo.digits_data's scaling
    if first is not None and first.in_channels != 3:
        raise ValueError(f"cannot tell the input size of {type(model).__name__}: its first convolution takes "
                         f"{first.in_channels} channels, not 3; pass input_shape=(C, H, W)")
    if type(model).__module__.startswith("torchvision"):
        return dict(input_size=(3, 224, 224), mean=CIFAR_MEAN, std=CIFAR_STD)
    return dict(input_size=(3, 32, 32), mean=CIFAR_MEAN, std=CIFAR_STD)
