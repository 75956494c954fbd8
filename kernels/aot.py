"""Ahead-of-time compilation of every Triton kernel for sm_80 and sm_90, with no GPU.

``triton.compile(ASTSource(...), target=GPUTarget("cuda", arch, 32))`` produces PTX and a cubin; triton's
bundled ``ptxas -v`` then reports registers and spill bytes. Each specialization is compiled as the JIT
compiles it at launch: pointers 16-byte aligned (fresh torch allocations), ``per_program`` a multiple of 16,
and ``inner = C = 1`` folded to constants for per-tensor launches (the JIT specializes integer arguments
equal to 1). This catches GPU compile errors the interpreter cannot see, and checks two things bit-exactness
relies on that the interpreter cannot: no fused multiply-adds and no flush-to-zero fp32 arithmetic in the PTX.

Run ``python -m zsqfast.kernels.aot`` for the table. TRITON_INTERPRET must be unset: interpreted kernels
cannot be compiled.
"""
from __future__ import annotations

import os
import re
import subprocess
import tempfile

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from ._common import COMPILE_OPTIONS
from .bn_stats import bn_stats_bwd_kernel, bn_stats_kernel
from .fake_quant import fake_quant_bwd_kernel, fake_quant_fwd_kernel
from .lowbit_gemm import lowbit_gemm_kernel, quant_tiles, quantize_rows_kernel, tiles
from .lowpass import GPU_TILES, circular_pass_kernel
from .lsq import lsq_bwd_kernel, lsq_fwd_kernel

ARCHS = (80, 90)
DTYPES = ("fp32", "fp16", "bf16")
BLOCK = 1024  # block_size() on a GPU
#: key of a variant's constexprs that carries launch options instead of a constexpr (removed before compiling)
LAUNCH_OPTIONS = "__launch_options__"


def _variant(fn, sig: dict, consts: dict, aligned_ints: tuple = ()) -> tuple:
    """``(fn, signature, constexprs, attrs)`` as the JIT would specialize a launch: every pointer and the
    ``aligned_ints`` divisible by 16; arguments in ``consts`` that are not constexpr parameters become
    constants (the JIT's specialization of integers equal to 1)."""
    sig = {k: ("constexpr" if k in consts else v) for k, v in sig.items()}
    attrs = {(i,): [["tt.divisibility", 16]] for i, (k, v) in enumerate(sig.items())
             if v.startswith("*") or k in aligned_ints}
    return fn, sig, consts, attrs


