"""The NHWC convolutions on AVX-512 VNNI (csrc/cpu/lowbit_conv_vnni.cpp: implicit GEMM for groups == 1;
lowbit_dw_vnni.cpp: depthwise), taken with exact padding, against the reference integer semantics, bit for
bit: awkward shapes, NCHW and channels_last inputs, batches large enough for the threaded paths, the
weight-panel cache, and the channels_last result every backend returns."""
import pytest
import torch

import zsqfast
from zsqfast.ops import lowbit_conv2d as CV

from .conftest import cpu_backends
from ._threads import num_threads
from .test_lowbit_cpu import _pair, assert_bits_equal, both, weight

pytestmark = pytest.mark.skipif("cpp" not in cpu_backends("lowbit_conv2d"), reason="the C++ extension is not loaded")

# B, C, H, W, OC, kernel, stride, padding, dilation
SHAPES = [
    (1, 16, 10, 10, 16, 3, 1, 1, 1),        # OC <= 16: the 16-column panels; batch 1
    (2, 5, 9, 7, 17, 3, 2, 1, 1),           # odd C (padded to 16 a pixel), odd OC, stride 2
    (1, 24, 8, 11, 33, (3, 1), (1, 2), (1, 0), 1),  # 24 channels, a 3x1 kernel, an odd panel tail
    (2, 130, 5, 5, 40, 3, 1, 1, 1),         # K = 1170: not a multiple of the 128-code block
    (1, 12, 13, 13, 20, 3, 1, 2, 2),        # dilation 2 with padding 2
    (3, 32, 7, 7, 64, 1, 2, 0, 1),          # 1x1 stride 2 (a ResNet downsample), 3 x 16 pixels: a row tail
    (1, 3, 12, 12, 8, 5, 1, 2, 1),          # 5x5, three input channels
    (4, 32, 16, 16, 32, 3, 1, 1, 1),        # > 2^23 MACs and B >= threads: images quantized in parallel
]
BITS = [(4, 4), (3, 3), (8, 8), (2, 8), (7, 5)]  # (w_bits, a_bits)


@pytest.mark.parametrize("case", SHAPES, ids=[str(i) for i in range(len(SHAPES))])
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
def test_implicit_conv_exact(case, channels_last):
    B, C, H, W, OC, k, s, p, d = case
    ks = _pair(k)
    g = torch.Generator().manual_seed(C * 7 + OC)
    for wb, ab in BITS:
        wp, sw, zw, cw = weight(OC, C * ks[0] * ks[1], wb, g)
        x = torch.randn(B, C, H, W, generator=g) * 2
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        for za_v in (0, 3, (1 << ab) - 1):  # the padded code za at both ends of the code range
            za = torch.tensor([za_v], dtype=torch.int32)
            bias = torch.randn(OC, generator=g) if za_v == 3 else None
            args = (x, wp, sw, zw, cw, torch.tensor([0.15]), za, ab, wb, ks, _pair(s), _pair(p), _pair(d), 1, bias)
            got, want = both(CV.lowbit_conv2d_op, *args)
            assert got.is_contiguous(memory_format=torch.channels_last)
            assert_bits_equal(got, want)


@pytest.mark.parametrize("wb, zw_range", [(7, (-9, -1)), (7, (129, 140)), (4, (-200, -120)), (8, (-3, 3))])
def test_implicit_conv_zero_points_outside_the_code_range(wb, zw_range):
    """Weight zero points outside 0..2^b-1 (an all-positive channel's min/max grid has zp < 0): codes minus zp
    no longer fit the s8 weight panels, so the conv must still be exact (another path takes it)."""
    g = torch.Generator().manual_seed(wb)
    wp, sw, zw, cw = weight(24, 16 * 9, wb, g, zw_range)
    x = torch.randn(2, 16, 9, 9, generator=g)
    za = torch.tensor([3], dtype=torch.int32)
    args = (x, wp, sw, zw, cw, torch.tensor([0.15]), za, 4, wb, (3, 3), (1, 1), (1, 1), (1, 1), 1, None)
    got, want = both(CV.lowbit_conv2d_op, *args)
    assert_bits_equal(got, want)


# B, C, H, W, kernel, stride, padding, dilation: depthwise (groups = C = OC) on the NHWC codes
DEPTHWISE = [
    (1, 16, 9, 9, 3, 1, 1, 1),
    (2, 24, 11, 7, 3, 2, 1, 1),      # 24 channels: a channel tail; stride 2
    (1, 8, 10, 10, 5, 1, 4, 2),      # 5x5 dilated
    (3, 40, 6, 6, (3, 1), (1, 2), (1, 0), 1),
    (8, 32, 28, 28, 3, 1, 1, 1),     # B >= threads: images quantized in parallel
]


