"""CMakeLists.txt builds the same CPU sources standalone and its C++ kernel test passes (ctest)."""
import os
import shutil
import subprocess

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_cmake_build_and_ctest(tmp_path):
    cmake = shutil.which("cmake")
    if cmake is None:
        pytest.skip("cmake not found")
    gen = ["-G", "Ninja"] if shutil.which("ninja") else []
    for cmd in ([cmake, "-S", REPO, "-B", str(tmp_path)] + gen, [cmake, "--build", str(tmp_path), "-j2"],
                ["ctest", "--test-dir", str(tmp_path), "--output-on-failure"]):
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
        assert r.returncode == 0, (cmd, r.stdout[-2000:], r.stderr[-2000:])
