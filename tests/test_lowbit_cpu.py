"""The C++ CPU low-bit kernels (csrc/cpu/lowbit_*.cpp) at every ISA level against the reference integer
semantics: int32 accumulators equal, fp32 outputs bit-identical (the epilogue follows the reference's order)."""
import pytest
import torch

import zsqfast
from zsqfast.ops import lowbit_conv2d as CV
from zsqfast.ops import lowbit_gemm as G
from zsqfast.ops.lowbit_pack import pack_lowbit

from .conftest import cpu_backends
from ._threads import num_threads

pytestmark = pytest.mark.skipif("cpp" not in cpu_backends("lowbit_linear"), reason="the C++ extension is not loaded")


def both(op, *args):
    """(cpp, reference) results of ``op``."""
    with zsqfast.use_backend("cpp"):
        got = op(*args)
    with zsqfast.use_backend("reference"):
        want = op(*args)
    return got, want


def assert_bits_equal(got, want):
    assert got.shape == want.shape and got.dtype == want.dtype
    if got.is_floating_point():  # bit for bit, except the sign of an exact 0 (the reference's float64 GEMM
        # gives -0.0 when a zero sum has only negative-zero products; the integer c = 0 has no sign)
        same = (got.view(torch.int32) == want.view(torch.int32)) | ((got == 0) & (want == 0))
        assert bool(same.all()), float((got - want).abs().max())
    else:
        assert torch.equal(got, want)


def weight(N, K, bits, g, zw_range=None):
    """Packed random codes and their per-channel tensors."""
    q = torch.randint(0, 1 << bits, (N, K), generator=g)
    lo, hi = zw_range or (0, (1 << bits) - 1)
    zw = torch.randint(lo, hi + 1, (N,), generator=g).int()
    sw = torch.rand(N, generator=g) * 0.1 + 0.01
    return pack_lowbit(q, bits), sw, zw, q.sum(1).int()


# M, N, K: M = 1 / GEMV rows / register-block tails, odd N, K < 4, K not a multiple of 128, long K
GEMM_SHAPES = [(1, 7, 3), (2, 33, 130), (4, 5, 1), (5, 31, 257), (13, 70, 129), (16, 64, 600), (29, 97, 1100),
               (9, 150, 300)]  # 5 panels: a partial panel group
BITS = [(4, 4), (3, 3), (2, 2), (8, 8), (5, 7), (2, 8), (8, 2), (6, 6), (7, 8)]  # (w_bits, a_bits)


@pytest.mark.parametrize("M,N,K", GEMM_SHAPES)
def test_gemm_every_isa(cpu_isa, M, N, K):
    g = torch.Generator().manual_seed(M * 1000 + K)
    for wb in range(2, 9):
        wp = weight(N, K, wb, g)[0]
        a = torch.randint(0, 256, (M, K), dtype=torch.uint8, generator=g)
        assert_bits_equal(*both(G.lowbit_gemm, a, wp, wb, K))


@pytest.mark.parametrize("M,N,K", GEMM_SHAPES)
@pytest.mark.parametrize("per_token", [False, True], ids=["per-tensor", "per-token"])
def test_linear_every_isa(cpu_isa, M, N, K, per_token):
    g = torch.Generator().manual_seed(M * 7 + K)
    for i, (wb, ab) in enumerate(BITS):
        wp, sw, zw, cw = weight(N, K, wb, g)
        x = torch.randn(M, K, generator=g) * 3
        na = M if per_token else 1
        sa = torch.rand(na, generator=g) * 0.3 + 0.05
        za = torch.randint(-3, (1 << ab) + 3, (na,), generator=g).int()  # inside and just outside the range
        bias = torch.randn(N, generator=g) if i % 2 else None
        assert_bits_equal(*both(G.lowbit_linear_op, x, wp, sw, zw, cw, sa, za, ab, wb, K, bias))


def test_linear_large_k_and_extreme_zero_points(cpu_isa):
    g = torch.Generator().manual_seed(5)
    K = 4100
    wp, sw, zw, cw = weight(40, K, 4, g)
    x = torch.randn(20, K, generator=g)
    sa, za = torch.tensor([0.05]), torch.tensor([7], dtype=torch.int32)
    assert_bits_equal(*both(G.lowbit_linear_op, x, wp, sw, zw, cw, sa, za, 4, 4, K, None))
    # zero points far outside the grid: |c| >= 2^31, the exact wide epilogue
    wp, sw, zw, cw = weight(9, 300, 4, g, zw_range=(-70000, -60000))
    x = torch.randn(6, 300, generator=g)
    za = torch.tensor([1_000_000], dtype=torch.int32)
    assert_bits_equal(*both(G.lowbit_linear_op, x, wp, sw, zw, cw, sa, za, 4, 4, 300, torch.randn(9)))


