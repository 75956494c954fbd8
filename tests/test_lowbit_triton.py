"""Triton low-bit GEMM / linear (kernels/lowbit_gemm.py) against the integer reference, bit for bit, on CPU
tensors under the Triton interpreter: M = 1, odd N, K not a multiple of 128, multi-program grids (the
interpreter tiles are 32 x 32), nibble-packed (2..4 bits) and byte (5..8 bits) weights, the int8 shift of
8-bit codes, per-tensor and per-token activations, bias, ties and +-Inf."""
import importlib

import pytest
import torch

import zsqfast
from zsqfast import _triton
from zsqfast.ops import lowbit_gemm as G
from zsqfast.ops.lowbit_pack import LowbitWeight, pack_lowbit


def _skip_reason():
    if not _triton.interpreted():
        return "the Triton kernels run CPU tensors only under TRITON_INTERPRET=1 (tests/conftest.py sets it)"
    return _triton.unavailable_reason("cpu")


SKIP = _skip_reason()
pytestmark = pytest.mark.skipif(SKIP is not None, reason=SKIP or "")


def T():
    return importlib.import_module("zsqfast.kernels.lowbit_gemm")


def _weight(N, K, bits, seed):
    g = torch.Generator().manual_seed(seed)
    uw = torch.randint(0, 1 << bits, (N, K), generator=g)
    scale = torch.rand(N, generator=g) * 0.1 + 0.01
    zero = torch.randint(0, 1 << bits, (N,), generator=g).float()
    return LowbitWeight(pack_lowbit(uw, bits), scale, zero, bits, K)


@pytest.mark.parametrize("M,N,K,wb", [(1, 7, 77, 4), (33, 45, 300, 3), (5, 9, 130, 8), (3, 17, 64, 6),
                                      (2, 33, 128, 2), (40, 1, 257, 5), (1, 64, 1, 7)])
def test_gemm_exact(M, N, K, wb):
    w = _weight(N, K, wb, seed=M * 1000 + N)
    a = torch.randint(0, 256, (M, K), dtype=torch.uint8)  # any u8 codes: the raw contract knows no a_bits
    got = T().lowbit_gemm(a, w.packed, wb, K)
    assert got.dtype == torch.int32 and got.shape == (M, N)
    assert torch.equal(got, G.reference_gemm(a, w.packed, wb, K))


def test_gemm_extreme_codes():
    """All-max codes: the largest accumulators, and the 8-bit shifts at their extremes (u - 128 = +127)."""
    for wb in (4, 8):
        K = 300
        w = LowbitWeight(pack_lowbit(torch.full((5, K), (1 << wb) - 1), wb), torch.ones(5), torch.zeros(5), wb, K)
        for v in (0, 127, 128, 255):
            a = torch.full((3, K), v, dtype=torch.uint8)
            assert torch.equal(T().lowbit_gemm(a, w.packed, wb, K), G.reference_gemm(a, w.packed, wb, K))


@pytest.mark.parametrize("M,N,K,wb,ab,per_token,bias", [
    (1, 7, 77, 4, 4, False, True),      # M = 1, odd N, K < 128
    (33, 45, 300, 4, 4, True, False),   # multi-program in M and N, K = 2 blocks + tail
    (17, 5, 129, 3, 3, False, True),    # W3A3
    (9, 31, 200, 3, 3, True, True),
    (6, 11, 140, 8, 8, True, True),     # both operands shifted
    (4, 9, 64, 4, 8, False, False),     # A shifted only
    (5, 3, 100, 8, 4, False, True),     # W shifted only
    (3, 13, 90, 2, 6, True, False),
])
def test_linear_exact(M, N, K, wb, ab, per_token, bias):
    torch.manual_seed(M + N + K)
    w = _weight(N, K, wb, seed=K)
    x = torch.randn(M, K) * 2
    if per_token:
        sa, za = zsqfast.minmax_qparams(x, ab, axis=0)
    else:
        sa, za = zsqfast.minmax_qparams(x, ab)
    b = torch.randn(N) if bias else None
    sa32 = sa.float().reshape(-1)
    got = T().lowbit_linear(x, w.packed, wb, K, w.scale, w.zero_point, w.colsum, sa32, torch.reciprocal(sa32),
                            za.round().int().reshape(-1), ab, b)
    want = G.reference_linear(x, w.packed, w.scale, w.zero_point, w.colsum, sa, za, ab, wb, K, b)
    assert torch.equal(got, want)


