"""The console script: info, the README demo (no-data path), bad arguments."""
import os
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _cli(*args, env_extra=None, timeout=600):
    env = dict(os.environ, **(env_extra or {}))
    return subprocess.run([sys.executable, "-m", "zsqfast.cli", *args], capture_output=True, text=True, env=env,
                          cwd=REPO, timeout=timeout)


def test_info():
    r = _cli("info")
    assert r.returncode == 0, r.stderr
    assert "CPU backends" in r.stdout and "data directory" in r.stdout


def test_demo_without_data_uses_digits(tmp_path):
    r = _cli("demo", "--quick", "--quiet", "--out", str(tmp_path),
             env_extra={"ZSQFAST_DATA": "/nonexistent-zsqfast-data"})
    assert r.returncode == 0, r.stderr[-2000:]
    assert "DigitsCNN" in r.stdout and "W4A4 round-to-nearest" in r.stdout
    fp32 = float(next(ln for ln in r.stdout.splitlines() if ln.startswith("FP32")).split()[-1])
    assert fp32 > 80.0  # a trained model, far above the 10 % of chance


def test_bad_arguments_exit_2():
    assert _cli("frobnicate").returncode == 2
    assert _cli("demo", "--seed", "x").returncode == 2
