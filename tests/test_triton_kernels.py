"""Triton kernels (``zsqfast.kernels``) against the PyTorch references, bit for bit, on CPU tensors under
the Triton interpreter: awkward shapes and layouts, bits 2..8, signed / unsigned grids, ties, NaN / Inf /
-0 / subnormals (every fp16 and bf16 bit pattern), multi-program reductions, and the public API."""
import math

import pytest
import torch

import zsqfast
from zsqfast import _triton
from zsqfast.ops import fake_quantize as fq_ref
from zsqfast.ops import lsq as lsq_ref
from zsqfast.ops._common import qrange
from zsqfast.ops._layout import channel_geometry, dense, normalize_axis

from ._shapes import awkward_inputs, with_ties


def _skip_reason():
    if not _triton.interpreted():
        return "the Triton kernels run CPU tensors only under TRITON_INTERPRET=1 (tests/conftest.py sets it)"
    return _triton.unavailable_reason("cpu")


SKIP = _skip_reason()
pytestmark = [pytest.mark.skipif(SKIP is not None, reason=SKIP or ""),
              # numpy's notes on inf - inf and overflow inside the interpreter: those are the cases under test
              pytest.mark.filterwarnings("ignore:.*encountered in:RuntimeWarning")]

DTYPES = (torch.float32, torch.float16, torch.bfloat16)
CASES = awkward_inputs()
INT_VIEW = {torch.float32: torch.int32, torch.float16: torch.int16, torch.bfloat16: torch.int16}


def K():
    return _triton.kernels()


def assert_same(got, want):
    """Same dtype, shape, strides; NaN at the same places; every other element with the same bits (so
    -0.0 and +0.0 differ)."""
    assert got.dtype == want.dtype and got.shape == want.shape and got.stride() == want.stride()
    nan = want.isnan()
    assert torch.equal(got.isnan(), nan), "NaN positions differ"
    bad = (got.view(INT_VIEW[got.dtype]) != want.view(INT_VIEW[want.dtype])) & ~nan
    assert not bool(bad.any()), f"{int(bad.sum())} of {want.numel()} elements differ"


def assert_step_grad(got, want, grad, x, step, qmin, qmax, axis, grad_scale):
    """grad_step within 1e-5 of the reference, relative to sum |grad * dstep| (the sum's conditioning);
    NaN where the reference has NaN."""
    assert got.dtype == torch.float32 and got.shape == want.shape
    shape = [1] * x.dim()
    if axis is not None:
        shape[axis] = -1
    v = x.double() * torch.reciprocal(step.float()).double().reshape(shape)
    dstep = torch.where(v < qmin, float(qmin), torch.where(v > qmax, float(qmax), torch.round(v) - v))
    dims = [d for d in range(x.dim()) if d != axis]
    mag = (grad.double().abs() * dstep.abs()).sum(dim=dims) if dims else grad.double().abs() * dstep.abs()
    tol = 1e-5 * abs(grad_scale) * mag.reshape(-1) + 1e-30
    nan = want.isnan()
    assert torch.equal(got.isnan(), nan)
    err = (got.double() - want.double()).abs()[~nan]
    assert bool((err <= tol[~nan]).all()), f"max error {err.max().item()} vs tolerance {tol[~nan].min().item()}"


def with_specials(x, nan=True):
    """x with +-Inf, -0.0, a huge value (Inf in fp16), values past both grid ends and NaN written at a few
    positions."""
    vals = [math.inf, -math.inf, -0.0, 1e30, -1e6, 3e5] + ([math.nan] if nan else [])
    y = x.clone()
    for i, v in enumerate(vals[: x.numel()]):
        y[torch.unravel_index(torch.tensor(i * 7 % x.numel()), x.shape)] = v
    return y


def in_layout(t, x):
    """``t``'s values in ``x``'s memory layout (contiguous when ``x`` is not dense)."""
    return torch.empty_like(dense(x)).copy_(t)


def fq_params(x, axis, bits, symmetric):
    scale, zp = zsqfast.minmax_qparams(x.float(), bits, axis=axis, symmetric=symmetric)
    return scale.float().reshape(-1), (torch.zeros_like(scale) if symmetric else zp.float()).reshape(-1)


def grad_like(x, seed=1):
    """A random gradient with x's memory layout and dtype, -0.0 as its first element in memory."""
    g = torch.empty_like(x).copy_(torch.randn(x.shape, generator=torch.Generator().manual_seed(seed)))
    if g.numel():
        g.as_strided((1,), (1,)).fill_(-0.0)
    return g