def test_linear_ties_inf_and_public_api():
    """Ties round half to even exactly as the reference, +-Inf saturate; through zsqfast.lowbit_linear with
    the triton backend forced (3-D input, per-tensor grid)."""
    K, N = 150, 6
    w = _weight(N, K, 4, seed=3)
    sa, za = torch.tensor([0.25]), torch.tensor([7.0])
    x = (torch.arange(2 * 3 * K, dtype=torch.float32).reshape(2, 3, K) % 17 - 8.5) * 0.25  # exact .5 ties
    x[0, 0, :4] = torch.tensor([float("inf"), -float("inf"), 1e30, -1e30])
    b = torch.randn(N)
    args = (w.packed, w.scale, w.zero_point, w.colsum, sa, za, 4, 4, K, b)
    with zsqfast.use_backend("reference"):
        want = zsqfast.lowbit_linear(x, *args)
    with zsqfast.use_backend("triton"):
        got = zsqfast.lowbit_linear(x, *args)
    assert got.shape == (2, 3, N) and torch.equal(got, want)


def test_quantize_rows_codes_and_sums():
    x = torch.randn(11, 333) * 3
    sa, za = zsqfast.minmax_qparams(x, 4, axis=0)
    inv = torch.reciprocal(sa.float())
    q, ra = T().quantize_rows(x, inv, za.int(), 4)
    ref = G.quantize_codes(x, sa.reshape(-1, 1), za.reshape(-1, 1), 4)
    assert torch.equal(q, ref) and torch.equal(ra.reshape(-1), ref.sum(1, dtype=torch.int32))


def test_gemm_rejects_k_beyond_shifted_bound():
    K = G.max_k(8, 4) + 1
    with pytest.raises(ValueError, match="K <="):
        T().lowbit_gemm(torch.zeros(1, K, dtype=torch.uint8), torch.zeros(1, -(-K // 128) * 64, dtype=torch.uint8),
                        4, K)


@pytest.mark.parametrize("C,OC,hw,k,stride,padding,dilation,groups,wb,ab,bias", [
    (6, 12, (9, 8), 3, 2, 1, 1, 1, 4, 4, True),     # stride 2, padding, odd spatial size
    (6, 9, (7, 7), 3, 1, 1, 1, 3, 3, 3, False),    # grouped, W3A3
    (8, 8, (6, 5), 3, 1, 1, 1, 8, 4, 4, True),     # depthwise (MobileNetV2): K = 9
    (5, 7, (8, 8), 1, 1, 0, 1, 1, 4, 8, True),     # 1x1, K = 5, A shifted
    (4, 6, (10, 9), (3, 2), (2, 1), (2, 0), (2, 1), 2, 8, 8, False),  # rectangular, dilated, W8A8
    (33, 16, (5, 5), 3, 1, 1, 1, 1, 4, 4, True),   # K = 297: three 128 blocks
])
def test_conv2d_exact(C, OC, hw, k, stride, padding, dilation, groups, wb, ab, bias):
    torch.manual_seed(C * OC)
    x = torch.randn(2, C, *hw)
    ks = (k, k) if isinstance(k, int) else k
    w = _weight(OC, C // groups * ks[0] * ks[1], wb, seed=OC)
    sa, za = zsqfast.minmax_qparams(x, ab)
    b = torch.randn(OC) if bias else None
    args = (x, w.packed, w.scale, w.zero_point, w.colsum, sa, za, ab, wb, ks)
    kw = dict(stride=stride, padding=padding, dilation=dilation, groups=groups, bias=b)
    with zsqfast.use_backend("reference"):
        want = zsqfast.lowbit_conv2d(*args, **kw)
    with zsqfast.use_backend("triton"):
        got = zsqfast.lowbit_conv2d(*args, **kw)
    assert got.shape == want.shape and got.is_contiguous(memory_format=torch.channels_last) and torch.equal(got, want)


def test_conv2d_zero_point_outside_grid_with_padding():
    """za outside [0, qmax]: zero padding has no code, the kernel defers to the reference (still exact)."""
    x = torch.rand(1, 4, 6, 6) + 1.0                   # all positive: a grid [1, 2] would have za < 0
    w = _weight(5, 4 * 9, 4, seed=9)
    sa, za = torch.tensor([1.0 / 15]), torch.tensor([-15.0])
    args = (x, w.packed, w.scale, w.zero_point, w.colsum, sa, za, 4, 4, 3)
    with zsqfast.use_backend("reference"):
        want = zsqfast.lowbit_conv2d(*args, padding=1)
    with zsqfast.use_backend("triton"):
        got = zsqfast.lowbit_conv2d(*args, padding=1)
    assert torch.equal(got, want)
