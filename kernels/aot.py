"""Ahead-of-time compilation of every Triton kernel for sm_80 and sm_90, with no GPU.

``triton.compile(ASTSource(...), target=GPUTarget("cuda", arch, 32))`` produces PTX and a cubin; triton's
bundled ``ptxas -v`` then reports registers and spill bytes. This catches GPU compile errors the
interpreter cannot see. Run ``python -m zsqfast.kernels.aot`` for the table (TRITON_INTERPRET must be unset:
interpreted kernels cannot be compiled).
"""
from __future__ import annotations

import os
import re
import subprocess
import tempfile

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from .bn_stats import bn_stats_bwd_kernel, bn_stats_kernel
from .fake_quant import fake_quant_bwd_kernel, fake_quant_fwd_kernel
from .lsq import lsq_bwd_kernel, lsq_fwd_kernel
from ._common import COMPILE_OPTIONS

ARCHS = (80, 90)
DTYPES = ("fp32", "fp16", "bf16")


def specializations():
    """``(label, jit function, signature, constexprs)`` for every variant the launchers can use."""
    for dt in DTYPES:
        for need_mask in (False, True):
            sig = {"x_ptr": f"*{dt}", "out_ptr": f"*{dt}", "mask_ptr": "*u8", "s_ptr": "*fp32", "inv_ptr": "*fp32",
                   "zp_ptr": "*fp32", "n": "i32", "n_bytes": "i32", "inner": "i32", "C": "i32", "qmin": "fp32",
                   "qmax": "fp32", "NEED_MASK": "constexpr", "BLOCK": "constexpr"}
            yield (f"fake_quant_fwd[{dt},mask={need_mask}]", fake_quant_fwd_kernel, sig,
                   {"NEED_MASK": need_mask, "BLOCK": 1024})
        yield (f"fake_quant_bwd[{dt}]", fake_quant_bwd_kernel,
               {"g_ptr": f"*{dt}", "mask_ptr": "*u8", "out_ptr": f"*{dt}", "n": "i32", "BLOCK": "constexpr"},
               {"BLOCK": 1024})
        yield (f"lsq_fwd[{dt}]", lsq_fwd_kernel,
               {"x_ptr": f"*{dt}", "out_ptr": f"*{dt}", "s_ptr": "*fp32", "inv_ptr": "*fp32", "n": "i32",
                "inner": "i32", "C": "i32", "qmin": "fp32", "qmax": "fp32", "BLOCK": "constexpr"}, {"BLOCK": 1024})
        yield (f"lsq_bwd[{dt}]", lsq_bwd_kernel,
               {"g_ptr": f"*{dt}", "x_ptr": f"*{dt}", "gx_ptr": f"*{dt}", "partial_ptr": "*fp32", "inv_ptr": "*fp32",
                "per_channel": "i32", "per_program": "i32", "inner": "i32", "C": "i32", "qmin": "fp32",
                "qmax": "fp32", "BLOCK": "constexpr"}, {"BLOCK": 1024})
        yield (f"bn_stats[{dt}]", bn_stats_kernel,
               {"x_ptr": f"*{dt}", "partial_ptr": "*fp32", "per_channel": "i32", "per_program": "i32", "inner": "i32",
                "C": "i32", "BLOCK": "constexpr"}, {"BLOCK": 1024})
        for has_grad in (False, True):
            yield (f"bn_stats_bwd[{dt},grad={has_grad}]", bn_stats_bwd_kernel,
                   {"g_ptr": f"*{dt}", "x_ptr": f"*{dt}", "out_ptr": f"*{dt}", "a_ptr": "*fp32", "b_ptr": "*fp32",
                    "n": "i32", "inner": "i32", "C": "i32", "HAS_GRAD": "constexpr", "BLOCK": "constexpr"},
                   {"HAS_GRAD": has_grad, "BLOCK": 1024})


def ptxas_path() -> str:
    return os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")


def ptxas_report(ptx: str, arch: int) -> dict:
    """Registers and spill bytes of the PTX's kernel, from ``ptxas -v``."""
    with tempfile.TemporaryDirectory() as d:
        src = os.path.join(d, "k.ptx")
        with open(src, "w") as f:
            f.write(ptx)
        out = subprocess.run([ptxas_path(), "-v", f"--gpu-name=sm_{arch}a" if arch == 90 else f"--gpu-name=sm_{arch}",
                              src, "-o", os.path.join(d, "k.cubin")], capture_output=True, text=True, check=True)
    text = out.stderr + out.stdout
    regs = re.search(r"Used (\d+) registers", text)
    spills = [int(a) + int(b) for a, b in re.findall(r"(\d+) bytes spill stores, (\d+) bytes spill loads", text)]
    return {"registers": int(regs.group(1)) if regs else -1, "spill_bytes": sum(spills)}


def compile_all() -> list[dict]:
    """Compile every specialization for every arch; one row each (raises on a compile error)."""
    if not isinstance(fake_quant_fwd_kernel, triton.runtime.JITFunction):
        raise RuntimeError("kernels were imported under TRITON_INTERPRET=1; run the AOT check in a process without it")
    rows = []
    for label, fn, sig, consts in specializations():
        for arch in ARCHS:
            k = triton.compile(ASTSource(fn=fn, signature=sig, constexprs=consts), target=GPUTarget("cuda", arch, 32),
                               options=dict(COMPILE_OPTIONS))
            assert k.asm.get("cubin"), f"{label} sm_{arch}: no cubin"
            rows.append({"kernel": label, "arch": f"sm_{arch}", **ptxas_report(k.asm["ptx"], arch)})
    return rows


def main() -> None:
    rows = compile_all()
    print(f"{'kernel':34s} {'arch':6s} {'registers':>9s} {'spill bytes':>11s}")
    for r in rows:
        print(f"{r['kernel']:34s} {r['arch']:6s} {r['registers']:9d} {r['spill_bytes']:11d}")


if __name__ == "__main__":
    main()
