"""Glue between ``torch.library`` ops and the backend registry (:mod:`zsqfast._backend`).

``define_op`` declares an op once, registers its fake (meta) kernel and its pure-PyTorch reference as the
default (CompositeExplicitAutograd) kernel, and registers a CPU and a CUDA kernel that forward to the
implementation :func:`zsqfast._backend.select` picks at call time. Backends add implementations with
:func:`zsqfast._backend.register_impl`; the op sees only that table, so opcheck and torch.compile work
the same whichever backend runs.
"""
from __future__ import annotations

from typing import Callable

import torch

from .. import _backend

LIB = torch.library.Library("zsqfast", "DEF")


def define_op(name: str, schema: str, reference: Callable, fake: Callable, adapter: Callable) -> Callable:
    """Declare ``zsqfast::{name}{schema}``; return the op (``torch.ops.zsqfast.{name}.default``).

    ``reference(*op_args)`` defines the semantics. ``adapter(impl, *op_args)`` turns the op's arguments into
    the op's *kernel contract* (dense input, reciprocal scales, channel geometry: see the op's module) and
    calls a non-reference backend's ``impl`` with them.
    """
    LIB.define(name + schema)
    qualname = f"zsqfast::{name}"
    torch.library.register_fake(qualname, fake, lib=LIB)
    LIB.impl(name, reference, "CompositeExplicitAutograd")
    _backend.register_impl(name, "reference", reference)

    def _make(device_type: str) -> Callable:
        def kernel(*args):
            backend, impl = _backend.select(name, device_type)
            return impl(*args) if backend == "reference" else adapter(impl, *args)

        kernel.__name__ = f"{name}_{device_type}"
        return kernel

    for device_type, key in (("cpu", "CPU"), ("cuda", "CUDA")):
        LIB.impl(name, _make(device_type), key)
    return getattr(torch.ops.zsqfast, name).default
