"""Save / load an integer model (:func:`zsqfast.convert_to_integer`) without pickled code.

File format 3 (formats 1 and 2 still load): one safetensors file.

Tensors: the integer model's ``state_dict`` (kept float layers, BatchNorms, QuantAct buffers, biases), except
that each IntConv2d / IntLinear at path ``p`` stores its weight DENSE instead of in the kernel layout:

    p.codes     uint8 (ceil(N * K * w_bits / 8),)  the (N, K) codes, bit-dense, no K padding
                                                  (:mod:`zsqfast.ops.lowbit_dense`: 4 bits = 2 codes a byte,
                                                  3 bits = 8 codes in 3 bytes)
    p.w_scale   fp32 (N,)                         stored as is
    p.w_zero    uint8 (N,) when every zero point lies in 0..255 (always for symmetric grids), else int32 (N,)
    p.bias, p.a_scale, p.a_zero                   stored as is (when the layer has them)

``p.packed`` (the padded half-block nibble layout of :func:`zsqfast.pack_lowbit`) and ``p.w_colsum`` (the row
sums of the codes) are NOT stored: :func:`load_integer_model` recomputes both from ``p.codes`` (whole-tensor
ops: unpack, ``pack_lowbit``, a row sum), so the file holds exactly ``w_bits`` bits per weight plus 5 to 8
bytes per output channel.

Metadata key ``"zsqfast_integer"``: JSON ``{"format": 3, "crc32": C, "edits": [...]}``; ``C`` is the CRC-32 of
the rest of that JSON (canonical: sorted keys, no spaces), then, per tensor in key order, its name, dtype and
shape and its bytes, so that any change to the edits (a flipped ``a_bits`` or stride), a renamed, retyped or
reshaped tensor or corrupted data is refused by name. The edits turn the FLOAT architecture into the
integer one, parents before children::

    {"path": "layer1.0.conv1", "op": "IntConv2d", "config": {in_channels, ..., w_bits, a_bits, channels_last}}
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

Format 2: as format 3 but ``C`` covers the tensor bytes only, and IntConv2d configs have no
``channels_last`` (it loads with the default, channels_last outputs, as it was written). Format 1: the plain
``state_dict`` (kernel layout ``p.packed`` and ``p.w_colsum`` included) with ``{"format": 1, "edits": [...]}``
and no checksum. Both load unchanged. A file of any other format raises a ValueError naming its version.
"""
from __future__ import annotations

import json
import os
import tempfile
import zlib
from typing import Callable

import torch
import torch.nn as nn

from ._fileio import default_file_mode
from ._trace import is_act_wrapper
from .convert import FORMAT_VERSION, FoldedNormAct
from .nn import QuantAct
from .nn.int_layers import IntConv2d, IntLinear, _IntLayer
from .ops.lowbit_dense import pack_dense, unpack_dense
from .ops.lowbit_pack import pack_lowbit, unpack_lowbit
from .quantize_model import _swap

_META_KEY = "zsqfast_integer"
#: file formats load_integer_model reads (FORMAT_VERSION, the one written, is the last)
READ_FORMATS = (1, 2, 3)


def _int_layers(model: nn.Module) -> dict[str, _IntLayer]:
    return {n: m for n, m in model.named_modules(remove_duplicate=False) if isinstance(m, _IntLayer)}


def _crc32(tensors: dict[str, torch.Tensor], meta: dict | None = None) -> int:
    """The checksum stored in the metadata. Format 3 (``meta``: the metadata without ``crc32``): CRC-32 of
    ``meta``'s canonical JSON, then, keys in sorted order, each tensor's name, dtype and shape and its bytes.
    Format 2 (``meta`` None): the tensor bytes only."""
    crc = 0 if meta is None else zlib.crc32(json.dumps(meta, sort_keys=True, separators=(",", ":")).encode())
    for k in sorted(tensors):
        t = tensors[k].contiguous().reshape(-1)
        if meta is not None:
            crc = zlib.crc32(json.dumps([k, str(t.dtype), list(tensors[k].shape)]).encode(), crc)
        crc = zlib.crc32(t.view(torch.uint8).numpy() if t.numel() else b"", crc)
    return crc


def _dense_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """The tensors of a format-2 / 3 file: the state_dict with every integer layer's ``packed`` / ``w_colsum``
    replaced by its dense ``codes`` and ``w_zero`` narrowed to uint8 when it fits (module docstring)."""
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    for p, m in _int_layers(model).items():
        pre = f"{p}." if p else ""
        del state[pre + "packed"], state[pre + "w_colsum"]
        state[pre + "codes"] = pack_dense(unpack_lowbit(m.packed.cpu(), m.w_bits, m.K), m.w_bits)
        z = state[pre + "w_zero"]
        if z.numel() and 0 <= int(z.min()) and int(z.max()) <= 255:
            state[pre + "w_zero"] = z.to(torch.uint8)
    return state


