"""CUDA low-bit GEMM / linear / conv (csrc/cuda/lowbit_gemm.cu) and the Triton kernels on a real GPU.

* Always (nvcc only, no GPU): tests/cpp/test_lowbit_cuda_emulation.cu runs the kernels' quantizer, tile
  loader, fragment loaders, accumulator coordinates, group offsets and epilogue on the host, with the MMAs
  emulated from the PTX fragment tables, against naive integer math (the compile / spill check of the .cu
  is in tests/test_cuda_compile.py with the other kernels).
* Only where a CUDA GPU exists (skipped here, with the reason): the cuda backend and the Triton kernels
  compiled for the GPU (in a subprocess without TRITON_INTERPRET), lowbit_gemm, lowbit_linear and
  lowbit_conv2d, bit for bit against the reference on awkward shapes.
"""
import os
import subprocess
import sys

import pytest
import torch

import zsqfast
from zsqfast import _ext
from zsqfast.ops import lowbit_gemm as G
from zsqfast.ops.lowbit_pack import LowbitWeight, pack_lowbit

from .test_cuda_compile import NVCC, REPO, _run

GEMM_CASES = [(1, 7, 77, 4), (33, 45, 300, 3), (5, 9, 130, 8), (3, 17, 64, 6), (2, 33, 128, 2), (40, 1, 257, 5),
              (300, 260, 1000, 4)]
LINEAR_CASES = [(1, 7, 77, 4, 4, False, True), (33, 45, 300, 4, 4, True, False), (17, 5, 129, 3, 3, False, True),
                (9, 31, 200, 3, 3, True, True), (6, 11, 140, 8, 8, True, True), (4, 9, 64, 4, 8, False, False),
                (5, 3, 100, 8, 4, False, True), (300, 260, 1000, 4, 4, False, True), (70, 130, 520, 3, 3, True, True)]

#: (C, OC, H, kernel, stride, padding, groups, w_bits, a_bits): dense, strided, grouped, depthwise, 1x1, W8A8
CONV_CASES = [(6, 12, 9, 3, 2, 1, 1, 4, 4), (6, 9, 7, 3, 1, 1, 3, 3, 3), (32, 32, 14, 3, 1, 1, 32, 4, 4),
              (64, 96, 8, 1, 1, 0, 1, 4, 4), (16, 24, 10, 3, 1, 1, 2, 8, 8)]


def _gpu_skip_reason():
    if not torch.cuda.is_available():
        return "no CUDA GPU in this machine (the CUDA / Triton low-bit kernels are only compile-checked here)"
    return None


GPU_SKIP = _gpu_skip_reason()


def test_kernel_code_emulated_on_host(tmp_path):
    if not os.path.exists(NVCC):
        pytest.skip(f"nvcc not found ({NVCC})")
    exe = tmp_path / "test_lowbit_cuda_emulation"
    r, _ = _run([NVCC, "-O2", "-std=c++17", "-I", os.path.join(REPO, "csrc"),
                 "-gencode=arch=compute_80,code=compute_80",
                 os.path.join(REPO, "tests", "cpp", "test_lowbit_cuda_emulation.cu"), "-o", str(exe)])
    assert r.returncode == 0, r.stderr[-4000:]
    r, _ = _run([str(exe)], timeout=120)
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-2000:]
    assert "0 failures" in r.stdout
    print("\n" + r.stdout.strip().splitlines()[-1])


def _weight(N, K, bits, seed, device):
    g = torch.Generator().manual_seed(seed)
    uw = torch.randint(0, 1 << bits, (N, K), generator=g)
    scale = torch.rand(N, generator=g) * 0.1 + 0.01
    zero = torch.randint(0, 1 << bits, (N,), generator=g).float()
    w = LowbitWeight(pack_lowbit(uw, bits), scale, zero, bits, K)
    return [t.to(device) for t in (w.packed, w.scale, w.zero_point, w.colsum)]


def gemm_case(M, N, K, wb):
    """``(args of lowbit_gemm on the GPU, the reference result)`` for one of GEMM_CASES."""
    packed, *_ = _weight(N, K, wb, M + N, "cuda")
    a = torch.randint(0, 256, (M, K), dtype=torch.uint8, device="cuda")
    return (a, packed, wb, K), G.reference_gemm(a.cpu(), packed.cpu(), wb, K)