def test_linear_public_api_non_contiguous_and_batched():
    g = torch.Generator().manual_seed(2)
    wp, sw, zw, cw = weight(24, 70, 4, g)
    x = torch.randn(3, 70, 11, generator=g).transpose(1, 2)  # (3, 11, 70), non-contiguous
    sa, za = torch.rand(33, generator=g) * 0.2 + 0.05, torch.randint(0, 16, (33,), generator=g)
    args = (x, wp, sw, zw.float(), cw, sa, za.float(), 4, 4, 70, torch.randn(24))
    with zsqfast.use_backend("cpp"):
        got = zsqfast.lowbit_linear(*args)
    with zsqfast.use_backend("reference"):
        want = zsqfast.lowbit_linear(*args)
    assert got.shape == (3, 11, 24)
    assert_bits_equal(got, want)


# B, C, H, W, OC, kernel, stride, padding, dilation, groups
CONVS = [
    (2, 6, 9, 8, 12, 3, 2, 1, 1, 1),
    (1, 5, 7, 6, 7, (3, 1), (1, 2), (1, 0), 1, 1),
    (1, 6, 11, 5, 4, 3, 1, 2, 2, 2),
    (1, 3, 8, 8, 5, 1, 1, 0, 1, 1),
    (2, 8, 7, 7, 8, 3, 1, 1, 1, 8),    # depthwise (MobileNetV2)
    (1, 16, 9, 9, 16, 3, 2, 1, 1, 16),  # depthwise, stride 2
    (1, 4, 9, 9, 12, 3, 1, 1, 1, 4),   # depthwise with channel multiplier 3
    (1, 1, 10, 10, 4, 5, 1, 2, 1, 1),  # one input channel
    (1, 40, 6, 6, 33, 3, 1, 1, 1, 1),  # K = 360: several 128-blocks, odd OC
    (3, 8, 3, 3, 6, 3, 2, 1, 1, 1),    # 2 x 2 outputs: the GEMV path
    (2, 24, 10, 10, 20, 1, 1, 0, 1, 2),  # 1x1, grouped
]


def _pair(v):
    return list(v) if isinstance(v, tuple) else [v, v]


@pytest.mark.parametrize("case", CONVS, ids=[str(i) for i in range(len(CONVS))])
def test_conv_every_isa(cpu_isa, case):
    B, C, H, W, OC, k, s, p, d, groups = case
    ks = _pair(k)
    K = C // groups * ks[0] * ks[1]
    g = torch.Generator().manual_seed(OC + H)
    for wb, ab in ((4, 4), (3, 3), (8, 8)):
        wp, sw, zw, cw = weight(OC, K, wb, g)
        x = torch.randn(B, C, H, W, generator=g) * 2
        for za_v in (3, -2, (1 << ab) + 4):  # inside the code range (padding exact) and outside (border correction)
            za = torch.tensor([za_v], dtype=torch.int32)
            bias = torch.randn(OC, generator=g) if za_v == 3 else None
            args = (x, wp, sw, zw, cw, torch.tensor([0.2]), za, ab, wb, ks, _pair(s), _pair(p), _pair(d), groups, bias)
            assert_bits_equal(*both(CV.lowbit_conv2d_op, *args))


def test_conv_public_api_channels_last():
    g = torch.Generator().manual_seed(9)
    wp, sw, zw, cw = weight(10, 6 * 9, 4, g)
    x = torch.randn(2, 6, 8, 8, generator=g).contiguous(memory_format=torch.channels_last)
    sa, za = zsqfast.minmax_qparams(x, 4)
    args = (x, wp, sw, zw, cw, sa, za, 4, 4, 3)
    with zsqfast.use_backend("cpp"):
        got = zsqfast.lowbit_conv2d(*args, stride=1, padding=1)
    with zsqfast.use_backend("reference"):
        want = zsqfast.lowbit_conv2d(*args, stride=1, padding=1)
    assert_bits_equal(got, want)


