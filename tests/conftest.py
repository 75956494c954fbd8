"""Test-session setup: the Triton interpreter must be switched on before anything imports triton."""
import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

import zsqfast  # noqa: E402

torch.manual_seed(0)


def cpu_backends(op: str = "fake_quant") -> list[str]:
    """Backends that can run ``op`` on CPU tensors in this process (reference always; cpp when built;
    triton under the interpreter)."""
    return zsqfast.available_backends("cpu", op)


@pytest.fixture(params=["scalar", "avx2", "avx512", "avx512_vnni"])
def cpu_isa(request):
    """Runs a cpp-backend test once per ISA level this CPU has (skips the others)."""
    if "cpp" not in cpu_backends():
        pytest.skip("the C++ extension is not loaded")
    if not torch.ops.zsqfast_ext.set_cpu_isa(request.param):
        pytest.skip(f"this CPU lacks {request.param}")
    yield request.param
    torch.ops.zsqfast_ext.set_cpu_isa("auto")