def linear_case(M, N, K, wb, ab, per_token, bias):
    """``(args of zsqfast.lowbit_linear on the GPU, the reference result)`` for one of LINEAR_CASES."""
    torch.manual_seed(M + N + K)
    packed, sw, zw, cw = _weight(N, K, wb, K, "cuda")
    x = torch.randn(M, K, device="cuda") * 2
    sa, za = zsqfast.minmax_qparams(x, ab, axis=0) if per_token else zsqfast.minmax_qparams(x, ab)
    b = torch.randn(N, device="cuda") if bias else None
    args = (x, packed, sw, zw, cw, sa, za, ab, wb, K, b)
    return args, G.reference_linear(*[t.cpu() if isinstance(t, torch.Tensor) else t for t in args])


def conv_case(C, OC, H, k, stride, padding, groups, wb, ab):
    """``(args, kwargs of zsqfast.lowbit_conv2d on the GPU, the reference result)`` for one of CONV_CASES."""
    torch.manual_seed(C + OC)
    x = torch.randn(2, C, H, H + 1, device="cuda")
    packed, sw, zw, cw = _weight(OC, C // groups * k * k, wb, OC, "cuda")
    sa, za = zsqfast.minmax_qparams(x, ab)
    args = (x, packed, sw, zw, cw, sa, za, ab, wb, k)
    kw = dict(stride=stride, padding=padding, groups=groups, bias=torch.randn(OC, device="cuda"))
    with zsqfast.use_backend("reference"):
        want = zsqfast.lowbit_conv2d(*[t.cpu() if isinstance(t, torch.Tensor) else t for t in args],
                                     **{n: v.cpu() if isinstance(v, torch.Tensor) else v for n, v in kw.items()})
    return args, kw, want


@pytest.mark.skipif(GPU_SKIP is not None, reason=GPU_SKIP or "")
@pytest.mark.parametrize("case", GEMM_CASES)
def test_cuda_gemm_exact(case):
    if not _ext.has_cuda():
        pytest.skip("the extension was built without CUDA sources")
    args, want = gemm_case(*case)
    assert torch.equal(torch.ops.zsqfast_ext.lowbit_gemm(*args).cpu(), want)


@pytest.mark.skipif(GPU_SKIP is not None, reason=GPU_SKIP or "")
@pytest.mark.parametrize("case", LINEAR_CASES)
def test_cuda_linear_exact(case):
    if not _ext.has_cuda():
        pytest.skip("the extension was built without CUDA sources")
    args, want = linear_case(*case)
    with zsqfast.use_backend("cuda"):
        got = zsqfast.lowbit_linear(*args)
    assert torch.equal(got.cpu(), want)


@pytest.mark.skipif(GPU_SKIP is not None, reason=GPU_SKIP or "")
@pytest.mark.parametrize("case", CONV_CASES)
def test_cuda_conv2d_exact(case):
    if not _ext.has_cuda():
        pytest.skip("the extension was built without CUDA sources")
    args, kw, want = conv_case(*case)
    with zsqfast.use_backend("cuda"):
        got = zsqfast.lowbit_conv2d(*args, **kw)
    assert torch.equal(got.cpu(), want)


_TRITON_GPU_SCRIPT = r"""
import torch, zsqfast
from zsqfast.ops import lowbit_gemm as G
from tests.test_lowbit_cuda import CONV_CASES, GEMM_CASES, LINEAR_CASES, conv_case, gemm_case, linear_case
bad = []
with zsqfast.use_backend("triton"):
    for case in GEMM_CASES:
        args, want = gemm_case(*case)
        if not torch.equal(G.lowbit_gemm(*args).cpu(), want):
            bad.append(("gemm", case))
    for case in LINEAR_CASES:
        args, want = linear_case(*case)
        if not torch.equal(zsqfast.lowbit_linear(*args).cpu(), want):
            bad.append(("linear", case))
    for case in CONV_CASES:
        args, kw, want = conv_case(*case)
        if not torch.equal(zsqfast.lowbit_conv2d(*args, **kw).cpu(), want):
            bad.append(("conv2d", case))
print("BAD", bad)
assert not bad
"""


@pytest.mark.skipif(GPU_SKIP is not None, reason=GPU_SKIP or "")
def test_triton_on_gpu_exact():
    pytest.importorskip("triton")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run([sys.executable, "-c", _TRITON_GPU_SCRIPT], cwd=REPO, env=env, capture_output=True,
                         text=True, timeout=600)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