def check_fake_quant(x, scale, zp, qmin, qmax, axis):
    """Forward (with and without mask) and backward of the kernel contract against the reference."""
    xd = dense(x)
    inner, nch = channel_geometry(xd, axis)
    masks = {}
    for need_mask in (True, False):
        out, masks[need_mask] = K().fake_quant(xd, scale, torch.reciprocal(scale), zp, qmin, qmax, inner, nch,
                                               need_mask)
        ref_out, ref_mask = fq_ref.reference(xd, scale, zp, qmin, qmax, axis, need_mask)
        assert_same(out, ref_out)
        assert masks[need_mask].dtype == torch.uint8 and torch.equal(masks[need_mask], ref_mask)
        assert masks[need_mask].shape == (((xd.numel() + 7) // 8) if need_mask else 0,)
    g = grad_like(xd)
    assert_same(K().fake_quant_backward(g, masks[True]), fq_ref.reference_backward(g, masks[True]))


def check_lsq(x, step, qmin, qmax, axis, grad_scale=0.37):
    xd = dense(x)
    inner, nch = channel_geometry(xd, axis)
    inv = torch.reciprocal(step)
    assert_same(K().lsq_fake_quant(xd, step, inv, qmin, qmax, inner, nch),
                lsq_ref.reference(xd, step, qmin, qmax, axis, grad_scale))
    g = grad_like(xd, seed=2)
    gx, gs = K().lsq_fake_quant_backward(g, xd, step, inv, qmin, qmax, inner, nch, grad_scale)
    ref_gx, ref_gs = lsq_ref.reference_backward(g, xd, step, qmin, qmax, axis, grad_scale)
    assert_same(gx, ref_gx)
    assert_step_grad(gs, ref_gs, g, xd, step, qmin, qmax, axis, grad_scale)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("i", range(len(CASES)), ids=[c[0] for c in CASES])
def test_fake_quant_awkward(i, dtype):
    _, x, axis = CASES[i]
    axis = normalize_axis(x, axis)  # as the public API passes it to the op
    bits, symmetric = 2 + (i % 7), i % 2 == 0
    x = x.to(dtype)
    scale, zp = fq_params(x, axis, bits, symmetric)
    x = in_layout(with_specials(with_ties(x, scale, axis)), x)
    check_fake_quant(x, scale, zp, *qrange(bits, symmetric), axis)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("i", range(len(CASES)), ids=[c[0] for c in CASES])
def test_lsq_awkward(i, dtype):
    _, x, axis = CASES[i]
    axis = normalize_axis(x, axis)
    bits, signed = 8 - (i % 7), i % 2 == 1
    x = x.to(dtype)
    nch = 1 if axis is None else x.size(axis)
    step = torch.linspace(0.05, 0.4, nch)
    x = in_layout(with_specials(with_ties(x, step, axis), nan=False), x)
    check_lsq(x, step, *qrange(bits, signed), axis)


@pytest.mark.parametrize("bits", range(2, 9))
def test_every_bits_signed_and_unsigned(bits):
    x = torch.randn(5, 6, 7, generator=torch.Generator().manual_seed(bits)).transpose(0, 2)  # dense, permuted
    for symmetric in (True, False):
        scale, zp = fq_params(x, 2, bits, symmetric)
        xt = in_layout(with_ties(x, scale, 2), x)
        check_fake_quant(xt, scale, zp, *qrange(bits, symmetric), 2)
        check_lsq(xt, scale, *qrange(bits, symmetric), 2)


def _all_patterns(dtype):
    """Every fp16 / bf16 bit pattern (NaN, +-Inf, +-0, subnormals); 65536 random fp32 patterns plus specials."""
    if dtype == torch.float32:
        g = torch.Generator().manual_seed(3)
        x = torch.randint(-2**31, 2**31 - 1, (65536,), generator=g, dtype=torch.int32).view(torch.float32)
        x[:8] = torch.tensor([math.nan, math.inf, -math.inf, -0.0, 0.0, 1e-45, -1e-45, 2.0**-127])
        return x
    return torch.arange(-2**15, 2**15, dtype=torch.int32).to(torch.int16).view(dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_every_bit_pattern(dtype):
    """Exact ties (power-of-two scales), subnormal inputs and outputs (scale 2^-127 / 2^-20), huge values,
    NaN and Inf; per tensor and per channel (inner = 1, C = 256)."""
    x = _all_patterns(dtype)
    tiny = 2.0**-127 if dtype != torch.float16 else 2.0**-20
    # per tensor, exact ties, signed 8-bit
    check_fake_quant(x, torch.tensor([0.125]), torch.zeros(1), -128, 127, None)
    check_lsq(x, torch.tensor([0.125]), -128, 127, None)
    # per tensor, unsigned 4-bit with a zero point, subnormal inputs reach the grid
    check_fake_quant(x, torch.tensor([tiny]), torch.tensor([5.0]), 0, 15, None)
    check_lsq(x, torch.tensor([tiny]), 0, 15, None)
    # per channel along the last axis: 256 scales from subnormal-reaching to large
    xc = x.reshape(256, 256)
    scales = torch.logspace(math.log2(tiny), 10, 256, base=2.0)
    zps = torch.arange(256.0) % 4
    check_fake_quant(xc, scales, zps, 0, 7, 1)
    check_lsq(xc, scales, -4, 3, 1)


def test_multi_program_and_multi_block():
    """Element counts past one program (mask bytes at program seams) and LSQ runs of several programs per
    channel that each loop over several blocks; channels in long runs (inner large) and interleaved
    (inner = 1)."""
    from zsqfast.kernels._common import block_size, channel_split

    block = block_size()
    g = torch.Generator().manual_seed(4)
    x = torch.randn(2 * block * 4 + 13, generator=g)
    per_program, programs = channel_split(x.numel(), 1, block)
    assert programs > 1 and per_program > block
    check_fake_quant(x, torch.tensor([0.02]), torch.zeros(1), -8, 7, None)
    check_lsq(x, torch.tensor([0.02]), -8, 7, None)
    xc = torch.randn(2, 5 * block + 3, generator=g)  # axis 0: inner = 5 * block + 3
    assert channel_split(xc.size(1), 2, block)[1] > 1
    step = torch.tensor([0.01, 0.03])
    check_fake_quant(xc, step, torch.tensor([0.0, 3.0]), -8, 7, 0)
    check_lsq(xc, step, -4, 3, 0)
    check_lsq(xc.t().contiguous(), step, 0, 15, 1)    # axis 1 of (N, 2): inner = 1


def test_lsq_nan_in_one_channel():
    x = torch.randn(4, 9, 6, generator=torch.Generator().manual_seed(5))
    x[1, 2, 3] = math.nan
    check_lsq(x, torch.tensor([0.1, 0.2, 0.3, 0.4]), -8, 7, 0)


def test_empty_and_single_element():
    for shape in ((0,), (3, 0, 2), (1,)):
        x = torch.full(shape, 0.3)
        s = torch.tensor([0.25])
        out, mask = K().fake_quant(x, s, 1 / s, torch.zeros(1), -8, 7, 1, 1, True)
        ref_out, ref_mask = fq_ref.reference(x, s, torch.zeros(1), -8, 7, None, True)
        assert_same(out, ref_out)
        assert torch.equal(mask, ref_mask)
        gx, gs = K().lsq_fake_quant_backward(torch.ones_like(x), x, s, 1 / s, -8, 7, 1, 1, 1.0)
        assert gs.shape == (1,) and gs.dtype == torch.float32 and gx.shape == x.shape
        if not x.numel():
            assert gs.item() == 0.0


def test_lsq_step_gradient_is_deterministic():
    x = torch.randn(64, 33, generator=torch.Generator().manual_seed(6))
    g = torch.randn(64, 33, generator=torch.Generator().manual_seed(7))
    step = torch.full((33,), 0.05)
    runs = [K().lsq_fake_quant_backward(g, x, step, 1 / step, -128, 127, 1, 33, 0.1)[1] for _ in range(2)]
    assert torch.equal(runs[0], runs[1])


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_public_api_on_triton_backend(dtype):
    """``zsqfast.use_backend("triton")`` runs these kernels and equals the reference backend, gradients too."""
    x = (torch.randn(4, 6, 5, 3, generator=torch.Generator().manual_seed(8)) * 2).to(dtype)
    x = x.contiguous(memory_format=torch.channels_last)
    g = torch.randn(x.shape, generator=torch.Generator().manual_seed(9)).to(dtype)
    scale, zp = zsqfast.minmax_qparams(x.float(), 4, axis=1)
    results = {}
    for backend in ("triton", "reference"):
        with zsqfast.use_backend(backend):
            assert zsqfast.active_backend("cpu", "fake_quant") == backend
            xr = x.clone().requires_grad_(True)
            out = zsqfast.fake_quantize(xr, scale, zp, 4, axis=1, ste="clipped")
            out.backward(g)
            xl = x.clone().requires_grad_(True)
            step = torch.full((6,), 0.2, requires_grad=True)
            out_l = zsqfast.lsq_fake_quantize(xl, step, 4, axis=1)
            out_l.backward(g)
            results[backend] = (out.detach(), xr.grad, out_l.detach(), xl.grad, step.grad)
    (o, gx, ol, glx, gs), (ro, rgx, rol, rglx, rgs) = results["triton"], results["reference"]
    for got, want in ((o, ro), (gx, rgx), (ol, rol), (glx, rglx)):
        assert_same(got, want)
    torch.testing.assert_close(gs, rgs, rtol=1e-5, atol=1e-6)
