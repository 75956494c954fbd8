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


def test_demo_takes_the_data_directory_as_the_pipeline_commands_do():
    """``demo --data-dir`` (the pipeline commands' name) and the older ``demo --data`` set the same option."""
    from zsqfast.cli import build_parser

    for flag in ("--data-dir", "--data"):
        assert build_parser().parse_args(["demo", flag, "/some/dir"]).data == "/some/dir"