def test_thread_count_independence():
    g = torch.Generator().manual_seed(4)
    wp, sw, zw, cw = weight(130, 700, 4, g)
    x = torch.randn(50, 700, generator=g)
    xc = torch.randn(2, 16, 12, 12, generator=g)
    wc = weight(32, 144, 4, g)
    out = []
    for t in (1, 2, 3):
        with num_threads(t), zsqfast.use_backend("cpp"):
            out.append((G.lowbit_linear_op(x, wp, sw, zw, cw, torch.tensor([0.1]), torch.tensor([8]), 4, 4, 700),
                        G.lowbit_linear_op(x[:1], wp, sw, zw, cw, torch.tensor([0.1]), torch.tensor([8]), 4, 4, 700),
                        CV.lowbit_conv2d_op(xc, wc[0], wc[1], wc[2], wc[3], torch.tensor([0.1]), torch.tensor([8]),
                                            4, 4, [3, 3], [1, 1], [1, 1], [1, 1], 1)))
    for o in out[1:]:
        for a, b in zip(o, out[0]):
            assert_bits_equal(a, b)


def test_opcheck_cpp():
    g = torch.Generator().manual_seed(1)
    wp, sw, zw, cw = weight(5, 40, 4, g)
    a = torch.randint(0, 16, (3, 40), dtype=torch.uint8, generator=g)
    wc = weight(4, 27, 3, g)
    with zsqfast.use_backend("cpp"):
        torch.library.opcheck(G.lowbit_gemm, (a, wp, 4, 40))
        torch.library.opcheck(G.lowbit_linear_op, (torch.randn(3, 40), wp, sw, zw, cw, torch.full((3,), 0.2),
                                                   torch.zeros(3, dtype=torch.int32), 4, 4, 40, torch.randn(5)))
        torch.library.opcheck(CV.lowbit_conv2d_op, (torch.randn(1, 3, 6, 6), *wc, torch.tensor([0.2]),
                                                    torch.tensor([1]), 3, 3, [3, 3], [2, 2], [1, 1], [1, 1], 1, None))


def test_raw_kernel_errors():
    ext = torch.ops.zsqfast_ext
    wp = pack_lowbit(torch.randint(0, 16, (4, 10)), 4)
    a = torch.zeros(2, 10, dtype=torch.uint8)
    with pytest.raises(RuntimeError, match="bytes a row"):
        ext.lowbit_gemm(a, wp, 8, 10)
    with pytest.raises(RuntimeError, match="w_bits"):
        ext.lowbit_gemm(a, wp, 9, 10)
    with pytest.raises(RuntimeError, match="uint8"):
        ext.lowbit_gemm(a.float(), wp, 4, 10)
    with pytest.raises(RuntimeError, match="overflow"):
        ext.lowbit_gemm(torch.zeros(1, 9_000_000, dtype=torch.uint8), torch.zeros(1, 4_500_032, dtype=torch.uint8),
                        4, 9_000_000)
    one, z = torch.ones(1), torch.zeros(1, dtype=torch.int32)
    s4, z4, c4 = torch.ones(4), torch.zeros(4, dtype=torch.int32), torch.zeros(4, dtype=torch.int32)
    with pytest.raises(RuntimeError, match="a_scale must have 1 or 2"):
        ext.lowbit_linear(torch.zeros(2, 10), wp, 4, 10, s4, z4, c4, torch.ones(3), torch.ones(3),
                          torch.zeros(3, dtype=torch.int32), 4, None)
    with pytest.raises(RuntimeError, match="w_zero"):
        ext.lowbit_linear(torch.zeros(2, 10), wp, 4, 10, s4, z4.float(), c4, one, one, z, 4, None)
    with pytest.raises(RuntimeError, match="groups"):
        ext.lowbit_conv2d(torch.zeros(1, 3, 5, 5), wp, 4, 10, s4, z4, c4, one, one, z, 4, None, [3, 3], [1, 1],
                          [0, 0], [1, 1], 1)


@pytest.mark.parametrize("M,K", [(1, 3), (13, 129), (29, 1100)])
def test_nan_raises_from_the_kernel_every_isa(cpu_isa, M, K):
    """The C++ path flags NaN in its quantization pass (no Python isnan pass): same ValueError as the reference."""
    g = torch.Generator().manual_seed(K)
    wp, sw, zw, cw = weight(8, K, 4, g)
    x = torch.randn(M, K, generator=g)
    x[M - 1, K - 1] = float("nan")  # the last element: the tail of the last row (or register block)
    sa, za = torch.tensor([0.1]), torch.tensor([7], dtype=torch.int32)
    for backend in ("cpp", "reference"):
        with zsqfast.use_backend(backend), pytest.raises(ValueError, match="NaN"):
            zsqfast.lowbit_linear(x, wp, sw, zw, cw, sa, za, 4, 4, K)
        xc = x.reshape(1, M, K, 1)  # a 1x1 convolution over M channels of K pixels
        wc = weight(8, M, 4, g)
        with zsqfast.use_backend(backend), pytest.raises(ValueError, match="NaN"):
            zsqfast.lowbit_conv2d(xc, *wc, sa, za, 4, 4, 1)
