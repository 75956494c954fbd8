"""Compile check of the CUDA kernels (this machine has no GPU: they are never launched here).

* every .cu of csrc/SOURCES compiles for sm_80 and sm_90 with zero register spills (ptxas -v);
* the objects link into a shared library that defines every ``zsqfast::cuda::`` entry point declared in
  csrc/kernels.h;
* tests/cpp/test_cuda_emulation.cu runs the kernels' per-unit / per-thread code on the host against a naive
  loop (bit-exact outputs and masks, the kernels' reduction tree for the LSQ step gradient).

``pytest -s tests/test_cuda_compile.py`` also prints registers / spills per kernel and arch.
"""
import os
import re
import shutil
import subprocess
import time

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CSRC = os.path.join(REPO, "csrc")
NVCC = shutil.which("nvcc") or os.path.join(os.environ.get("CUDA_HOME", "/usr/local/cuda"), "bin", "nvcc")
ARCHS = ("sm_80", "sm_90")
GENCODE = [f"-gencode=arch=compute_{a[3:]},code={a}" for a in ARCHS]


def _cu_sources():
    with open(os.path.join(CSRC, "SOURCES")) as f:
        lines = [ln.strip() for ln in f]
    return [ln for ln in lines if ln and not ln.startswith("#") and ln.endswith(".cu")]


def _declared_cuda_entry_points():
    """Function names declared inside ``namespace cuda { ... }`` of csrc/kernels.h."""
    with open(os.path.join(CSRC, "kernels.h")) as f:
        text = f.read()
    m = re.search(r"namespace cuda \{(.*?)\n\}\s*//\s*namespace cuda", text, re.S)
    assert m, "csrc/kernels.h has no `namespace cuda { ... }  // namespace cuda` block"
    body = re.sub(r"//[^\n]*", "", m.group(1))
    return sorted(set(re.findall(r"\b(\w+)\s*\(", body)) - {"void", "int", "bool", "float"})


def _run(cmd, timeout=300):
    t = time.perf_counter()
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    return r, time.perf_counter() - t


def _demangle(names):
    cxxfilt = shutil.which("c++filt")
    if cxxfilt is None or not names:
        return {n: n for n in names}
    out = subprocess.run([cxxfilt], input="\n".join(names), capture_output=True, text=True).stdout.splitlines()
    return dict(zip(names, out)) if len(out) == len(names) else {n: n for n in names}


def parse_ptxas(log):
    """[(function, arch, registers or None, spill_store_bytes, spill_load_bytes, is_entry)] from ptxas -v."""
    rows, entry, arch, props = [], None, None, None
    for line in log.splitlines():
        m = re.search(r"Compiling entry function '(\S+)' for '(sm_\d+)'", line)
        if m:
            entry, arch = m.groups()
            continue
        m = re.search(r"Function properties for (\S+)", line)
        if m:
            props = m.group(1)
            continue
        m = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", line)
        if m and props is not None:
            rows.append([props, arch, None, int(m.group(1)), int(m.group(2)), props == entry])
            props = None
            continue
        m = re.search(r"Used (\d+) registers", line)
        if m and entry is not None:
            for row in reversed(rows):
                if row[0] == entry and row[1] == arch:
                    row[2] = int(m.group(1))
                    break
            else:
                rows.append([entry, arch, int(m.group(1)), 0, 0, True])
    return [tuple(r) for r in rows]


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    if not os.path.exists(NVCC):
        pytest.skip(f"nvcc not found ({NVCC}; set CUDA_HOME or put nvcc on PATH)")
    out = tmp_path_factory.mktemp("cuda")
    objs, logs, times = [], {}, {}
    for src in _cu_sources():
        obj = out / (os.path.basename(src) + ".o")
        r, dt = _run([NVCC, "-c", "-O3", "-std=c++17", "-Xcompiler", "-fPIC", "-I", CSRC, "-Xptxas", "-v", *GENCODE,
                      os.path.join(REPO, src), "-o", str(obj)])
        assert r.returncode == 0, f"{src} failed to compile:\n{r.stderr[-4000:]}"
        objs.append(str(obj))
        logs[src], times[src] = r.stderr, dt
    lib = out / "libzsqfast_cuda.so"
    r, times["link"] = _run([NVCC, "-shared", "-o", str(lib), *objs])
    assert r.returncode == 0, f"link failed:\n{r.stderr[-4000:]}"
    return lib, logs, times