@pytest.mark.parametrize("case", DEPTHWISE, ids=[str(i) for i in range(len(DEPTHWISE))])
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
def test_depthwise_nhwc_exact(case, channels_last):
    B, C, H, W, k, s, p, d = case
    ks = _pair(k)
    g = torch.Generator().manual_seed(C + H)
    for wb, ab in BITS:
        wp, sw, zw, cw = weight(C, ks[0] * ks[1], wb, g)
        x = torch.randn(B, C, H, W, generator=g) * 2
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        for za_v in (0, 3, (1 << ab) - 1):
            za = torch.tensor([za_v], dtype=torch.int32)
            bias = torch.randn(C, generator=g) if za_v == 3 else None
            args = (x, wp, sw, zw, cw, torch.tensor([0.15]), za, ab, wb, ks, _pair(s), _pair(p), _pair(d), C, bias)
            assert_bits_equal(*both(CV.lowbit_conv2d_op, *args))


def test_depthwise_far_activation_zero_point():
    """No padding and an activation zero point far outside the codes (x far from 0 on a tight grid): the
    int32 tap sums of the NHWC depthwise kernel would overflow, so another exact path must take it."""
    g = torch.Generator().manual_seed(5)
    wp, sw, zw, cw = weight(16, 9, 8, g)
    x = torch.rand(2, 16, 9, 9, generator=g) + 1e4
    za = torch.tensor([-(10 ** 7)], dtype=torch.int32)
    args = (x, wp, sw, zw, cw, torch.tensor([1e-3]), za, 8, 8, (3, 3), (1, 1), (0, 0), (1, 1), 16, None)
    assert_bits_equal(*both(CV.lowbit_conv2d_op, *args))


def test_weight_cache_follows_the_weight_content():
    """The panels are cached per packed pointer but checked against the bytes and zero points each call:
    an in-place change of either gives the new result."""
    g = torch.Generator().manual_seed(3)
    wp, sw, zw, cw = weight(24, 16 * 9, 4, g)
    x = torch.randn(2, 16, 6, 6, generator=g).contiguous(memory_format=torch.channels_last)
    sa, za = torch.tensor([0.1]), torch.tensor([5], dtype=torch.int32)

    def run():
        return both(CV.lowbit_conv2d_op, x, wp, sw, zw, cw, sa, za, 4, 4, [3, 3], [1, 1], [1, 1], [1, 1], 1)

    assert_bits_equal(*run())
    wp[3, 7] ^= 0x5A  # same storage, new codes (colsum refreshed to match)
    cw.copy_(zsqfast.unpack_lowbit(wp, 4, 16 * 9).sum(1).int())
    assert_bits_equal(*run())
    zw[5] = (int(zw[5]) + 3) % 16  # same packed bytes, new zero point
    assert_bits_equal(*run())


def test_threads_and_nan_on_the_implicit_path():
    g = torch.Generator().manual_seed(8)
    wp, sw, zw, cw = weight(48, 32 * 9, 4, g)
    x = torch.randn(4, 32, 14, 14, generator=g).contiguous(memory_format=torch.channels_last)
    args = (wp, sw, zw, cw, torch.tensor([0.1]), torch.tensor([7], dtype=torch.int32), 4, 4, [3, 3], [1, 1], [1, 1],
            [1, 1], 1)
    outs = []
    for t in (1, 2, 3):
        with num_threads(t), zsqfast.use_backend("cpp"):
            outs.append(CV.lowbit_conv2d_op(x, *args))
    x[3, 31, 13, 13] = float("nan")  # the very last element of the last image
    with num_threads(3), zsqfast.use_backend("cpp"), pytest.raises(ValueError, match="NaN"):
        CV.lowbit_conv2d_op(x, *args)
    for o in outs[1:]:
        assert_bits_equal(o, outs[0])


def test_every_backend_returns_channels_last():
    g = torch.Generator().manual_seed(2)
    wp, sw, zw, cw = weight(6, 4 * 9, 4, g)
    x = torch.randn(2, 4, 5, 5, generator=g)
    for backend in ("reference", "cpp"):
        with zsqfast.use_backend(backend):
            y = zsqfast.lowbit_conv2d(x, wp, sw, zw, cw, torch.tensor([0.1]), torch.tensor([2], dtype=torch.int32),
                                      4, 4, 3, padding=1)
        assert y.is_contiguous(memory_format=torch.channels_last), backend
