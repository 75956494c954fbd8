"""The console script: info, bad arguments (the README demo: tests/test_demo_pipeline.py)."""
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


def test_bad_arguments_exit_2():
    assert _cli("frobnicate").returncode == 2
    assert _cli("demo", "--seed", "x").returncode == 2
