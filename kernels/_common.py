"""Shared pieces of the Triton kernels: rounding, NaN-keeping clamp, dtype-exact stores, launch sizes, and
the one compile option they need."""
import triton
import triton.language as tl

from zsqfast._triton import interpreted

#: fp32 FMA contraction would merge ``x * inv + 1.5 * 2^23`` into one rounding and move ties; the kernels
#: must round exactly like the reference, so every launch (and the AOT check) disables it. 8 warps for
#: BLOCK=1024 (4 elements a thread).
COMPILE_OPTIONS = {"enable_fp_fusion": False, "num_warps": 8}

#: Largest element count: offsets are int32 and a program may compute (unused) offsets up to n + BLOCK - 1.
MAX_NUMEL = 2**31 - 2**16


@triton.jit
def rne(v):
    """Round fp32 ``v`` half to even, like ``torch.round``, for |v| < 2^22 (larger values only ever reach a
    clamp, which saturates them, or an "outside the grid" test, which they fail either way).

    Adding and subtracting 1.5 * 2^23 leaves the integer nearest to v, ties to even, with no libdevice (so it
    also runs in the interpreter); NaN and +-Inf pass through. The sum cancels to +0 for -0.5 <= v <= -0, so
    v's sign bit is OR-ed back in: ``round(-0.3) = -0.0`` as in torch (a non-zero result already has v's
    sign, so the OR only changes zeros)."""
    r = (v + 12582912.0) - 12582912.0
    sign = v.to(tl.uint32, bitcast=True) & 0x80000000
    return (r.to(tl.uint32, bitcast=True) | sign).to(tl.float32, bitcast=True)


@triton.jit
def clamp_nan(v, lo, hi):
    """clamp(v, lo, hi) that keeps NaN (every comparison with NaN is false), like ``torch.clamp``."""
    return tl.where(v < lo, lo, tl.where(v > hi, hi, v))


@triton.jit
def to_f32(v):
    """Widen fp32/fp16/bf16 ``v`` to fp32 exactly. bf16 is widened by its bits (``bits << 16``): the
    interpreter's bf16 -> fp32 cast garbles subnormals; on a GPU this is the same value as the cast."""
    if v.dtype == tl.bfloat16:
        return (v.to(tl.uint16, bitcast=True).to(tl.uint32) << 16).to(tl.float32, bitcast=True)
    else:
        return v.to(tl.float32)


@triton.jit
def store_rounded(ptr, offs, y, valid):
    """Store fp32 ``y`` into ``ptr``'s dtype rounding to nearest even like torch's ``.to()``: bf16 rounds
    with integer arithmetic (the interpreter's fp32 -> bf16 cast truncates), NaN becomes 0x7FC0; other
    dtypes convert (fp32: no-op, fp16: round to nearest even on both the GPU and the interpreter)."""
    if ptr.dtype.element_ty == tl.bfloat16:
        u = y.to(tl.uint32, bitcast=True)
        r = (u + 0x7FFF + ((u >> 16) & 1)) >> 16
        r = tl.where(y != y, 0x7FC0, r)
        tl.store(ptr + offs, r.to(tl.uint16).to(tl.bfloat16, bitcast=True), mask=valid)
    else:
        tl.store(ptr + offs, y.to(ptr.dtype.element_ty), mask=valid)


def block_size() -> int:
    """Elements per program (a multiple of 8): small grids under the interpreter (each program is a Python
    loop step), 1024 on a GPU (4 elements a thread with 8 warps)."""
    return 8192 if interpreted() else 1024


def channel_split(per_channel: int, C: int, block: int) -> tuple[int, int]:
    """``(per_program, programs)`` for a (C, programs) reduction grid: channel c's ``per_channel`` elements
    are cut into ``programs`` runs of ``per_program`` (a multiple of ``block``; the last run may be short).

    About 1024 programs in all on a GPU (one wave of 256-thread programs on an H100), each looping over
    whole blocks; 4 per channel under the interpreter, so tests reach multi-program, multi-block runs.
    The split depends only on the shape, so the reduction order (and result) is deterministic."""
    target = 4 if interpreted() else 1024
    want = max(1, target // C)  # programs per channel
    per_program = block * triton.cdiv(per_channel, block * want)
    return per_program, triton.cdiv(per_channel, per_program)


def check_size(n: int) -> None:
    if n > MAX_NUMEL:
        raise ValueError(f"the Triton kernels index with int32: tensors of {n} > 2^31 - 2^16 elements are not "
                         "supported")
