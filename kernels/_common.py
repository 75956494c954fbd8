"""Shared pieces of the Triton kernels: rounding, launch sizes, and the one compile option they need."""
import triton
import triton.language as tl

from zsqfast._triton import interpreted

#: fp32 FMA contraction would merge ``x * inv + 1.5 * 2^23`` into one rounding and move ties; the kernels
#: must round exactly like the reference, so every launch (and the AOT check) disables it. 8 warps for
#: BLOCK=1024 (4 elements a thread): with 4 warps ptxas spilled 16 bytes in lsq_fwd[bf16] on sm_90.
COMPILE_OPTIONS = {"enable_fp_fusion": False, "num_warps": 8}


@triton.jit
def rne(v):
    """Round half to even for |v| < 2^22 (larger values only ever reach a clamp, which saturates them):
    adding and subtracting 1.5 * 2^23 leaves the integer nearest to v, ties to even (no libdevice needed,
    so it also runs in the interpreter). NaN and +-Inf pass through."""
    return (v + 12582912.0) - 12582912.0


@triton.jit
def clamp_nan(v, lo, hi):
    """clamp(v, lo, hi) that keeps NaN (comparisons with NaN are false)."""
    return tl.where(v < lo, lo, tl.where(v > hi, hi, v))


def block_size() -> int:
    """Elements per program: small grids under the interpreter (each program is a Python loop step)."""
    return 8192 if interpreted() else 1024


def check_size(n: int) -> None:
    if n >= 2**31:
        raise ValueError(f"the Triton kernels index with int32: tensors of {n} >= 2^31 elements are not supported")


@triton.jit
def store_rounded(ptr, offs, y, valid):
    """Store fp32 ``y`` into ``ptr``'s dtype rounding to nearest even like torch's ``.to()``: bf16 rounds
    with integer arithmetic (the interpreter would truncate), NaN becomes 0x7FC0; other dtypes convert."""
    if ptr.dtype.element_ty == tl.bfloat16:
        u = y.to(tl.uint32, bitcast=True)
        r = (u + 0x7FFF + ((u >> 16) & 1)) >> 16
        r = tl.where(y != y, 0x7FC0, r)
        tl.store(ptr + offs, r.to(tl.uint16).to(tl.bfloat16, bitcast=True), mask=valid)
    else:
        tl.store(ptr + offs, y.to(ptr.dtype.element_ty), mask=valid)
