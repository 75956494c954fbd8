"""The integer reference semantics (zsqfast.ops.lowbit_*): packing round trips and the exact integer math
equals the float math of the fake-quant model it replaces."""
import pytest
import torch
import torch.nn.functional as F

import zsqfast
from zsqfast.ops import lowbit_gemm as G
from zsqfast.ops.lowbit_pack import BLOCK_K, LowbitWeight, pack_lowbit, packed_shape, unpack_lowbit


@pytest.mark.parametrize("bits", range(2, 9))
@pytest.mark.parametrize("K", [1, 63, 128, 129, 300])
def test_pack_round_trip(bits, K):
    q = torch.randint(0, 1 << bits, (7, K))
    p = pack_lowbit(q, bits)
    assert p.dtype == torch.uint8 and tuple(p.shape) == packed_shape(7, K, bits)
    assert torch.equal(unpack_lowbit(p, bits, K).long(), q)


def test_pack_layout_is_half_block_nibbles():
    q = torch.arange(BLOCK_K).remainder(16).reshape(1, -1)
    p = pack_lowbit(q, 4)
    j = torch.arange(64)
    assert torch.equal(p[0].long() & 15, j % 16) and torch.equal(p[0].long() >> 4, (j + 64) % 16)


def test_pack_rejects_bad_codes():
    with pytest.raises(ValueError, match="codes must lie"):
        pack_lowbit(torch.tensor([[0, 16]]), 4)
    with pytest.raises(TypeError):
        pack_lowbit(torch.zeros(2, 3), 4)


@pytest.mark.parametrize("wb,ab", [(4, 4), (3, 3), (2, 8), (8, 2), (5, 6)])
def test_linear_reference_equals_fake_quant(wb, ab):
    torch.manual_seed(0)
    w, x, b = torch.randn(13, 77), torch.randn(5, 77), torch.randn(13)
    s, z = zsqfast.minmax_qparams(w, wb, axis=0)
    sa, za = zsqfast.minmax_qparams(x, ab)
    lw = LowbitWeight.from_float(w, s, z, wb)
    assert torch.equal(lw.dequantize(), zsqfast.fake_quantize(w, s, z, wb, axis=0))
    y = zsqfast.lowbit_linear(x, lw.packed, lw.scale, lw.zero_point, lw.colsum, sa, za, ab, wb, 77, b)
    ref = F.linear(zsqfast.fake_quantize(x, sa, za, ab).double(), lw.dequantize().double(), b.double())
    torch.testing.assert_close(y.double(), ref, rtol=1e-5, atol=1e-5)
    acc = G.lowbit_gemm(G.quantize_codes(x, sa, za, ab), lw.packed, wb, 77)
    ua = G.quantize_codes(x, sa, za, ab).long()
    assert torch.equal(acc.long(), ua @ unpack_lowbit(lw.packed, wb, 77).long().T)


