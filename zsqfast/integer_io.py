"""Save / load an integer model (:func:`zsqfast.convert_to_integer`) without pickled code.

File format: one safetensors file. Tensors: the integer model's full ``state_dict`` (packed uint8 codes,
per-channel scales / zero points / column sums, biases, kept float layers, BatchNorms and QuantAct buffers).
Metadata key ``"zsqfast_integer"``: JSON ``{"format": 1, "edits": [...]}``, the structural edits that turn
the FLOAT architecture into the integer one, parents before children::

    {"path": "layer1.0.conv1", "op": "IntConv2d", "config": {in_channels, ..., w_bits, a_bits}}
    (an integer layer's edit may also name the BatchNorm folded into it: "bn": "layer1.0.bn1")
    {"path": "fc", "op": "IntLinear", "config": {in_features, out_features, bias, w_bits, a_bits}}
    {"path": "layer1.0.bn1", "op": "Identity", "was": "BatchNorm2d"}           a folded BatchNorm
    {"path": "blocks.1.bn1", "op": "FoldedNormAct", "was": "BatchNormAct2d"}   timm BN+act, BN folded
    {"path": "layer1.0.relu1", "op": "Identity", "was": "ReLU"}                a fused ReLU + QuantAct
    {"path": "relu", "op": "QuantAct", "was": "ReLU", "config": {bits, symmetric}}  Sequential(relu, QuantAct)

Loading: the caller supplies the architecture (the float model from its builder, e.g.
``zsqfast.models.build("resnet18")`` or ``cifar_resnet(20)``; its weights do not matter, or the fake-quant
model from quantize_model, or a zero-argument builder); the edits are replayed on it, each checked against
the module found at its path (type and shape), then the state_dict is loaded with ``strict=True``. Any
mismatch raises a ValueError naming the path.
"""
from __future__ import annotations

import json
import os
from typing import Callable

import torch
import torch.nn as nn

from ._trace import is_act_wrapper
from .convert import FORMAT_VERSION, FoldedNormAct
from .nn import QuantAct
from .nn.int_layers import IntConv2d, IntLinear
from .quantize_model import _swap

_META_KEY = "zsqfast_integer"


def save_integer_model(model: nn.Module, path: str | os.PathLike) -> None:
    """Write ``model`` (from :func:`zsqfast.convert_to_integer`) to ``path`` (safetensors, atomically)."""
    from safetensors.torch import save_file

    info = getattr(model, "zsqfast_integer", None)
    if not isinstance(info, dict) or "edits" not in info:
        raise ValueError("save_integer_model takes a model from zsqfast.convert_to_integer")
    tensors, seen = {}, set()
    for k, v in model.state_dict().items():
        v = v.detach().cpu().contiguous()
        if v.numel() and v.untyped_storage().data_ptr() in seen:  # safetensors refuses shared storage
            v = v.clone()
        if v.numel():
            seen.add(v.untyped_storage().data_ptr())
        tensors[k] = v
    tmp = f"{os.fspath(path)}.tmp"
    save_file(tensors, tmp, metadata={_META_KEY: json.dumps(info)})
    os.replace(tmp, path)


def _check_shape(path: str, fp: nn.Module, op: str, cfg: dict) -> None:
    if op == "IntConv2d":
        ok = isinstance(fp, nn.Conv2d) and (fp.in_channels, fp.out_channels, list(fp.kernel_size), fp.groups) == \
            (cfg["in_channels"], cfg["out_channels"], cfg["kernel_size"], cfg["groups"])
    else:
        ok = isinstance(fp, nn.Linear) and (fp.in_features, fp.out_features) == (cfg["in_features"],
                                                                                 cfg["out_features"])
    if not ok:
        raise ValueError(f"architecture mismatch at {path!r}: the file holds {op}({cfg}), the model has {fp}")


def _rebuild(root: nn.Module, edit: dict) -> None:
    path, op = edit["path"], edit["op"]
    try:
        fp = root.get_submodule(path)
    except AttributeError:
        raise ValueError(f"architecture mismatch: the model has no module {path!r} (the file needs one)") from None
    if is_act_wrapper(fp):  # a fake-quant model was given: its Sequential(relu, QuantAct) stands for the relu
        fp = fp[0]
    was = edit.get("was")
    if was is not None and type(fp).__name__ != was:
        raise ValueError(f"architecture mismatch at {path!r}: expected {was}, found {type(fp).__name__}")
    if op in ("IntConv2d", "IntLinear"):
        _check_shape(path, fp, op, edit["config"])
        new = (IntConv2d if op == "IntConv2d" else IntLinear)(**edit["config"])
    elif op == "Identity":
        new = nn.Identity()
    elif op == "FoldedNormAct":
        new = FoldedNormAct(fp.drop, fp.act)
    elif op == "QuantAct":
        new = nn.Sequential(fp, QuantAct(edit["config"]["bits"], symmetric=edit["config"]["symmetric"]))
    else:
        raise ValueError(f"unknown edit {op!r} at {path!r} (file written by a newer zsqfast?)")
    _swap(root, path, new)


def load_integer_model(path: str | os.PathLike, architecture: nn.Module | Callable[[], nn.Module]) -> nn.Module:
    """Rebuild an integer model saved by :func:`save_integer_model`.

    Args:
        path: the safetensors file.
        architecture: the float model it was converted from, freshly built (``zsqfast.models.build(name)``,
            ``cifar_resnet(20)``...; modified in place and returned), or the fake-quant model, or a
            zero-argument callable returning either.
    Returns:
        The integer model on the CPU in eval mode, with ``zsqfast_integer`` set (it can be saved again).
    Raises:
        ValueError: not a zsqfast integer file, or an architecture that does not match (module missing, of
            another type or shape, or state_dict keys / shapes that differ).
    """
    from safetensors import safe_open
    from safetensors.torch import load_file

    with safe_open(os.fspath(path), framework="pt") as f:
        meta = (f.metadata() or {}).get(_META_KEY)
    if meta is None:
        raise ValueError(f"{path} is not an integer model saved by zsqfast.save_integer_model")
    info = json.loads(meta)
    if info.get("format") != FORMAT_VERSION:
        raise ValueError(f"{path}: integer model format {info.get('format')}, this zsqfast reads {FORMAT_VERSION}")
    model = architecture() if callable(architecture) and not isinstance(architecture, nn.Module) else architecture
    if not isinstance(model, nn.Module):
        raise TypeError("architecture must be an nn.Module or a callable returning one")
    for edit in info["edits"]:
        _rebuild(model, edit)
    state = load_file(os.fspath(path))
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise ValueError(f"architecture mismatch loading {path}: {e}") from None
    for m in model.modules():
        if isinstance(m, QuantAct):
            m.freeze()
    model.zsqfast_integer = info
    return model.eval()
