"""Every Triton kernel compiles ahead of time for sm_80 and sm_90 (PTX + cubin) with zero spill bytes, and
its PTX has no fused multiply-adds and no flush-to-zero arithmetic (either would break bit-exactness on a
GPU, which the interpreter tests cannot see).

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
    code = ("import json; from zsqfast.kernels.aot import compile_all, specializations; "
            "print(json.dumps({'variants': len(list(specializations())), 'rows': compile_all()}))")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    rows = result["rows"]
    assert len(rows) == 2 * result["variants"]
    assert {r["arch"] for r in rows} == {"sm_80", "sm_90"}
    assert {"fp32", "fp16", "bf16"} <= {r["dtype"] for r in rows}
    names = {r["kernel"].split("[")[0] for r in rows}
    assert {"fake_quant_fwd", "fake_quant_bwd", "lsq_fwd", "lsq_bwd", "bn_stats", "bn_stats_bwd"} <= names
    assert {"lowbit_gemm", "lowbit_linear", "lowbit_quantize_rows"} <= names
    assert {"fake_quant_fwd", "fake_quant_bwd", "lsq_fwd", "lsq_bwd", "bn_stats", "bn_stats_bwd",
            "circular_pass"} <= names
    assert all(r["registers"] > 0 for r in rows)
    bad = [r for r in rows if r["spill_bytes"] != 0 or r["fma"] != 0 or r["ftz"] != 0]
    assert not bad, bad