def test_cuda_sources_listed():
    assert _cu_sources(), "csrc/SOURCES lists no .cu file"


def test_every_kernel_compiles_for_sm80_sm90_without_spills(built):
    _, logs, times = built
    table = []
    for src, log in logs.items():
        rows = parse_ptxas(log)
        entries = [r for r in rows if r[5]]
        assert entries, f"{src}: no kernels in the ptxas output"
        assert {r[1] for r in entries} == set(ARCHS), f"{src}: kernels not compiled for {ARCHS}"
        names = {r[0] for r in entries}
        for name in names:  # every kernel for every arch
            assert {r[1] for r in entries if r[0] == name} == set(ARCHS), name
        if src.endswith("lowbit_gemm.cu"):  # both MMA paths and the quantizer, for both arches
            assert any("lowbit_gemm" in n for n in names) and any("lowbit_quant" in n for n in names), names
            assert len([n for n in names if "lowbit_gemm_kernel" in n]) == 12, sorted(names)
        spilled = [r for r in rows if r[3] or r[4]]
        assert not spilled, f"{src}: register spills: {spilled}"
        table += [(src, *r) for r in entries]
    names = _demangle(sorted({r[1] for r in table}))
    print(f"\n{'kernel':<72} {'arch':<6} {'regs':>4} {'spill st/ld':>11}")
    for src, fn, arch, regs, st, ld, _ in sorted(table, key=lambda r: (names[r[1]], r[2])):
        short = re.sub(r"zsqfast::cuda_detail::", "", names[fn])
        short = re.sub(r"\(.*\)$", "", short)
        print(f"{short[:72]:<72} {arch:<6} {regs if regs is not None else '?':>4} {f'{st}/{ld}':>11}")
    print("compile times: " + ", ".join(f"{os.path.basename(k)} {v:.1f}s" for k, v in times.items()))


def test_links_and_defines_every_entry_point(built):
    lib = built[0]
    nm = shutil.which("nm")
    if nm is None:
        pytest.skip("nm not found")
    declared = _declared_cuda_entry_points()
    assert {"fake_quant_fwd", "fake_quant_bwd", "lsq_fwd", "lsq_bwd"} <= set(declared), declared
    assert {"lowbit_gemm", "lowbit_linear", "lowbit_int4_path", "lowbit_codes_row_bytes"} <= set(declared), declared
    symbols = subprocess.run([nm, "-C", "--defined-only", str(lib)], capture_output=True, text=True).stdout
    for name in declared:
        assert re.search(rf"^\S+ T zsqfast::cuda::{name}\(", symbols, re.M), f"zsqfast::cuda::{name} is not defined"


def test_kernel_code_emulated_on_host(tmp_path):
    """The kernels' __host__ __device__ unit functions, run on the CPU against a naive loop."""
    if not os.path.exists(NVCC):
        pytest.skip(f"nvcc not found ({NVCC})")
    exe = tmp_path / "test_cuda_emulation"
    # PTX only (no ptxas): the device code is never run here, only the host copy of the same functions.
    r, _ = _run([NVCC, "-O2", "-std=c++17", "-I", CSRC, "-gencode=arch=compute_80,code=compute_80",
                 os.path.join(REPO, "tests", "cpp", "test_cuda_emulation.cu"), "-o", str(exe)])
    assert r.returncode == 0, r.stderr[-4000:]
    r, _ = _run([str(exe)], timeout=120)
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-2000:]
    print("\n" + r.stdout.strip().splitlines()[-1])


def test_installed_extension_registers_cuda_kernels_when_built_with_them():
    torch = pytest.importorskip("torch")
    from zsqfast import _ext

    if _ext.load_error() is not None:
        pytest.skip(f"extension not loaded: {_ext.load_error()}")
    if not _ext.has_cuda():
        pytest.skip("the installed extension was built without CUDA (ZSQFAST_CUDA=0, or no nvcc at build time)")
    for op in ("fake_quant", "fake_quant_backward", "lsq_fake_quant", "lsq_fake_quant_backward"):
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"zsqfast_ext::{op}", "CUDA"), op
