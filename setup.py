"""Build zsqfast: ``pip install --no-build-isolation -e .`` (isolated builds cannot see torch).

Environment:
    ZSQFAST_SKIP_BUILD=1     install pure Python (every op then runs its PyTorch reference)
    ZSQFAST_CUDA=auto|0|1    compile csrc/cuda too: auto = when torch is a CUDA build and nvcc exists
    MAX_JOBS                 parallel compile jobs (ninja)
The compiled sources are listed once, in csrc/SOURCES (CMakeLists.txt reads the same file).
"""
import os
import site
import sys

from setuptools import find_packages, setup

ROOT = os.path.dirname(os.path.abspath(__file__))


def sources() -> list[str]:
    with open(os.path.join(ROOT, "csrc", "SOURCES")) as f:
        return [ln.strip() for ln in f if ln.strip() and not ln.startswith("#")]


def cuda_wanted() -> bool:
    mode = os.environ.get("ZSQFAST_CUDA", "auto").lower()
    if mode not in ("auto", "0", "1"):
        sys.exit(f"ZSQFAST_CUDA must be auto, 0 or 1, got {mode!r}")
    if mode == "0":
        return False
    import torch
    from torch.utils import cpp_extension

    home = cpp_extension.CUDA_HOME
    ok = torch.version.cuda is not None and home is not None and os.path.exists(os.path.join(home, "bin", "nvcc"))
    if mode == "1" and not ok:
        sys.exit("ZSQFAST_CUDA=1 but torch is not a CUDA build or nvcc was not found (set CUDA_HOME)")
    return ok


def extensions():
    if os.environ.get("ZSQFAST_SKIP_BUILD", "0") == "1":
        return [], {}
    from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension

    with_cuda = cuda_wanted()
    srcs = [s for s in sources() if with_cuda or not s.endswith(".cu")]
    # C++20: torch 2.14's headers need it. -ffp-contract=off: no silent FMA fusion, so the scalar fallback
    # is bit-identical to the SIMD paths and to the reference.
    # -Wno-maybe-uninitialized: GCC 12 false positives inside its own AVX-512 intrinsic headers.
    cxx = ["-O3", "-fopenmp", "-std=c++20", "-fvisibility=hidden", "-ffp-contract=off", "-Wno-maybe-uninitialized"]
    args = dict(extra_compile_args={"cxx": cxx}, extra_link_args=["-fopenmp"], include_dirs=[os.path.join(ROOT, "csrc")])
    if with_cuda:
        cxx.append("-DZSQFAST_WITH_CUDA")
        # torch's CUDA wheels ship some CUDA headers under site-packages/nvidia/cu13/include
        for sp in site.getsitepackages():
            inc = os.path.join(sp, "nvidia", "cu13", "include")
            if os.path.isdir(inc):
                args["include_dirs"].append(inc)
        args["extra_compile_args"]["nvcc"] = [
            "-O3", "-std=c++20", "-DZSQFAST_WITH_CUDA", "-lineinfo", "-Xcompiler=-fvisibility=hidden",
            "-gencode=arch=compute_80,code=sm_80", "-gencode=arch=compute_90,code=sm_90"]
        ext = CUDAExtension("zsqfast._C", srcs, **args)
    else:
        ext = CppExtension("zsqfast._C", srcs, **args)
    return [ext], {"build_ext": BuildExtension.with_options(use_ninja=True)}


ext_modules, cmdclass = extensions()
setup(
    name="zsqfast",
    version="0.1.0",
    description="Fast kernels and algorithms for zero-shot quantization of vision models",
    packages=find_packages(include=["zsqfast", "zsqfast.*"]) + ["zsqfast.kernels"],
    package_dir={"zsqfast.kernels": "kernels"},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
    python_requires=">=3.10",
    entry_points={"console_scripts": ["zsqfast=zsqfast.cli:main"]},
)
