"""The C++ CPU kernels at every ISA level this CPU has (scalar, AVX2, AVX-512) against the reference:
outputs and STE masks bit-exact, LSQ step gradients to fp32 summation-order tolerance."""
import pytest
import torch

import zsqfast
from zsqfast.ops import fake_quantize as fq_mod
from zsqfast.ops import lsq as lsq_mod

from ._shapes import awkward_inputs
from ._threads import num_threads


def _long_cases():
    """Sizes that cross chunk and vector boundaries, long channel runs and channel-last periods."""
    g = torch.Generator().manual_seed(3)
    return [
        ("flat-100003", torch.randn(100003, generator=g) * 2, None),
        ("weights-70x4608/axis0", torch.randn(70, 512, 3, 3, generator=g)[:, :, :, :].reshape(70, 4608), 0),
        ("nchw-3x20x33x35/axis1", torch.randn(3, 20, 33, 35, generator=g), 1),
        ("nhwc-2x300x9x31/axis1", torch.randn(2, 300, 9, 31, generator=g).contiguous(memory_format=torch.channels_last), 1),
        ("nhwc-4x5000x2x3/axis1", torch.randn(4, 5000, 2, 3, generator=g).contiguous(memory_format=torch.channels_last), 1),
    ]


CASES = awkward_inputs() + _long_cases()


@pytest.mark.parametrize("name,x,axis", CASES, ids=[c[0] for c in CASES])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_fake_quant_every_isa(cpu_isa, name, x, axis, dtype):
    x = x.to(dtype)
    if x.numel() > 3:
        x = fq_mod.dense(x).clone()
        fq_mod.C.memory_flat(x)[::97] = float("nan")  # NaNs at scattered positions
    scale, zp = zsqfast.minmax_qparams(torch.nan_to_num(x), 3, axis=axis)
    scale = scale * 0.75
    args = (scale, zp, 0, 7, None if axis is None else axis % x.dim(), True)
    with zsqfast.use_backend("reference"):
        want, want_mask = fq_mod.fake_quant(x, *args)
    with zsqfast.use_backend("cpp"):
        got, got_mask = fq_mod.fake_quant(x, *args)
        g = fq_mod.C.empty_strided_like(torch.randn(got.shape).to(dtype), got.stride())
        back = fq_mod.fake_quant_backward(g, got_mask)
    assert got.stride() == want.stride()
    assert torch.equal(got_mask, want_mask)
    assert torch.allclose(got.float(), want.float(), rtol=0, atol=0, equal_nan=True)
    assert torch.equal(back, fq_mod.reference_backward(g, want_mask))


@pytest.mark.parametrize("name,x,axis", CASES, ids=[c[0] for c in CASES])
def test_lsq_every_isa(cpu_isa, name, x, axis):
    ax = None if axis is None else axis % x.dim()
    n_ch = 1 if ax is None else x.size(ax)
    step = torch.rand(n_ch, generator=torch.Generator().manual_seed(1)) * 0.3 + 0.05
    g = fq_mod.C.empty_strided_like(torch.randn(x.shape), fq_mod.dense(x).stride())  # grad in x's layout
    with zsqfast.use_backend("reference"):
        want = lsq_mod.lsq_fake_quant(x, step, -4, 3, ax, 0.01)
        want_gx, want_gs = lsq_mod.lsq_fake_quant_backward(g, x, step, -4, 3, ax, 0.01)
    with zsqfast.use_backend("cpp"):
        got = lsq_mod.lsq_fake_quant(x, step, -4, 3, ax, 0.01)
        got_gx, got_gs = lsq_mod.lsq_fake_quant_backward(g, x, step, -4, 3, ax, 0.01)
    assert torch.equal(got, want) and torch.equal(got_gx, want_gx)
    assert torch.allclose(got_gs, want_gs, rtol=1e-4, atol=1e-4 * float(want_gs.abs().max()))


def test_lsq_step_gradient_independent_of_threads():
    x = torch.randn(3_000_000)
    step = torch.tensor([0.2])
    g = torch.randn_like(x)
    if "cpp" not in zsqfast.available_backends():
        pytest.skip("the C++ extension is not loaded")
    results = []
    for t in (1, 2):
        with num_threads(t), zsqfast.use_backend("cpp"):
            results.append(lsq_mod.lsq_fake_quant_backward(g, x, step, -8, 7, None, 1.0)[1])
    assert torch.equal(results[0], results[1])


def test_isa_names():
    if "cpp" not in zsqfast.available_backends():
        pytest.skip("the C++ extension is not loaded")
    assert zsqfast.cpu_isa() in ("scalar", "avx2", "avx512", "avx512_vnni")
    assert torch.ops.zsqfast_ext.set_cpu_isa("nonsense") is False
    assert torch.ops.zsqfast_ext.set_cpu_isa("scalar") is True
    assert zsqfast.cpu_isa() == "scalar"
    torch.ops.zsqfast_ext.set_cpu_isa("auto")