def saved_weight_bytes(model: nn.Module) -> int:
    """Bytes the integer layers' weights take in a :func:`save_integer_model` file: dense codes, scales and
    zero points (biases, activation grids and tensor headers not counted)."""
    state = _dense_tensors(model)
    return sum(state[f"{p}.{k}" if p else k].numel() * state[f"{p}.{k}" if p else k].element_size()
               for p in _int_layers(model) for k in ("codes", "w_scale", "w_zero"))


def save_integer_model(model: nn.Module, path: str | os.PathLike) -> None:
    """Write ``model`` (from :func:`zsqfast.convert_to_integer`) to ``path`` (safetensors, format 3, atomically).

    The weights are stored bit-dense (module docstring); :func:`load_integer_model` re-packs them."""
    from safetensors.torch import save_file

    info = getattr(model, "zsqfast_integer", None)
    if not isinstance(info, dict) or "edits" not in info:
        raise ValueError("save_integer_model takes a model from zsqfast.convert_to_integer")
    tensors, seen = {}, set()
    for k, v in _dense_tensors(model).items():
        if v.numel() and v.untyped_storage().data_ptr() in seen:  # safetensors refuses shared storage
            v = v.clone()
        if v.numel():
            seen.add(v.untyped_storage().data_ptr())
        tensors[k] = v
    meta = {"format": FORMAT_VERSION, "edits": info["edits"]}
    meta["crc32"] = _crc32(tensors, meta)
    if os.path.isdir(path):
        raise ValueError(f"{os.fspath(path)} is a directory; pass a file path for the integer model, e.g. "
                         f"{os.path.join(os.fspath(path), 'integer_model.safetensors')}")
    parent = os.path.dirname(os.path.abspath(path))
    os.makedirs(parent, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=parent, prefix=os.path.basename(path) + ".", suffix=".tmp")
    os.close(fd)
    try:
        save_file(tensors, tmp, metadata={_META_KEY: json.dumps(meta, separators=(",", ":"))})
        os.chmod(tmp, default_file_mode())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def _densify_back(model: nn.Module, state: dict[str, torch.Tensor], path) -> None:
    """Format 2 / 3 -> the kernel layout, in place: ``codes`` -> ``packed`` (pack_lowbit) and ``w_colsum`` (row
    sums), ``w_zero`` -> int32."""
    for p, m in _int_layers(model).items():
        pre = f"{p}." if p else ""
        if pre + "codes" not in state:
            raise ValueError(f"{path}: corrupted integer model file, tensor {pre + 'codes'!r} is missing")
        N = m.packed.size(0)
        try:
            codes = unpack_dense(state.pop(pre + "codes"), m.w_bits, (N, m.K))
        except ValueError as e:
            raise ValueError(f"{path}: corrupted integer model file at {p!r}: {e}") from None
        state[pre + "packed"] = pack_lowbit(codes, m.w_bits)
        state[pre + "w_colsum"] = codes.sum(1, dtype=torch.int32)
        if pre + "w_zero" in state:
            state[pre + "w_zero"] = state[pre + "w_zero"].to(torch.int32)


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
        ValueError: not a zsqfast integer file, a truncated or corrupted one (unreadable safetensors, bad
            metadata, checksum mismatch), a format this version does not read (named), or an architecture that
            does not match (module missing, of another type or shape, or state_dict keys / shapes that differ).
    """
    from safetensors import safe_open
    from safetensors.torch import load_file

    try:
        with safe_open(os.fspath(path), framework="pt") as f:
            meta = (f.metadata() or {}).get(_META_KEY)
        state = load_file(os.fspath(path)) if meta is not None else None
    except FileNotFoundError:
        raise
    except Exception as e:  # safetensors' own error type: a truncated or garbled header / data section
        raise ValueError(f"{path}: not a readable safetensors file (truncated or corrupted?): {e}") from None
    if meta is None:
        raise ValueError(f"{path} is not an integer model saved by zsqfast.save_integer_model")
    try:
        info = json.loads(meta)
    except ValueError:
        info = None
    if not isinstance(info, dict) or not isinstance(info.get("edits"), list):
        raise ValueError(f"{path}: corrupted integer model file (unreadable {_META_KEY!r} metadata)")
    version = info.get("format")
    if isinstance(version, bool) or version not in READ_FORMATS:
        raise ValueError(f"{path}: integer model file format {version!r}; this zsqfast reads formats "
                         f"{', '.join(map(str, READ_FORMATS))} (written by a newer zsqfast?)")
    covered = {k: v for k, v in info.items() if k != "crc32"} if version >= 3 else None
    if version >= 2 and info.get("crc32") != _crc32(state, covered):
        raise ValueError(f"{path}: corrupted integer model file (format {version}): checksum mismatch")
    model = architecture() if callable(architecture) and not isinstance(architecture, nn.Module) else architecture
    if not isinstance(model, nn.Module):
        raise TypeError("architecture must be an nn.Module or a callable returning one")
    for edit in info["edits"]:
        _rebuild(model, edit)
    if version >= 2:
        _densify_back(model, state, path)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise ValueError(f"architecture mismatch loading {path}: {e}") from None
    for m in model.modules():
        if isinstance(m, QuantAct):
            m.freeze()
    model.zsqfast_integer = {"format": FORMAT_VERSION, "edits": info["edits"]}
    return model.eval()
