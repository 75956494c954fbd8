"""The CUDA sources compile for sm_80 and sm_90 with zero register spills and link into a shared library
that defines every zsqfast::cuda entry point of csrc/kernels.h. (No GPU here: they are never run.)"""
import os
import re
import shutil
import subprocess

import pytest
import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NVCC = shutil.which("nvcc") or os.path.join(os.environ.get("CUDA_HOME", "/usr/local/cuda"), "bin", "nvcc")
ENTRY_POINTS = ["fake_quant_fwd", "fake_quant_bwd", "lsq_fwd", "lsq_bwd"]


def _cu_sources():
    with open(os.path.join(REPO, "csrc", "SOURCES")) as f:
        return [ln.strip() for ln in f if ln.strip().endswith(".cu")]


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    if not os.path.exists(NVCC):
        pytest.skip("nvcc not found (set CUDA_HOME)")
    out = tmp_path_factory.mktemp("cuda")
    objs, logs = [], {}
    for src in _cu_sources():
        obj = out / (os.path.basename(src) + ".o")
        r = subprocess.run([NVCC, "-c", "-O3", "-std=c++20", "-Xcompiler", "-fPIC", "-I", os.path.join(REPO, "csrc"),
                            "-Xptxas", "-v", "-gencode=arch=compute_80,code=sm_80",
                            "-gencode=arch=compute_90,code=sm_90", os.path.join(REPO, src), "-o", str(obj)],
                           capture_output=True, text=True, timeout=600)
        assert r.returncode == 0, r.stderr[-3000:]
        objs.append(str(obj))
        logs[src] = r.stderr
    lib = out / "libzsqfast_cuda.so"
    r = subprocess.run([NVCC, "-shared", "-o", str(lib)] + objs, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    return lib, logs


def test_every_kernel_compiles_for_sm80_sm90_without_spills(built):
    _, logs = built
    for src, log in logs.items():
        entries = re.findall(r"Compiling entry function '(\w+)' for '(sm_\d+)'", log)
        assert {arch for _, arch in entries} == {"sm_80", "sm_90"}, src
        spills = [int(a) + int(b) for a, b in re.findall(r"(\d+) bytes spill stores, (\d+) bytes spill loads", log)]
        assert len(spills) == len(entries) and sum(spills) == 0, (src, spills)


def test_links_and_defines_every_entry_point(built):
    lib, _ = built
    nm = shutil.which("nm")
    if nm is None:
        pytest.skip("nm not found")
    symbols = subprocess.run([nm, "-C", "--defined-only", str(lib)], capture_output=True, text=True).stdout
    for name in ENTRY_POINTS:
        assert re.search(rf"\bzsqfast::cuda::{name}\(", symbols), name


def test_installed_extension_carries_cuda_kernels_when_built_with_them():
    from zsqfast import _ext

    if _ext.load_error() is not None:
        pytest.skip(f"extension not loaded: {_ext.load_error()}")
    if os.environ.get("ZSQFAST_CUDA", "auto") == "0" or torch.version.cuda is None or not os.path.exists(NVCC):
        pytest.skip("this build did not include CUDA sources")
    assert _ext.has_cuda()
