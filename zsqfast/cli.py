"""The ``zsqfast`` command line.

    zsqfast info                  backends, CPU ISA, data directory
    zsqfast demo [--quick]        the README's main job: zero-shot W4A4 (FP32 / round-to-nearest / KD / SynQ
                                  accuracy), kernel speed, a Markdown report with pictures
    zsqfast bench [--quick] [--which NAME]   a benchmark (default benchmarks/bench_fake_quant.py)
    zsqfast quantize | synthesize | finetune | eval | export     the pipeline (zsqfast/commands.py)

Exit codes: 0 success, 2 bad arguments or inputs (with a message saying what to do), 1 anything else
(130 when interrupted: rerun the same command to resume). ZSQFAST_DEBUG=1 shows the traceback.
"""
from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys


BENCHMARKS = ("fake_quant", "lowbit_gemm", "int_model", "synthesis", "finetune", "accuracy_cifar10")


def _info(args) -> int:
    import torch

    import zsqfast
    from zsqfast import _ext

    print(f"zsqfast {zsqfast.__version__}, torch {torch.__version__}")
    print(f"CPU backends: {zsqfast.available_backends('cpu')} (active: {zsqfast.active_backend()}); "
          f"CPU ISA: {zsqfast.cpu_isa()}")
    print(f"extension: {'loaded' if _ext.load_error() is None else _ext.load_error()}; "
          f"CUDA kernels built: {_ext.has_cuda()}; GPU present: {torch.cuda.is_available()}")
    from zsqfast.data import data_dir

    d = data_dir()
    print(f"data directory: {d} ({'present' if d.is_dir() else 'absent'})")
    return 0


def _bench(args) -> int:
    name = "accuracy_cifar10.py" if args.which == "accuracy_cifar10" else f"bench_{args.which}.py"
    script = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks", name)
    if not os.path.exists(script):
        print(f"zsqfast bench: {script} not found (the benchmarks ship with the source checkout)", file=sys.stderr)
        return 2
    if args.which == "accuracy_cifar10":  # --quick: the script's tiny budget
        rc = subprocess.call([sys.executable, script, "--budget", "tiny" if args.quick else "reduced"])
    else:
        rc = subprocess.call([sys.executable, script] + (["--quick"] if args.quick else []))
    if rc < 0:  # killed by a signal: exit with the documented codes
        if rc == -signal.SIGINT:
            raise KeyboardInterrupt
        print(f"zsqfast bench: {name} was killed by signal {-rc} ({signal.Signals(-rc).name}; "
              "out of memory?)", file=sys.stderr)
        return 1
    return rc


def _demo(args) -> int:
    from zsqfast.demo_pipeline import run_pipeline_demo

    run_pipeline_demo(quick=args.quick, data=args.data, seed=args.seed,
                      out=args.out or ("zsqfast_demo_quick" if args.quick else "zsqfast_demo"), progress=not args.quiet)
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="zsqfast", description="Fast zero-shot quantization toolkit")
    sub = p.add_subparsers(dest="command", required=True)
    s = sub.add_parser("info", help="show backends, CPU ISA and the data directory")
    s.set_defaults(fn=_info)
    s = sub.add_parser("demo", help="quantize a small pretrained model (no downloads) and report accuracy and speed")
    s.add_argument("--quick", action="store_true", help="tiny budget (smoke test, seconds)")
    s.add_argument("--data-dir", "--data", dest="data", default=None,
                   help="data directory (default $ZSQFAST_DATA or ../shared/data), as in the pipeline commands")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--out", default=None, help="report directory (default ./zsqfast_demo or ./zsqfast_demo_quick)")
    s.add_argument("--quiet", action="store_true", help="no progress bars")
    s.set_defaults(fn=_demo)
    s = sub.add_parser("bench", help="run a benchmark (default: fake quantization)")
    s.add_argument("--quick", action="store_true")
    s.add_argument("--which", choices=BENCHMARKS,
                   default="fake_quant", help="benchmarks/bench_<which>.py, or accuracy_cifar10.py (--quick: tiny)")
    s.set_defaults(fn=_bench)
    from zsqfast.commands import add_commands

    add_commands(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.fn(args)
    except (ValueError, FileNotFoundError) as exc:
        if os.environ.get("ZSQFAST_DEBUG") == "1":
            raise
        print(f"zsqfast {args.command}: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"zsqfast {args.command}: interrupted; rerun the same command to resume", file=sys.stderr)
        return 130
    except Exception as exc:  # runtime failure: say what failed, exit 1
        if os.environ.get("ZSQFAST_DEBUG") == "1":
            raise
        print(f"zsqfast {args.command}: failed: {type(exc).__name__}: {exc} (ZSQFAST_DEBUG=1 for the traceback)",
              file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