@pytest.mark.parametrize("groups", [1, 3, 6])
def test_conv_reference_equals_fake_quant(groups):
    torch.manual_seed(1)
    x, w = torch.randn(2, 6, 9, 8), torch.randn(12, 6 // groups, 3, 3)
    s, z = zsqfast.minmax_qparams(w, 4, axis=0)
    sa, za = zsqfast.minmax_qparams(x, 4)  # za inside the code range: padding is the code za
    lw = LowbitWeight.from_float(w, s, z, 4)
    y = zsqfast.lowbit_conv2d(x, lw.packed, lw.scale, lw.zero_point, lw.colsum, sa, za, 4, 4, 3, stride=2,
                              padding=1, groups=groups)
    ref = F.conv2d(zsqfast.fake_quantize(x, sa, za, 4).double(), lw.dequantize().reshape(w.shape).double(),
                   None, 2, 1, 1, groups)
    torch.testing.assert_close(y.double(), ref, rtol=1e-5, atol=1e-5)


def test_bad_inputs():
    lw = LowbitWeight.from_float(torch.randn(4, 8), torch.full((4,), 0.1), torch.full((4,), 8.0), 4)
    one = torch.ones(1)
    with pytest.raises(ValueError, match="features"):
        zsqfast.lowbit_linear(torch.randn(2, 9), lw.packed, lw.scale, lw.zero_point, lw.colsum, one, one, 4, 4, 8)
    with pytest.raises(ValueError, match="NaN"):
        zsqfast.lowbit_linear(torch.full((2, 8), float("nan")), lw.packed, lw.scale, lw.zero_point, lw.colsum,
                              one, one, 4, 4, 8)
    with pytest.raises(ValueError, match="bits"):
        zsqfast.lowbit_linear(torch.randn(2, 8), lw.packed, lw.scale, lw.zero_point, lw.colsum, one, one, 9, 4, 8)


def test_opcheck():
    lw = LowbitWeight.from_float(torch.randn(5, 40), torch.full((5,), 0.1), torch.full((5,), 8.0), 4)
    a = torch.randint(0, 16, (3, 40), dtype=torch.uint8)
    torch.library.opcheck(G.lowbit_gemm, (a, lw.packed, 4, 40))
    torch.library.opcheck(G.lowbit_linear_op, (torch.randn(3, 40), lw.packed, lw.scale, lw.zero_point, lw.colsum,
                                               torch.full((1,), 0.2), torch.zeros(1), 4, 4, 40, torch.randn(5)))


def _conv_case():
    lw = LowbitWeight.from_float(torch.randn(8, 16, 3, 3), torch.full((8,), 0.2), torch.full((8,), 8.0), 4)
    return lw, (lw.packed, lw.scale, lw.zero_point, lw.colsum)


@pytest.mark.parametrize("backend", ["auto", "reference"])
def test_conv_checks_the_channel_count_against_k(backend):
    """16 and 15 input channels pad to the same packed K: only the weight's true K tells them apart."""
    torch.manual_seed(2)
    lw, w = _conv_case()
    grid = (torch.tensor([0.1]), torch.tensor([0], dtype=torch.int32), 4, 4, 3)
    x = torch.rand(1, 16, 6, 6)
    with zsqfast.use_backend(backend):
        assert torch.equal(zsqfast.lowbit_conv2d(x, *w, *grid, K=lw.K), zsqfast.lowbit_conv2d(x, *w, *grid))
        for c in (15, 17):
            with pytest.raises(ValueError, match=f"K={c * 9}, but the weight has K=144"):
                zsqfast.lowbit_conv2d(torch.rand(1, c, 6, 6), *w, *grid, K=lw.K)


def test_conv_geometry_and_linear_k_errors():
    _, w = _conv_case()
    grid = (torch.tensor([0.1]), torch.tensor([0], dtype=torch.int32), 4, 4, 3)
    x = torch.rand(1, 16, 6, 6)
    for kw, msg in [(dict(stride=0), "stride must be >= 1"), (dict(stride=(1, -1)), "stride must be >= 1"),
                    (dict(dilation=0), "dilation must be >= 1"), (dict(padding=-1), "padding must be >= 0")]:
        with pytest.raises(ValueError, match=msg):
            zsqfast.lowbit_conv2d(x, *w, *grid, **kw)
    lw = LowbitWeight.from_float(torch.randn(4, 10), torch.full((4,), 0.2), torch.full((4,), 8.0), 4)
    with pytest.raises(ValueError, match="K=0"):
        zsqfast.lowbit_linear(torch.rand(3, 0), torch.zeros(4, 0, dtype=torch.uint8), lw.scale, lw.zero_point,
                              lw.colsum, torch.tensor([0.1]), torch.zeros(1), 4, 4, 0)


@pytest.mark.parametrize("backend", ["auto", "reference"])
def test_integer_ops_check_zero_points_and_activation_scale(backend):
    """The kernels take int32 zero points (a fraction would be truncated there, kept by the reference): a
    fractional one is an error, an integer-valued float one gives the int32 result; a_scale > 0, finite."""
    torch.manual_seed(3)
    lw = LowbitWeight.from_float(torch.randn(4, 10), torch.full((4,), 0.2), torch.full((4,), 8.0), 4)
    lcw, cw = _conv_case()
    x, xc, sa = torch.rand(3, 10), torch.rand(1, 16, 6, 6), torch.tensor([0.1])

    def lin(w_zero, a_scale, a_zero):
        return zsqfast.lowbit_linear(x, lw.packed, lw.scale, w_zero, lw.colsum, a_scale, a_zero, 4, 4, 10)

    def conv(w_zero, a_scale, a_zero):
        return zsqfast.lowbit_conv2d(xc, cw[0], cw[1], w_zero, cw[3], a_scale, a_zero, 4, 4, 3)

    with zsqfast.use_backend(backend):
        for f, wz in ((lin, lw.zero_point), (conv, lcw.zero_point)):
            za = torch.tensor([3], dtype=torch.int32)
            assert torch.equal(f(wz.float(), sa, za.float()), f(wz, sa, za))
            for bad in (7.6, -0.5, float("nan"), float("inf")):
                with pytest.raises(ValueError, match="a_zero must hold integer values"):
                    f(wz, sa, torch.tensor([bad]))
            with pytest.raises(ValueError, match="w_zero must hold integer values"):
                f(wz.float() + 0.5, sa, za)
            for bad in (0.0, -0.1, float("nan"), float("inf")):
                with pytest.raises(ValueError, match="a_scale must be positive and finite"):
                    f(wz, torch.tensor([bad]), za)
