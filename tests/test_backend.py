"""Backend selection, explicit-choice errors, and an import that survives a missing or broken extension."""
import os
import shutil
import subprocess
import sys
import textwrap

import pytest
import torch

import zsqfast
from zsqfast import _backend

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_auto_prefers_cpp_on_cpu():
    with zsqfast.use_backend("auto"):
        name, _ = _backend.select("fake_quant", "cpu")
    assert name == ("cpp" if "cpp" in zsqfast.available_backends() else "reference")


def test_explicit_unavailable_backend_raises_with_reason():
    x = torch.randn(8)
    with zsqfast.use_backend("cuda"), pytest.raises(RuntimeError, match="CUDA tensors only"):
        zsqfast.fake_quantize(x, 0.1, 0, 4)


def test_bad_backend_name():
    with pytest.raises(ValueError, match="not one of"):
        zsqfast.set_backend("fast")
    old = os.environ.get("ZSQFAST_BACKEND")
    os.environ["ZSQFAST_BACKEND"] = "bogus"
    try:
        with pytest.raises(ValueError, match="ZSQFAST_BACKEND"):
            zsqfast.get_backend()
    finally:
        if old is None:
            del os.environ["ZSQFAST_BACKEND"]
        else:
            os.environ["ZSQFAST_BACKEND"] = old


def test_env_var_selects_backend():
    code = "import zsqfast; print(zsqfast.get_backend())"
    env = dict(os.environ, ZSQFAST_BACKEND="reference")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, cwd=REPO, check=True)
    assert out.stdout.strip() == "reference"


def _import_in_subprocess(pkg_parent: str, env_extra: dict) -> subprocess.CompletedProcess:
    code = textwrap.dedent("""
        import warnings, torch
        warnings.simplefilter("always")
        with warnings.catch_warnings(record=True) as w:
            import zsqfast
        x = torch.randn(10)
        y = zsqfast.fake_quantize(x, 0.1, 0, 4)
        print("backends", zsqfast.available_backends("cpu"))
        print("warnings", len([m for m in w if "compiled extension" in str(m.message)]))
        print("why", zsqfast._ext.load_error())
        try:
            zsqfast.set_backend("cpp"); zsqfast.fake_quantize(x, 0.1, 0, 4)
        except RuntimeError as e:
            print("explicit-error", "not loaded" in str(e))
    """)
    env = dict(os.environ, PYTHONPATH=pkg_parent, **env_extra)
    env.pop("TRITON_INTERPRET", None)
    return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, cwd=pkg_parent)


def test_import_with_extension_skipped():
    out = _import_in_subprocess(REPO, {"ZSQFAST_NO_EXT": "1"})
    assert out.returncode == 0, out.stderr
    assert "backends ['reference']" in out.stdout and "explicit-error True" in out.stdout


def test_import_with_broken_extension(tmp_path):
    shutil.copytree(os.path.join(REPO, "zsqfast"), tmp_path / "zsqfast",
                    ignore=shutil.ignore_patterns("*.so", "__pycache__"))
    (tmp_path / "zsqfast" / "_C.cpython-311-x86_64-linux-gnu.so").write_bytes(b"not an ELF file")
    out = _import_in_subprocess(str(tmp_path), {})
    assert out.returncode == 0, out.stderr
    assert "warnings 1" in out.stdout and "failed to load" in out.stdout
    assert "explicit-error True" in out.stdout


def test_import_does_not_initialise_cuda_or_triton():
    code = "import sys, torch, zsqfast; print(torch.cuda.is_initialized(), 'triton' in sys.modules)"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, cwd=REPO, check=True)
    assert out.stdout.split()[-2:] == ["False", "False"]


def test_a_built_extension_loads():
    """A compiled extension next to the package must load: a broken build must fail CI, not silently skip
    every compiled-kernel test."""
    import glob

    built = glob.glob(os.path.join(REPO, "zsqfast", "_C*.so"))
    if not built or os.environ.get("ZSQFAST_NO_EXT") == "1":
        pytest.skip("no compiled extension in this checkout (ZSQFAST_SKIP_BUILD=1 install)")
    assert zsqfast._ext.load_error() is None, zsqfast._ext.load_error()
    assert "cpp" in zsqfast.available_backends("cpu")
