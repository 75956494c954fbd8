"""Every Triton kernel compiles ahead of time for sm_80 and sm_90 (PTX + cubin) with zero spill bytes.

Runs in a subprocess without TRITON_INTERPRET (the test session sets it, and interpreted kernels cannot be
compiled for a GPU)."""
import json
import os
import subprocess
import sys

import pytest

pytest.importorskip("triton")


def test_aot_compile_sm80_sm90_no_spills():
    from zsqfast.kernels.aot import ptxas_path

    if not os.path.exists(ptxas_path()):
        pytest.skip(f"triton's bundled ptxas is missing ({ptxas_path()})")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    code = "import json; from zsqfast.kernels.aot import compile_all; print(json.dumps(compile_all()))"
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    rows = json.loads(out.stdout.strip().splitlines()[-1])
    assert {r["arch"] for r in rows} == {"sm_80", "sm_90"}
    assert len(rows) == 2 * 3 * 8  # 2 archs x 3 dtypes x 8 kernel variants
    assert all(r["registers"] > 0 for r in rows)
    spilled = [r for r in rows if r["spill_bytes"] != 0]
    assert not spilled, spilled
