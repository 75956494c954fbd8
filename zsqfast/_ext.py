"""Loads the compiled extension (``zsqfast/_C*.so``) once; never raises.

The extension defines the ``zsqfast_ext`` op namespace (raw kernels, CPU and, when built with CUDA, CUDA
keys). If it is missing or broken, importing zsqfast still works: one warning says why and every op runs
its reference. ``ZSQFAST_NO_EXT=1`` skips loading on purpose (no warning).
"""
from __future__ import annotations

import glob
import os
import warnings

import torch

_state: dict[str, object] = {}


def _load() -> None:
    if _state:
        return
    if os.environ.get("ZSQFAST_NO_EXT", "0") == "1":
        _state["error"] = "ZSQFAST_NO_EXT=1"
        return
    here = os.path.dirname(os.path.abspath(__file__))
    candidates = sorted(glob.glob(os.path.join(here, "_C*.so")) + glob.glob(os.path.join(here, "_C*.pyd")))
    if not candidates:
        _state["error"] = ("no compiled extension found next to zsqfast/__init__.py (installed with "
                           "ZSQFAST_SKIP_BUILD=1, or the build failed); run `pip install --no-build-isolation -e .`")
    else:
        try:
            torch.ops.load_library(candidates[0])
            torch.ops.zsqfast_ext.fake_quant  # noqa: B018  (the schema must be there)
            _state["error"] = None
        except Exception as exc:  # a broken build must not break `import zsqfast`
            _state["error"] = f"{candidates[0]} failed to load: {type(exc).__name__}: {exc}"
    if _state["error"] is not None:
        warnings.warn(f"zsqfast: the compiled extension is unavailable, using the PyTorch reference kernels "
                      f"({_state['error']})", RuntimeWarning, stacklevel=3)


def load_error() -> str | None:
    """``None`` when the extension is loaded, else the reason it is not."""
    _load()
    return _state["error"]  # type: ignore[return-value]


def has_cuda() -> bool:
    """True when the loaded extension carries CUDA kernels."""
    if load_error() is not None:
        return False
    return torch._C._dispatch_has_kernel_for_dispatch_key("zsqfast_ext::fake_quant", "CUDA")


def cpu_isa() -> str:
    """The instruction set the C++ CPU kernels dispatch to on this machine (e.g. ``avx512_vnni``)."""
    if load_error() is not None:
        return "unavailable"
    return torch.ops.zsqfast_ext.cpu_isa()
