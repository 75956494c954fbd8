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


def bench_interleaved(fns: dict[str, Callable[[], object]], *, warmup: int = 2, reps: int = 5,
                      back_to_back: int = 0, pause: float = 0.0) -> dict[str, float]:
    """Median seconds per call of each of ``fns``, measured round-robin (one call of each per round), so that
    drift on a shared machine (other jobs, the allocator's state) hits every entry alike: use it for ratios.
    ``back_to_back``: each timed call directly follows that many untimed calls of the same function, so every
    entry is timed in its steady state (OpenMP threads awake, cores clocked up, its own data in cache)
    whatever ran before it: for sub-millisecond kernels, where a call right after another library's
    single-threaded call or an idle moment costs up to ~1 ms more on this VM (measured: the FFT low-pass at
    256x3x32x32, 0.33 ms back to back, 0.79 ms right after an rfft2, 1.26 ms after a 10 ms sleep).
    ``pause``: sleep that many seconds (untimed) before each timed call instead: the cold case."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(reps):
        for k, fn in fns.items():
            for _ in range(back_to_back):
                fn()
            if pause:
                time.sleep(pause)
            t0 = time.perf_counter()
            fn()
            times[k].append(time.perf_counter() - t0)
    return {k: statistics.median(v) for k, v in times.items()}


def keep_freed_memory() -> str:
    """Make glibc's malloc keep freed memory in the process (``mallopt``: no mmap for large blocks, trim only
    above 2 GiB), as jemalloc / tcmalloc do; returns a line saying what is in effect.

    With glibc's defaults a block of more than 128 KiB-32 MiB (the dynamic mmap threshold) is returned to the
    kernel when freed and page-faulted in again (zero-filled) on the next call: a CIFAR ResNet-20 batch-256
    forward took ~57k minor faults (~230 MB) a call here, 30-50 % of its time, and HOW many depends on the
    order of allocations, so two paths doing the same convolutions timed differently. Environment
    ``ZSQFAST_BENCH_MALLOC=default`` keeps glibc's defaults."""
    if os.environ.get("ZSQFAST_BENCH_MALLOC") == "default":
        return "allocator: glibc malloc defaults (ZSQFAST_BENCH_MALLOC=default)"
    import ctypes

    try:
        libc = ctypes.CDLL("libc.so.6")
        ok = libc.mallopt(-4, 0) == 1 and libc.mallopt(-1, 2**31 - 1) == 1  # M_MMAP_MAX = 0, M_TRIM_THRESHOLD
    except (OSError, AttributeError):
        ok = False
    if not ok:
        return "allocator: defaults (not glibc, mallopt unavailable)"
    return "allocator: glibc malloc keeps freed memory (M_MMAP_MAX=0, M_TRIM_THRESHOLD=2 GiB; " \
           "ZSQFAST_BENCH_MALLOC=default to keep the defaults)"
