"""The pipeline subcommands of the ``zsqfast`` command line (in process, tiny budgets) and their errors."""
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch

from zsqfast.cli import main
from zsqfast.models import cifar_resnet
from zsqfast.png import write_png

TINY = ["--num-images", "32", "--synth-iterations", "2", "--synth-batch-size", "16", "--epochs", "1",
        "--batch-size", "16", "--calib-batches", "1", "--quiet"]


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("cli")
    torch.manual_seed(0)
    torch.save(cifar_resnet(8).state_dict(), d / "r8.pth")
    torch.save(cifar_resnet(14).state_dict(), d / "r14.pth")
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (24, 32, 32, 3), dtype=np.uint8)
    np.savez(d / "eval.npz", images=images, labels=rng.integers(0, 10, 24))
    for i in range(4):  # an image folder with two classes
        write_png(d / "folder" / f"class{i % 2}" / f"{i}.png", images[i])
    return d


def _run(*argv) -> int:
    return main([str(a) for a in argv])


@pytest.fixture(scope="module")
def quantized(files):
    out = files / "run"
    assert _run("quantize", "--model", "cifar_resnet8", "--checkpoint", files / "r8.pth", "--w-bits", 4,
                "--a-bits", 4, "--out", out, "--eval-data", files / "eval.npz", *TINY) == 0
    return out


def test_help_on_every_subcommand(capsys):
    for cmd in ("quantize", "synthesize", "finetune", "eval", "export", "bench", "demo", "info"):
        with pytest.raises(SystemExit) as e:
            main([cmd, "--help"])
        assert e.value.code == 0
        assert "usage: zsqfast " + cmd in capsys.readouterr().out


