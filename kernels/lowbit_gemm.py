"""Triton low-bit integer GEMM and linear layer: int8 ``tl.dot`` on unpacked weight nibbles, int32 accumulation.

Contracts and math: ``zsqfast/ops/lowbit_gemm.py``; weight layout: ``zsqfast/ops/lowbit_pack.py``.

GEMM (``lowbit_gemm_kernel``): program (i, j) owns the (BM, BN) output tile and walks K in the layout's
128-wide column blocks. For a 4-bit-packed weight, 64 bytes of a row hold a whole block, so one (64, BN)
byte tile gives both halves: ``b_lo = p & 0xF`` is K 128b .. 128b+63 and ``b_hi = p >> 4`` is K 128b+64 ..
128b+127, each multiplied with the matching (BM, 64) slice of activation codes (Triton has no int4 dot)::

    acc += dot(a[:, 128b : 128b+64], b_lo) + dot(a[:, 128b+64 : 128b+128], b_hi)      int8 x int8 -> int32

``tl.dot`` takes signed int8 only. Codes <= 127 (2..7 bits) are their own int8 value; 8-bit codes are
shifted, ``u ^ 0x80`` read as int8 is ``u - 128``, and the shift is undone exactly in int32 with the sums of
the other operand over the padded length K_pad (padded columns hold code 0 on both sides)::

    A shifted:  sum (a - 128) w         = acc - 128 cw             (cw = sum_k w)
    W shifted:  sum a (w - 128)         = acc - 128 ra             (ra = sum_k a)
    both:       sum (a - 128)(w - 128)  = acc - 128 ra - 128 cw + 2^14 K_pad

GPU int8 MMAs saturate (``mma ... .satfinite``) rather than wrap, so the shifted partial sums must fit too:
they do, ``|u - 128| <= 128 <= 2^8 - 1``, for every K the contract allows (``max_k``); the corrections
after the loop are plain int32 adds (wrap-around, and the true result fits). The raw GEMM does not know
the activation bit width, so it always shifts A and takes K <= ``max_k(8, w_bits)``.

Linear (``lowbit_linear``): a small row kernel quantizes x once into u8 codes and their int32 row sums
(``ra``); the GEMM's epilogue then forms, per tile, in int64 and fp32 as the reference does::

    c = acc - zw[n] ra[m] - za[m] cw[n] + K za[m] zw[n]            y = fp32(c) * fp32(sa[m] sw[n]) + bias[n]

Why a separate quantization pass instead of a fused prologue: every one of the N / BN column programs reads
the activation rows again; fused, each would re-read fp32 x (4 bytes a code instead of 1) and redo the
multiply / round / clamp in the inner loop, and the row sums would be recomputed per tile. One pass over x
(memory-bound, M K fp32 reads + M K bytes written) is cheaper from M >= 2 tiles of N on, keeps one GEMM
kernel for ``lowbit_gemm``, ``lowbit_linear`` and the im2col of a convolution, and keeps the GEMM loop pure
integer.
"""
import torch
import triton
import triton.language as tl

from zsqfast._triton import interpreted
from zsqfast.ops.lowbit_gemm import max_k

from ._common import COMPILE_OPTIONS, check_size, rne

#: the packed layout's K granule (zsqfast.ops.lowbit_pack.BLOCK_K) and half of it
BLOCK_K = tl.constexpr(128)
HALF_K = tl.constexpr(64)


@triton.jit
def _as_i8(u, SHIFT: tl.constexpr):
    """uint8 codes as int8 operands of tl.dot: ``u`` itself (codes <= 127) or ``u - 128`` (SHIFT)."""
    if SHIFT:
        return (u ^ 0x80).to(tl.int8, bitcast=True)
    else:
        return u.to(tl.int8, bitcast=True)


