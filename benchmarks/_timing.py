"""Timing helpers shared by the benchmarks: median wall time, machine description, CSV output."""
from __future__ import annotations

import csv
import os
import platform
import statistics
import time
from typing import Callable

import torch


def bench(fn: Callable[[], object], *, warmup: int = 2, reps: int = 7, min_time: float = 0.5) -> float:
    """Median seconds per call of ``fn`` (at least ``reps`` calls and ``min_time`` seconds measured)."""
    for _ in range(warmup):
        fn()
    times: list[float] = []
    start = time.perf_counter()
    while len(times) < reps or (time.perf_counter() - start < min_time and len(times) < 200):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def machine() -> str:
    """One line naming the CPU, the thread count and the software versions."""
    cpu = platform.processor() or "unknown CPU"
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    import zsqfast

    return (f"{cpu}, {os.cpu_count()} cores, torch {torch.__version__} with {torch.get_num_threads()} threads, "
            f"zsqfast ISA {zsqfast.cpu_isa()}")


def write_csv(name: str, rows: list[dict]) -> str:
    """Write ``rows`` to ``benchmarks/results/<name>.csv``; returns the path."""
    out_dir = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, f"{name}.csv")
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    return path


def cli(doc: str, name: str, run, columns: list[tuple[str, str]], legend: str = "") -> None:
    """The shared ``main`` of the benchmarks: ``--threads`` / ``--quick``, the machine line, a warm-up, then
    ``rows = run(quick)`` printed as a table (``columns`` = (key, format spec) pairs) and written to CSV."""
    import argparse

    ap = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--quick", action="store_true", help="smaller sizes (smoke run)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    print(f"machine: {machine()}")
    warm = torch.randn(1 << 22)
    bench(lambda: warm * 1.0)  # spin up the thread pool and the allocator before the first row
    rows = run(args.quick)
    widths = [max(len(k), len(f"{r[k]:{spec}}")) for k, spec in columns for r in rows[:1]]
    print("  ".join(f"{k:>{w}}" if spec.endswith("f") else f"{k:{w}}" for (k, spec), w in zip(columns, widths)))
    for r in rows:
        print("  ".join(f"{r[k]:{spec}}" for k, spec in columns))
    if legend:
        print(legend)
    print("csv:", write_csv(name, rows))
