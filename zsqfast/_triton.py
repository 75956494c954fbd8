"""Whether Triton kernels can run here, and the one place that imports ``kernels``.

Triton kernels run on CUDA tensors on a GPU, and on CPU tensors only under the interpreter, which must be
switched on (``TRITON_INTERPRET=1``) before ``triton`` is first imported.
"""
from __future__ import annotations

import importlib
import os

_cache: dict[str, object] = {}


def kernels():
    """The ``zsqfast.kernels`` package (Triton kernels), imported on first use."""
    if "mod" not in _cache:
        _cache["mod"] = importlib.import_module("zsqfast.kernels")
    return _cache["mod"]


def interpreted() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def unavailable_reason(device_type: str) -> str | None:
    try:
        import triton  # noqa: F401
    except Exception as exc:
        return f"triton is not importable ({exc})"
    if device_type == "cpu" and not interpreted():
        return "Triton runs CPU tensors only under the interpreter (set TRITON_INTERPRET=1 before importing triton)"
    if device_type == "cuda" and interpreted():
        return "TRITON_INTERPRET=1 is set, so Triton cannot compile for the GPU in this process"
    if device_type not in ("cpu", "cuda"):
        return f"Triton does not run {device_type} tensors"
    try:
        kernels()
    except Exception as exc:
        return f"zsqfast.kernels failed to import ({type(exc).__name__}: {exc})"
    return None