def specializations():
    """``(kernel, dtype, jit function, signature, constexprs, attrs)`` for every variant the launchers use.
    ``n%16``: the element count (per channel for lsq_bwd) is a multiple of 16, which the JIT specializes
    and which lets elementwise loads and stores vectorize; the other variant is any count."""
    for dt in DTYPES:
        for n16 in (False, True):
            count = ",n%16" if n16 else ""
            for per_channel in (False, True):
                pc = "per_channel" if per_channel else "per_tensor"
                geometry = {} if per_channel else {"inner": 1, "C": 1}
                for need_mask in (False, True):
                    sig = {"x_ptr": f"*{dt}", "out_ptr": f"*{dt}", "mask_ptr": "*u8" if need_mask else f"*{dt}",
                           "s_ptr": "*fp32", "inv_ptr": "*fp32", "zp_ptr": "*fp32", "n": "i32", "inner": "i32",
                           "C": "i32", "qmin": "fp32", "qmax": "fp32", "PER_CHANNEL": "constexpr",
                           "NEED_MASK": "constexpr", "BLOCK": "constexpr"}
                    consts = {**geometry, "PER_CHANNEL": per_channel, "NEED_MASK": need_mask, "BLOCK": BLOCK}
                    yield (f"fake_quant_fwd[{pc},{'mask' if need_mask else 'no_mask'}{count}]", dt,
                           *_variant(fake_quant_fwd_kernel, sig, consts, ("n",) if n16 else ()))
                sig = {"x_ptr": f"*{dt}", "out_ptr": f"*{dt}", "s_ptr": "*fp32", "inv_ptr": "*fp32", "n": "i32",
                       "inner": "i32", "C": "i32", "qmin": "fp32", "qmax": "fp32", "PER_CHANNEL": "constexpr",
                       "BLOCK": "constexpr"}
                yield (f"lsq_fwd[{pc}{count}]", dt, *_variant(
                    lsq_fwd_kernel, sig, {**geometry, "PER_CHANNEL": per_channel, "BLOCK": BLOCK},
                    ("n",) if n16 else ()))
                sig = {"g_ptr": f"*{dt}", "x_ptr": f"*{dt}", "gx_ptr": f"*{dt}", "partial_ptr": "*fp32",
                       "inv_ptr": "*fp32", "per_channel": "i32", "per_program": "i32", "inner": "i32", "C": "i32",
                       "qmin": "fp32", "qmax": "fp32", "PER_CHANNEL": "constexpr", "BLOCK": "constexpr"}
                yield (f"lsq_bwd[{pc}{count}]", dt, *_variant(
                    lsq_bwd_kernel, sig, {**geometry, "PER_CHANNEL": per_channel, "BLOCK": BLOCK},
                    ("per_program", "per_channel") if n16 else ("per_program",)))
            yield (f"fake_quant_bwd{'[n%16]' if n16 else ''}", dt, *_variant(
                fake_quant_bwd_kernel, {"g_ptr": f"*{dt}", "mask_ptr": "*u8", "out_ptr": f"*{dt}", "n": "i32",
                                        "BLOCK": "constexpr"}, {"BLOCK": BLOCK}, ("n",) if n16 else ()))
        yield ("bn_stats", dt, *_variant(
            bn_stats_kernel, {"x_ptr": f"*{dt}", "partial_ptr": "*fp32", "per_channel": "i32",
                              "per_program": "i32", "inner": "i32", "C": "i32", "BLOCK": "constexpr"},
            {"BLOCK": BLOCK}, ("per_program",)))
        for has_grad in (False, True):
            yield (f"bn_stats_bwd[{'grad' if has_grad else 'no_grad'}]", dt, *_variant(
                bn_stats_bwd_kernel, {"g_ptr": f"*{dt}", "x_ptr": f"*{dt}", "out_ptr": f"*{dt}", "a_ptr": "*fp32",
                                      "b_ptr": "*fp32", "n": "i32", "inner": "i32", "C": "i32",
                                      "HAS_GRAD": "constexpr", "BLOCK": "constexpr"},
                {"HAS_GRAD": has_grad, "BLOCK": BLOCK}))
    # the low-pass filter's circular pass (fp32 contract): along H (s_m = 1) and along W (s_l = 1)
    for axis, unit in (("H", "s_m"), ("W", "s_l")):
        yield (f"circular_pass[along_{axis}]", "fp32", *_variant(
            circular_pass_kernel, {"x_ptr": "*fp32", "out_ptr": "*fp32", "w_ptr": "*fp32", "L": "i32", "M": "i32",
                                   "s_plane": "i32", "s_l": "i32", "s_m": "i32", "T": "i32", "R": "i32",
                                   "BL": "constexpr", "BM": "constexpr"},
            {unit: 1, "BL": GPU_TILES[0], "BM": GPU_TILES[1]}))
    yield from lowbit_specializations()


def lowbit_specializations():
    """The low-bit GEMM / linear / conv variants: both tile configurations of ``tiles`` (M <= 16 also with
    M = 1, which the JIT folds), raw GEMM (A shifted) on nibble-packed, byte and 8-bit weights, the fused
    epilogue per tensor / per token, with and without bias, 4-bit and 8-bit operands, one group or several
    (convolution); the activation quantizer per tensor and per token. ``dtype`` is that of the output."""
    gemm_sig = {"a_ptr": "*u8", "w_ptr": "*u8", "out_ptr": "*i32", "M": "i32", "N": "i32", "K": "i32", "K_pad": "i32",
                "stride_a": "i32", "stride_w": "i32", "stride_out": "i32", "ra_ptr": "*i32", "stride_ra": "i32",
                "cw_ptr": "*i32", "za_ptr": "*i32", "zw_ptr": "*i32",
                "sa_ptr": "*fp32", "sw_ptr": "*fp32", "bias_ptr": "*fp32", "PACKED": "constexpr",
                "A_SHIFT": "constexpr", "W_SHIFT": "constexpr", "EPILOGUE": "constexpr", "PER_TOKEN": "constexpr",
                "HAS_BIAS": "constexpr", "BM": "constexpr", "BN": "constexpr"}
    flags = ("PACKED", "A_SHIFT", "W_SHIFT", "EPILOGUE", "PER_TOKEN", "HAS_BIAS")
    cases = [("gemm[w4]", (1, 1, 0, 0, 0, 0)), ("gemm[w6]", (0, 1, 0, 0, 0, 0)), ("gemm[w8]", (0, 1, 1, 0, 0, 0)),
             ("linear[w4a4,per_tensor,bias]", (1, 0, 0, 1, 0, 1)), ("linear[w3a3,per_token]", (1, 0, 0, 1, 1, 0)),
             ("linear[w4a8,per_tensor,bias]", (1, 1, 0, 1, 0, 1)), ("linear[w8a8,per_token,bias]", (0, 1, 1, 1, 1, 1)),
             ("conv[w4a4,grouped,bias]", (1, 0, 0, 1, 0, 1))]
    for m in (1, 16, 256):
        t = tiles(m)
        for name, bits in cases:
            consts = {**dict(zip(flags, map(bool, bits))), "BM": t["BM"], "BN": t["BN"],
                      LAUNCH_OPTIONS: {"num_warps": t["num_warps"], "num_stages": t["num_stages"]}}
            if m == 1:
                consts["M"] = 1
            if not name.startswith("conv"):  # one group: the JIT folds stride_ra = groups = 1
                consts["stride_ra"] = 1
            sig = dict(gemm_sig, out_ptr="*fp32" if bits[3] else "*i32")
            tile = "M=1" if m == 1 else f"{t['BM']}x{t['BN']}"
            label = f"lowbit_{name[:-1]},{tile}]"
            yield (label, sig["out_ptr"][1:], *_variant(lowbit_gemm_kernel, sig, consts, ("K_pad", "stride_w")))
    q = quant_tiles()
    for per_token in (False, True):
        yield (f"lowbit_quantize_rows[{'per_token' if per_token else 'per_tensor'}]", "u8", *_variant(
            quantize_rows_kernel, {"x_ptr": "*fp32", "q_ptr": "*u8", "rowsum_ptr": "*i32", "inv_ptr": "*fp32",
                                   "za_ptr": "*i32", "M": "i32", "K": "i32", "stride_x": "i32", "qmax": "fp32",
                                   "PER_TOKEN": "constexpr", "BR": "constexpr", "BK": "constexpr"},
            {"PER_TOKEN": per_token, "BR": q["BR"], "BK": q["BK"], LAUNCH_OPTIONS: {"num_warps": q["num_warps"]}}))