def test_console_entry_point_help():
    r = subprocess.run([sys.executable, "-m", "zsqfast.cli", "quantize", "--help"], capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0 and "--w-bits" in r.stdout


def test_console_script_installed():
    """The ``zsqfast`` executable pip installed next to this interpreter (the README's command)."""
    exe = os.path.join(os.path.dirname(sys.executable), "zsqfast")
    if not os.path.exists(exe):
        pytest.skip(f"no console script at {exe} (zsqfast not pip-installed into this interpreter's prefix)")
    r = subprocess.run([exe, "demo", "--help"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and "usage: zsqfast demo" in r.stdout


@pytest.mark.parametrize("argv, script, extra", [
    (["bench", "--quick"], "bench_fake_quant.py", ["--quick"]),
    (["bench", "--which", "finetune"], "bench_finetune.py", []),
    (["bench", "--which", "accuracy_cifar10", "--quick"], "accuracy_cifar10.py", ["--budget", "tiny"]),
])
def test_bench_runs_the_script_and_returns_its_exit_code(monkeypatch, argv, script, extra):
    import zsqfast.cli as cli

    calls = []
    monkeypatch.setattr(cli.subprocess, "call", lambda cmd: calls.append(cmd) or 3)
    assert main(argv) == 3  # the script's exit status, passed through
    (cmd,) = calls
    assert cmd[0] == sys.executable and os.path.basename(cmd[1]) == script and os.path.exists(cmd[1])
    assert cmd[2:] == extra


@pytest.mark.parametrize("rc, code, message", [(-9, 1, "killed by signal 9 (SIGKILL"), (-2, 130, "interrupted")])
def test_bench_killed_by_a_signal_exits_with_a_documented_code(monkeypatch, capsys, rc, code, message):
    import zsqfast.cli as cli

    monkeypatch.setattr(cli.subprocess, "call", lambda cmd: rc)
    assert main(["bench", "--which", "lowbit_gemm", "--quick"]) == code
    assert message in capsys.readouterr().err


def test_interrupt_exits_130_and_says_resume(files, monkeypatch, capsys):
    from zsqfast import pipeline

    def interrupted(*a, **k):
        raise KeyboardInterrupt
    monkeypatch.setattr(pipeline, "synthesize", interrupted)
    assert _run("quantize", "--model", "cifar_resnet8", "--checkpoint", files / "r8.pth", "--w-bits", 4,
                "--a-bits", 4, "--out", files / "interrupted", *TINY) == 130
    assert "rerun the same command to resume" in capsys.readouterr().err


def test_quantize_then_eval_and_resume(files, quantized, capsys, monkeypatch):
    for name in ("manifest.json", "model.pt", "rtn.pt", "synthetic/index.json", "finetune/log.jsonl"):
        assert (quantized / name).exists(), name
    capsys.readouterr()
    assert _run("eval", "--quantized", quantized, "--eval-data", files / "eval.npz") == 0  # model from the config
    assert "W4A4 (synq): top-1" in capsys.readouterr().out
    assert _run("eval", "--model", "cifar_resnet8", "--checkpoint", files / "r8.pth", "--eval-data",
                files / "folder") == 0
    assert "on 4 images" in capsys.readouterr().out
    # rerunning the same command resumes (everything is done: nothing recomputed, same exit code)
    from zsqfast import pipeline

    for name in ("synthesize", "calibrate", "finetune"):
        monkeypatch.setattr(pipeline, name, lambda *a, _n=name, **k: pytest.fail(f"{_n} ran again"))
    assert _run("quantize", "--model", "cifar_resnet8", "--checkpoint", files / "r8.pth", "--w-bits", 4,
                "--a-bits", 4, "--out", quantized, "--eval-data", files / "eval.npz", *TINY) == 0


def test_eval_reads_the_model_file_once(files, quantized, monkeypatch):
    from zsqfast import pipeline

    reads = []
    real = pipeline.read_payload
    monkeypatch.setattr(pipeline, "read_payload", lambda path: reads.append(path) or real(path))
    assert _run("eval", "--quantized", quantized, "--eval-data", files / "eval.npz") == 0  # model from the config
    assert reads == [quantized / "model.pt"]


def test_synthesize_then_finetune(files, capsys):
    assert _run("synthesize", "--model", "cifar_resnet8", "--checkpoint", files / "r8.pth", "--num-images", 16,
                "--iterations", 2, "--batch-size", 16, "--out", files / "syn", "--quiet") == 0
    assert _run("finetune", "--model", "cifar_resnet8", "--checkpoint", files / "r8.pth", "--data", files / "syn",
                "--w-bits", 3, "--a-bits", 3, "--method", "kd", "--epochs", 1, "--batch-size", 16,
                "--calib-batches", 1, "--act-ste", "identity", "--out", files / "ft", "--quiet") == 0
    assert (files / "ft" / "model.pt").exists() and not (files / "ft" / "synthetic").exists()
    assert json.loads((files / "ft" / "manifest.json").read_text())["config"]["act_ste"] == "identity"


@pytest.mark.parametrize("argv, message", [
    (["quantize", "--model", "cifar_resnet8", "--checkpoint", "{d}/r8.pth", "--w-bits", "9", "--a-bits", "4",
      "--out", "{d}/x"], "--w-bits must be an integer in 2..8"),
    (["quantize", "--model", "cifar_resnet8", "--checkpoint", "{d}/missing.pth", "--w-bits", "4", "--a-bits", "4",
      "--out", "{d}/x"], "not found"),
    (["quantize", "--model", "cifar_resnet8", "--checkpoint", "{d}/r14.pth", "--w-bits", "4", "--a-bits", "4",
      "--out", "{d}/x"], "does not fit model"),
    (["quantize", "--model", "resnet18", "--w-bits", "4", "--a-bits", "4", "--out", "{d}/x"], "needs --checkpoint"),
    (["quantize", "--model", "no_such_net", "--checkpoint", "{d}/r8.pth", "--w-bits", "4", "--a-bits", "4",
      "--out", "{d}/x"], "unknown model"),
    (["quantize", "--model", "cifar_resnet8", "--checkpoint", "{d}/r8.pth", "--w-bits", "3", "--a-bits", "3",
      "--out", "{d}/run"], "different quantization run"),
    (["eval", "--quantized", "{d}/run", "--eval-data", "{d}/nothing.npz"], "not found"),
    (["eval", "--quantized", "{d}/run", "--eval-data", "{d}/r8.pth"], "must hold arrays 'images'"),
    (["eval", "--quantized", "{d}/nowhere", "--eval-data", "{d}/eval.npz"], "no model.pt"),
    (["eval", "--model", "cifar_resnet14", "--checkpoint", "{d}/r14.pth", "--quantized", "{d}/run", "--eval-data",
      "{d}/eval.npz"], "does not fit this model"),
    (["finetune", "--model", "cifar_resnet8", "--checkpoint", "{d}/r8.pth", "--data", "{d}", "--w-bits", "4",
      "--a-bits", "4", "--out", "{d}/y"], "no synthetic set"),
    (["eval", "--quantized", "{d}/eval.npz", "--eval-data", "{d}/eval.npz"], "is not a readable model file"),
    (["eval", "--model", "cifar_resnet8", "--checkpoint", "{d}/r8.pth", "--quantized", "{d}/eval.npz",
      "--eval-data", "{d}/eval.npz"], "is not a readable model file"),
    (["export", "--quantized", "{d}/run", "--out", "{d}"], "is a directory"),
    (["quantize", "--model", "cifar_resnet8", "--checkpoint", "{d}/r8.pth", "--w-bits", "4", "--a-bits", "4",
      "--synth-batch-size", "0", "--out", "{d}/z"], "synth_batch_size must be an integer >= 1"),
])
def test_bad_input_exit_2_with_advice(files, quantized, capsys, argv, message):
    assert main([a.format(d=files) for a in argv]) == 2
    assert message in capsys.readouterr().err


def test_usage_errors_exit_2(capsys):
    for argv in (["quantize"], ["quantize", "--model", "m", "--w-bits", "four", "--a-bits", "4", "--out", "o"],
                 ["eval", "--model", "x"], ["frobnicate"], ["eval", "--model", "x", "--eval-data", "e.npz",
                                                            "--eval-n", "-5"]):
        with pytest.raises(SystemExit) as e:
            main(argv)
        assert e.value.code == 2


def test_runtime_failure_exit_1(files, quantized, monkeypatch, capsys):
    import zsqfast

    monkeypatch.setattr(sys.modules["zsqfast.convert"], "convert_to_integer", lambda q: 1 / 0)
    assert _run("export", "--quantized", quantized, "--out", files / "int.safetensors") == 1
    assert "failed: ZeroDivisionError" in capsys.readouterr().err
    monkeypatch.setattr(sys.modules["zsqfast.finetune.trainer"], "evaluate", lambda *a, **k: 1 / 0)
    assert _run("eval", "--quantized", quantized, "--eval-data", files / "eval.npz") == 1
    assert "failed: ZeroDivisionError" in capsys.readouterr().err


def test_export_writes_a_loadable_integer_model(files, quantized):
    import zsqfast

    assert _run("export", "--quantized", quantized, "--out", files / "int.safetensors") == 0
    im = zsqfast.load_integer_model(files / "int.safetensors", lambda: cifar_resnet(8))
    y = im(torch.randn(2, 3, 32, 32))
    assert y.shape == (2, 10) and bool(torch.isfinite(y).all())


def test_export_creates_the_parent_directory(files, quantized):
    out = files / "new" / "dir" / "int.safetensors"
    assert _run("export", "--quantized", quantized, "--out", out) == 0
    assert out.exists() and os.listdir(out.parent) == ["int.safetensors"]  # no temp file left


def test_unfinished_run_is_evaluated_as_round_to_nearest(files, quantized, capsys):
    """A quantize directory without model.pt (fine-tuning unfinished) is its rtn.pt, labelled and said so."""
    d = files / "unfinished"
    shutil.copytree(quantized, d)
    (d / "model.pt").unlink()
    capsys.readouterr()
    assert _run("eval", "--quantized", d, "--eval-data", files / "eval.npz") == 0
    captured = capsys.readouterr()
    assert "W4A4 (round-to-nearest): top-1" in captured.out and "using rtn.pt" in captured.err
    assert _run("export", "--quantized", d, "--out", files / "rtn_int.safetensors") == 0
    assert "W4A4 (round-to-nearest)" in capsys.readouterr().out


def test_explicit_default_options_resume_the_run(files, quantized, monkeypatch):
    from zsqfast import pipeline

    for name in ("synthesize", "calibrate", "finetune"):
        monkeypatch.setattr(pipeline, name, lambda *a, _n=name, **k: pytest.fail(f"{_n} ran again"))
    assert _run("quantize", "--model", "cifar_resnet8", "--checkpoint", files / "r8.pth", "--w-bits", 4,
                "--a-bits", 4, "--out", quantized, "--eval-data", files / "eval.npz", *TINY, "--lr", "1e-5",
                "--calib-method", "mse", "--act-ste", "clipped", "--first-last-bits", 4) == 0


def test_data_dir_env_is_respected(monkeypatch, capsys):
    monkeypatch.setenv("ZSQFAST_DATA", os.path.join(os.sep, "nonexistent-zsqfast"))
    assert main(["eval", "--model", "cifar_resnet20", "--eval-data", "x.npz"]) == 2
    assert "ZSQFAST_DATA" in capsys.readouterr().err


@pytest.mark.parametrize("name", ["resnet18", "torchvision:resnet18"])
def test_timm_and_torchvision_models_with_a_checkpoint(files, capsys, name):
    from zsqfast.models import build

    ckpt = files / f"{name.replace(':', '_')}.pth"
    torch.manual_seed(0)
    torch.save({"state_dict": build(name, num_classes=2).state_dict()}, ckpt)  # a training script's layout
    assert _run("eval", "--model", name, "--checkpoint", ckpt, "--num-classes", 2, "--eval-data",
                files / "folder") == 0  # 32x32 PNGs resized and center-cropped to 224
    assert "on 4 images" in capsys.readouterr().out
    assert _run("eval", "--model", name, "--checkpoint", ckpt, "--eval-data", files / "folder") == 2  # 1000 classes
    assert "does not fit" in capsys.readouterr().err