@triton.jit
def lowbit_gemm_kernel(a_ptr, w_ptr, out_ptr, M, N, K, K_pad, stride_a, stride_w, stride_out,
                       ra_ptr, stride_ra, cw_ptr, za_ptr, zw_ptr, sa_ptr, sw_ptr, bias_ptr,
                       PACKED: tl.constexpr, A_SHIFT: tl.constexpr, W_SHIFT: tl.constexpr,
                       EPILOGUE: tl.constexpr, PER_TOKEN: tl.constexpr, HAS_BIAS: tl.constexpr,
                       BM: tl.constexpr, BN: tl.constexpr):
    """a: uint8 (M, K) codes, row stride stride_a; w: uint8 packed (N, stride_w) (stride_w = K_pad / 2 when
    PACKED, else K_pad); out: int32 (M, N) accumulators, or fp32 (M, N) with EPILOGUE, row stride stride_out.
    Epilogue operands: ra int32 (M,) of stride stride_ra, cw, zw int32 (N,), sw fp32 (N,), bias fp32 (N,); za
    int32 and sa fp32 (M,) with PER_TOKEN, else (1,). Without EPILOGUE the shift corrections use sums taken
    here (ra_ptr .. bias_ptr are unused).

    Grouped GEMM (a grouped convolution): program_id(2) = g takes columns g K .. g K + K - 1 of a, weight
    rows and output columns g N .. g N + N - 1 and their per-channel operands, and ra[:, g]."""
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    g = tl.program_id(2)
    a_ptr += g * K
    w_ptr += g * N * stride_w
    out_ptr += g * N
    ra_ptr += g
    cw_ptr += g * N
    zw_ptr += g * N
    sw_ptr += g * N
    bias_ptr += g * N
    rm = pid_m * BM + tl.arange(0, BM)
    rn = pid_n * BN + tl.arange(0, BN)
    j = tl.arange(0, HALF_K)
    m_ok = rm < M
    n_ok = rn < N
    a_rows = a_ptr + rm[:, None] * stride_a
    w_cols = w_ptr + rn[None, :] * stride_w
    acc = tl.zeros((BM, BN), dtype=tl.int32)
    asum = tl.zeros((BM,), dtype=tl.int32)
    wsum = tl.zeros((BN,), dtype=tl.int32)
    for kb in range(0, K_pad // BLOCK_K):
        k_lo = j + kb * BLOCK_K
        k_hi = k_lo + HALF_K
        a_lo = tl.load(a_rows + k_lo[None, :], mask=m_ok[:, None] & (k_lo < K)[None, :], other=0)
        a_hi = tl.load(a_rows + k_hi[None, :], mask=m_ok[:, None] & (k_hi < K)[None, :], other=0)
        if PACKED:  # byte 64 kb + j: code 128 kb + j (low nibble), 128 kb + 64 + j (high nibble)
            p = tl.load(w_cols + (j + kb * HALF_K)[:, None], mask=n_ok[None, :], other=0)
            b_lo = p & 0xF
            b_hi = p >> 4
        else:  # one code a byte, K_pad columns
            b_lo = tl.load(w_cols + k_lo[:, None], mask=n_ok[None, :], other=0)
            b_hi = tl.load(w_cols + k_hi[:, None], mask=n_ok[None, :], other=0)
        if not EPILOGUE:
            if W_SHIFT:
                asum += tl.sum(a_lo.to(tl.int32), axis=1) + tl.sum(a_hi.to(tl.int32), axis=1)
            if A_SHIFT:
                wsum += tl.sum(b_lo.to(tl.int32), axis=0) + tl.sum(b_hi.to(tl.int32), axis=0)
        acc = tl.dot(_as_i8(a_lo, A_SHIFT), _as_i8(b_lo, W_SHIFT), acc, out_dtype=tl.int32)
        acc = tl.dot(_as_i8(a_hi, A_SHIFT), _as_i8(b_hi, W_SHIFT), acc, out_dtype=tl.int32)
    out_offs = rm[:, None] * stride_out + rn[None, :]
    out_ok = m_ok[:, None] & n_ok[None, :]
    if EPILOGUE:
        ra = tl.load(ra_ptr + rm * stride_ra, mask=m_ok, other=0)
        cw = tl.load(cw_ptr + rn, mask=n_ok, other=0)
        asum = ra
        wsum = cw
    # undo the int8 shifts (exact modulo 2^32, and the true value fits in int32)
    if A_SHIFT:
        acc += 128 * wsum[None, :]
    if W_SHIFT:
        acc += 128 * asum[:, None]
    if A_SHIFT and W_SHIFT:
        acc -= 16384 * K_pad
    if EPILOGUE:
        zw = tl.load(zw_ptr + rn, mask=n_ok, other=0).to(tl.int64)
        sw = tl.load(sw_ptr + rn, mask=n_ok, other=0.0)
        if PER_TOKEN:
            za = tl.load(za_ptr + rm, mask=m_ok, other=0).to(tl.int64)
            sa = tl.load(sa_ptr + rm, mask=m_ok, other=0.0)
        else:
            za = tl.zeros((BM,), dtype=tl.int64) + tl.load(za_ptr).to(tl.int64)
            sa = tl.zeros((BM,), dtype=tl.float32) + tl.load(sa_ptr)
        # c = sum_k (ua - za)(uw - zw), exact in int64
        c = (acc.to(tl.int64) - zw[None, :] * ra.to(tl.int64)[:, None] - za[:, None] * cw.to(tl.int64)[None, :]
             + (za[:, None] * zw[None, :]) * K)
        y = c.to(tl.float32) * (sa[:, None] * sw[None, :])          # fp32(c) * fp32(sa * sw)
        if HAS_BIAS:
            y = y + tl.load(bias_ptr + rn, mask=n_ok, other=0.0)[None, :]
        tl.store(out_ptr + out_offs, y, mask=out_ok)
    else:
        tl.store(out_ptr + out_offs, acc, mask=out_ok)


@triton.jit
def quantize_rows_kernel(x_ptr, q_ptr, rowsum_ptr, inv_ptr, za_ptr, M, K, stride_x, qmax, PER_TOKEN: tl.constexpr,
                         BR: tl.constexpr, BK: tl.constexpr):
    """x fp32 (M, G K) -> q uint8 (M, G K) codes ``clamp(rne(x * inv) + za, 0, qmax)`` (NaN -> 0), both of
    row stride stride_x, and rowsum int32 (M, G): rowsum[m, g] = sum of the codes of columns g K .. g K + K - 1
    (G = the grid's second dimension: one group of a grouped convolution a program); inv fp32 and za int32
    of shape (M,) with PER_TOKEN, else (1,). BR rows a program."""
    g = tl.program_id(1)
    x_ptr += g * K
    q_ptr += g * K
    rowsum_ptr += g
    rows = tl.program_id(0) * BR + tl.arange(0, BR)
    r_ok = rows < M
    if PER_TOKEN:
        inv = tl.load(inv_ptr + rows, mask=r_ok, other=1.0)
        za = tl.load(za_ptr + rows, mask=r_ok, other=0).to(tl.float32)
    else:
        inv = tl.zeros((BR,), dtype=tl.float32) + tl.load(inv_ptr)
        za = tl.zeros((BR,), dtype=tl.float32) + tl.load(za_ptr).to(tl.float32)
    total = tl.zeros((BR,), dtype=tl.int32)
    for k0 in range(0, K, BK):
        cols = k0 + tl.arange(0, BK)
        ok = r_ok[:, None] & (cols < K)[None, :]
        offs = rows[:, None] * stride_x + cols[None, :]
        x = tl.load(x_ptr + offs, mask=ok, other=0.0)
        q = rne(x * inv[:, None]) + za[:, None]                         # as fake_quant: rne(x * (1/s)) + zp
        q = tl.where(q > qmax, qmax, tl.where(q >= 0.0, q, 0.0))        # clamp to [0, qmax]; NaN -> 0
        u = tl.where(ok, q.to(tl.int32), 0)
        tl.store(q_ptr + offs, u.to(tl.uint8), mask=ok)
        total += tl.sum(u, axis=1)
    tl.store(rowsum_ptr + rows * tl.num_programs(1), total, mask=r_ok)


def tiles(M: int) -> dict:
    """Tile sizes and launch options. GPU: 16-row tiles for small M (one mma row block, weight-bound: more
    column programs), 64 x 128 with 8 warps otherwise; interpreter: 32 x 32 (small grids, multi-program
    tests on small shapes)."""
    if interpreted():
        return {"BM": 32, "BN": 32, "num_warps": 4, "num_stages": 1}
    if M <= 16:
        return {"BM": 16, "BN": 64, "num_warps": 4, "num_stages": 3}
    return {"BM": 64, "BN": 128, "num_warps": 8, "num_stages": 3}


def quant_tiles() -> dict:
    return {"BR": 8, "BK": 512, "num_warps": 4} if interpreted() else {"BR": 4, "BK": 256, "num_warps": 4}


def _launch_gemm(a, w_packed, w_bits, K, out, *, a_shift, epilogue=None, groups=1):
    """One launch of lowbit_gemm_kernel: a (M, groups K) codes, w_packed (groups N, ...), out (M, groups N)."""
    M, N = a.size(0), w_packed.size(0) // groups
    K_pad = -(-K // BLOCK_K) * BLOCK_K
    check_size(max(a.numel(), w_packed.size(0) * K_pad, out.numel()))
    t = tiles(M)
    opts = {**COMPILE_OPTIONS, "num_warps": t["num_warps"], "num_stages": t["num_stages"]}
    e = epilogue or {}
    dummy = out
    grid = (triton.cdiv(M, t["BM"]), triton.cdiv(N, t["BN"]), groups)
    lowbit_gemm_kernel[grid](
        a, w_packed, out, M, N, K, K_pad, a.stride(0), w_packed.size(1), out.stride(0),
        e.get("ra", dummy), groups, e.get("cw", dummy), e.get("za", dummy), e.get("zw", dummy), e.get("sa", dummy),
        e.get("sw", dummy), dummy if e.get("bias") is None else e["bias"],
        PACKED=w_bits <= 4, A_SHIFT=a_shift, W_SHIFT=w_bits == 8, EPILOGUE=epilogue is not None,
        PER_TOKEN=bool(e) and e["sa"].numel() > 1,
        HAS_BIAS=e.get("bias") is not None, BM=t["BM"], BN=t["BN"], **opts)
    return out


def lowbit_gemm(a, w_packed, w_bits, K):
    """Kernel contract of ``zsqfast::lowbit_gemm``: int32 (M, N) ``sum_k a[m, k] * uw[n, k]``.

    Args:
        a: uint8 (M, K) contiguous activation codes (any value 0..255).
        w_packed: uint8 (N, K_pad / 2) (w_bits <= 4) or (N, K_pad) contiguous, zsqfast.pack_lowbit's layout.
        w_bits: 2..8. K: the reduction length.
    """
    if K > max_k(8, w_bits):  # tensor cores saturate (satfinite): the shifted partial sums must fit in int32
        raise ValueError(f"the Triton lowbit_gemm takes K <= {max_k(8, w_bits)} at {w_bits}-bit weights (it treats "
                         f"the activation codes as 8-bit), got K={K}")
    out = torch.empty((a.size(0), w_packed.size(0)), dtype=torch.int32, device=a.device)
    if out.numel():
        _launch_gemm(a, w_packed, w_bits, K, out, a_shift=True)
    return out


def quantize_rows(x, a_inv_scale, a_zero, a_bits, groups=1):
    """uint8 codes (M, C) of fp32 ``x`` (M, C) contiguous and their int32 row sums (M, groups) over each of
    the ``groups`` runs of C / groups columns (see quantize_rows_kernel)."""
    M, C = x.shape
    check_size(M * C)
    q = torch.empty((M, C), dtype=torch.uint8, device=x.device)
    ra = torch.empty((M, groups), dtype=torch.int32, device=x.device)
    if M:
        t = quant_tiles()
        quantize_rows_kernel[(triton.cdiv(M, t["BR"]), groups)](
            x, q, ra, a_inv_scale, a_zero, M, C // groups, C, float((1 << a_bits) - 1),
            PER_TOKEN=a_inv_scale.numel() > 1, BR=t["BR"], BK=t["BK"], **{**COMPILE_OPTIONS, "num_warps": t["num_warps"]})
    return q, ra


def grouped_linear(x, w_packed, w_bits, K, w_scale, w_zero, w_colsum, a_scale, a_inv_scale, a_zero, a_bits, bias,
                 groups=1):
    """fp32 (M, groups N) of ``x`` (M, groups K): quantize once, then one grouped GEMM with the epilogue
    (group g: columns g K .. of x, weight rows g N .., output columns g N ..)."""
    M = x.size(0)
    out = torch.empty((M, w_packed.size(0)), dtype=torch.float32, device=x.device)
    if not out.numel():
        return out
    q, ra = quantize_rows(x, a_inv_scale, a_zero, a_bits, groups)
    epi = {"ra": ra, "cw": w_colsum, "za": a_zero, "zw": w_zero, "sa": a_scale, "sw": w_scale, "bias": bias}
    return _launch_gemm(q, w_packed, w_bits, K, out, a_shift=a_bits == 8, epilogue=epi, groups=groups)


def lowbit_linear(x, w_packed, w_bits, K, w_scale, w_zero, w_colsum, a_scale, a_inv_scale, a_zero, a_bits, bias):
    """Kernel contract of ``zsqfast::lowbit_linear``: fp32 (M, N).

    Args:
        x: fp32 (M, K) contiguous. w_packed, w_bits, K: as :func:`lowbit_gemm`.
        w_scale fp32, w_zero and w_colsum int32: (N,). a_scale, a_inv_scale fp32 and a_zero int32: (1,) per
        tensor or (M,) per token. a_bits: 2..8. bias: fp32 (N,) or None.
    """
    return grouped_linear(x, w_packed, w_bits, K, w_scale, w_zero, w_colsum, a_scale, a_inv_scale, a_zero, a_bits,
                        bias)