def ptxas_path() -> str:
    return os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")


def ptxas_report(ptx: str, arch: int) -> dict:
    """Registers and spill bytes (stores + loads) of the PTX's kernel, from ``ptxas -v``. Triton targets
    sm_90a for capability 90."""
    with tempfile.TemporaryDirectory() as d:
        src = os.path.join(d, "k.ptx")
        with open(src, "w") as f:
            f.write(ptx)
        gpu = f"sm_{arch}a" if arch == 90 else f"sm_{arch}"
        out = subprocess.run([ptxas_path(), "-v", f"--gpu-name={gpu}", src, "-o", os.path.join(d, "k.cubin")],
                             capture_output=True, text=True, check=True)
    text = out.stderr + out.stdout
    regs = re.search(r"Used (\d+) registers", text)
    spills = [int(a) + int(b) for a, b in re.findall(r"(\d+) bytes spill stores, (\d+) bytes spill loads", text)]
    return {"registers": int(regs.group(1)) if regs else -1, "spill_bytes": sum(spills)}


def ptx_float_checks(ptx: str) -> dict:
    """Counts of fp32 fused multiply-adds and flush-to-zero fp32 instructions in the PTX (both must be 0:
    either would round differently from the reference)."""
    return {"fma": len(re.findall(r"\bfma\.\w+\.f32\b", ptx)), "ftz": len(re.findall(r"\.ftz\b", ptx))}


def compile_all() -> list[dict]:
    """Compile every specialization for every arch; one row each: kernel, dtype, arch, registers,
    spill_bytes, fma, ftz (raises on a compile error)."""
    if not isinstance(fake_quant_fwd_kernel, triton.runtime.JITFunction):
        raise RuntimeError("kernels were imported under TRITON_INTERPRET=1; run the AOT check in a process without it")
    rows = []
    for label, dt, fn, sig, consts, attrs in specializations():
        consts = dict(consts)
        options = {**COMPILE_OPTIONS, **consts.pop(LAUNCH_OPTIONS, {})}  # a variant's own num_warps / stages
        for arch in ARCHS:
            k = triton.compile(ASTSource(fn=fn, signature=sig, constexprs=consts, attrs=attrs),
                               target=GPUTarget("cuda", arch, 32), options=dict(options))
            if not k.asm.get("cubin"):
                raise RuntimeError(f"{label}[{dt}] sm_{arch}: no cubin")
            ptx = k.asm["ptx"]
            rows.append({"kernel": label, "dtype": dt, "arch": f"sm_{arch}", **ptxas_report(ptx, arch),
                         **ptx_float_checks(ptx)})
    return rows


def main() -> None:
    rows = compile_all()
    print(f"{'kernel':40s} {'dtype':5s} {'arch':6s} {'registers':>9s} {'spill bytes':>11s} {'fma':>4s} {'ftz':>4s}")
    for r in rows:
        print(f"{r['kernel']:40s} {r['dtype']:5s} {r['arch']:6s} {r['registers']:9d} {r['spill_bytes']:11d} "
              f"{r['fma']:4d} {r['ftz']:4d}")


if __name__ == "__main__":
    main()
