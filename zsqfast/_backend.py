"""Backend selection: which implementation runs an op for a given device.

Every op is a ``torch.library`` op whose default kernel is the pure-PyTorch reference. For CPU and CUDA
tensors a small Python kernel picks an implementation from this registry:

=========  ==================  ===============================================================
backend    device              source
=========  ==================  ===============================================================
reference  any                 ``zsqfast/ops/*.py`` (defines the semantics)
cpp        CPU                 ``csrc/cpu`` through ``torch.ops.zsqfast_ext`` (runtime ISA dispatch)
triton     CUDA; CPU only      ``kernels/*.py``; CPU tensors only under ``TRITON_INTERPRET=1``
           under interpreter
cuda       CUDA                ``csrc/cuda`` through ``torch.ops.zsqfast_ext`` (compile-checked)
=========  ==================  ===============================================================

``ZSQFAST_BACKEND=auto|reference|cpp|triton|cuda`` (or :func:`set_backend` / :func:`use_backend`) forces
one. ``auto`` takes the first available of ``cpp, reference`` on CPU and ``triton, cuda, reference`` on
CUDA. An explicit choice that cannot run raises ``RuntimeError`` with the reason; ``auto`` never raises.
"""
from __future__ import annotations

import contextlib
import os
from typing import Callable, Iterator

BACKENDS = ("auto", "reference", "cpp", "triton", "cuda")
_AUTO_ORDER = {"cpu": ("cpp", "reference"), "cuda": ("triton", "cuda", "reference")}

_IMPLS: dict[str, dict[str, Callable]] = {}
_override: str | None = None


def register_impl(op: str, backend: str, fn: Callable) -> None:
    """Record ``fn`` as ``backend``'s implementation of kernel contract ``op``."""
    _IMPLS.setdefault(op, {})[backend] = fn


def get_backend() -> str:
    """The requested backend: :func:`set_backend`'s value, else ``$ZSQFAST_BACKEND``, else ``auto``."""
    name = _override if _override is not None else os.environ.get("ZSQFAST_BACKEND", "auto").strip().lower()
    if name not in BACKENDS:
        raise ValueError(f"ZSQFAST_BACKEND={name!r} is not one of {', '.join(BACKENDS)}")
    return name


def set_backend(name: str | None) -> None:
    """Force a backend for this process (``None`` returns control to ``$ZSQFAST_BACKEND``)."""
    global _override
    if name is not None and name not in BACKENDS:
        raise ValueError(f"backend {name!r} is not one of {', '.join(BACKENDS)}")
    _override = name


@contextlib.contextmanager
def use_backend(name: str) -> Iterator[None]:
    """Context manager form of :func:`set_backend`."""
    global _override
    previous = _override
    set_backend(name)
    try:
        yield
    finally:
        _override = previous


def unavailable_reason(backend: str, device_type: str, op: str | None = None) -> str | None:
    """``None`` when ``backend`` can run ``op`` on ``device_type`` tensors, else why not."""
    if backend == "reference":
        return None
    if backend == "cpp" and device_type != "cpu":
        return "the cpp backend runs CPU tensors only"
    if backend == "cuda" and device_type != "cuda":
        return "the cuda backend runs CUDA tensors only"
    if backend in ("cpp", "cuda"):
        from . import _ext

        reason = _ext.load_error()
        if reason is not None:
            return f"the C++ extension is not loaded: {reason}"
        if backend == "cuda" and not _ext.has_cuda():
            return "the C++ extension was built without CUDA sources (ZSQFAST_CUDA=0 or no nvcc at build time)"
    if backend == "triton":
        from . import _triton

        reason = _triton.unavailable_reason(device_type)
        if reason is not None:
            return reason
    if op is not None and backend not in _IMPLS.get(op, {}):
        return f"{backend} has no implementation of {op}"
    return None


_selected: dict[tuple[str, str, str], tuple[str, Callable]] = {}


def select(op: str, device_type: str) -> tuple[str, Callable]:
    """The ``(backend name, implementation)`` that runs ``op`` on ``device_type`` now.

    Availability cannot change within a process (the extension loads once, TRITON_INTERPRET is read at
    import), so successful choices are cached per (op, device, requested backend)."""
    requested = get_backend()
    key = (op, device_type, requested)
    hit = _selected.get(key)
    if hit is None:
        hit = _selected[key] = _select(op, device_type, requested)
    return hit


def _select(op: str, device_type: str, requested: str) -> tuple[str, Callable]:
    if requested != "auto":
        reason = unavailable_reason(requested, device_type, op)
        if reason is not None:
            raise RuntimeError(f"ZSQFAST_BACKEND={requested} cannot run {op} on {device_type}: {reason}")
        return requested, _IMPLS[op][requested]
    for name in _AUTO_ORDER.get(device_type, ("reference",)):
        if unavailable_reason(name, device_type, op) is None:
            return name, _IMPLS[op][name]
    return "reference", _IMPLS[op]["reference"]


def active_backend(device_type: str = "cpu", op: str = "fake_quant") -> str:
    """The backend that runs ``op`` on ``device_type`` tensors now (what :func:`select` picks)."""
    return select(op, device_type)[0]


def available_backends(device_type: str = "cpu", op: str = "fake_quant") -> list[str]:
    """Backends that can run ``op`` on ``device_type`` in this process (for tests and reports)."""
    return [b for b in BACKENDS[1:] if unavailable_reason(b, device_type, op) is None]
