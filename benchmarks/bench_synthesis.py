"""BN-statistics loss cost: per layer, and added to a whole model's forward+backward (issue 4, part a).

(a) per layer, forward+backward of one BN-statistics term on a BatchNorm input x plus a downstream use of x
    (``(x * w).sum()``, standing for the BatchNorm path): zsqfast's fused op + tap vs the hook reference
    (``x.mean`` / ``x.var`` over (0, 2, 3)) vs the DeepInversion-style hook (variance of a permuted copy);
(b) whole model, forward+backward w.r.t. the input images at synthesis batch sizes: plain (cross-entropy
    only) vs + BNSLoss(fused) vs + BNSLoss(hook reference); the overhead each adds to the plain step.
(c) one whole synthesis iteration (method "hast": augmentation where the recipe has it, forward, BNS +
    hard-sample loss, backward, Adam, plateau scheduler): a faithful re-implementation of the official
    HAST/SynQ loop (official_synthesis.py: hooks, per-image stack copies, d_acc host copy, weight gradients,
    per-layer host copies of the BN statistics, with and without those copies) vs zsqfast's engine in fp32
    (channels-last, and NCHW) and in its opt-in bf16 autocast mode; images per hour for the full recipe
    (1,000 iterations per batch).
(d) PSAQ-ViT's patch-similarity KDE of one attention block, forward + backward w.r.t. the similarities
    (B x 196^2 values, 10 grid points, bandwidth 0.01; DeiT at 224): the plain-PyTorch formula (the (B, K, M)
    kernel matrix, as the official code) vs the ``zsqfast::kde_density`` C++ kernels.

Run: python benchmarks/bench_synthesis.py [--threads 2] [--quick]
"""
from __future__ import annotations

import contextlib
import copy
import os
import statistics
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import zsqfast  # noqa: E402
from _timing import bench, cli  # noqa: E402
from zsqfast.models import build  # noqa: E402
from zsqfast.ops.bn_stats import batch_stats  # noqa: E402
from zsqfast.synthesis.engine import iteration_runner  # noqa: E402
from official_synthesis import OfficialLoop  # noqa: E402


def hast_term(mean, var, rm, rv):
    return F.mse_loss(mean, rm) + F.mse_loss(var, rv)


def layer_rows(quick: bool) -> list[dict]:
    shapes = [("CIFAR stage 1 256x16x32x32", (256, 16, 32, 32)), ("CIFAR stage 3 256x64x8x8", (256, 64, 8, 8)),
              ("ImageNet stage 1 32x64x56x56", (32, 64, 56, 56))]
    if quick:
        shapes = [(n, (s[0] // 4,) + s[1:]) for n, s in shapes]
    rows = []
    for label, shape in shapes:
        for layout in ("NCHW", "NHWC"):
            x = torch.randn(shape)
            if layout == "NHWC":
                x = x.contiguous(memory_format=torch.channels_last)
            x.requires_grad_(True)
            w = torch.randn_like(x)
            rm, rv = torch.zeros(shape[1]), torch.ones(shape[1])

            def run(stats_fn):
                def step():
                    x.grad = None
                    y, mean, var = stats_fn(x)
                    (hast_term(mean, var, rm, rv) + (y * w).sum()).backward()
                return step

            def hook_ref(t):
                return t, t.mean(dim=[0, 2, 3]), t.var(dim=[0, 2, 3], unbiased=False)

            def deepinv(t):
                c = t.size(1)
                return t, t.mean(dim=[0, 2, 3]), t.permute(1, 0, 2, 3).contiguous().view(c, -1).var(1, unbiased=False)

            def fused(t):
                return batch_stats(t, tap=True)

            def floor(t):  # the downstream use alone: what any BN loss adds to
                return t, None, None

            t_floor = bench(lambda: (setattr(x, "grad", None), (x * w).sum().backward()))
            times = {"hook reference": bench(run(hook_ref)), "DeepInversion hook": bench(run(deepinv)),
                     "zsqfast fused": bench(run(fused))}
            best_ref = min(times["hook reference"], times["DeepInversion hook"])
            for k, t in times.items():
                rows.append(dict(part="a", case=f"{label} {layout}", impl=k, ms=round(t * 1e3, 3),
                                 added_ms=round((t - t_floor) * 1e3, 3),
                                 speedup=round((best_ref - t_floor) / max(t - t_floor, 1e-9), 2)))
    return rows


def round_robin(steps: dict, rounds: int, warmup: int = 2) -> dict:
    """Median seconds per call of every step, timed one call of each per round (a drifting machine load then
    biases no variant); the first ``warmup`` rounds are not timed."""
    times = {k: [] for k in steps}
    for r in range(rounds + warmup):
        for k, step in steps.items():
            t0 = time.perf_counter()
            step()
            if r >= warmup:
                times[k].append(time.perf_counter() - t0)
    return {k: statistics.median(v) for k, v in times.items()}


def model_rows(quick: bool) -> list[dict]:
    configs = [("cifar_resnet20", 256, 32), ("cifar_resnet32", 256, 32), ("resnet18", 32, 224)]
    if quick:
        configs = [(n, b // 8, s) for n, b, s in configs]
    rows = []
    for name, batch, size in configs:
        torch.manual_seed(0)
        model = build(name).eval()
        x = torch.randn(batch, 3, size, size, requires_grad=True)
        y = torch.randint(0, 10, (batch,))

        def plain():
            x.grad = None
            F.cross_entropy(model(x), y).backward()

        def with_bns(bns):
            def step():
                x.grad = None
                logits, loss = bns(x)
                (loss + F.cross_entropy(logits, y)).backward()
            return step

        with zsqfast.BNSLoss(copy.deepcopy(model), "hast", fused=False) as ref, \
                zsqfast.BNSLoss(copy.deepcopy(model), "hast", fused=True) as fused:
            med = round_robin({"plain": plain, "+ BNS hook reference": with_bns(ref),
                               "+ BNS zsqfast fused": with_bns(fused)}, rounds=7)
        t_plain = med.pop("plain")
        times = med
        rows.append(dict(part="b", case=f"{name} batch {batch} {size}x{size}", impl="plain fwd+bwd",
                         ms=round(t_plain * 1e3, 1), added_ms=0.0, speedup=""))
        ref_added = times["+ BNS hook reference"] - t_plain
        for k, t in times.items():
            added = t - t_plain
            less = (f"{ref_added / added:.1f}x less added than the reference" if added > 0.01 * t_plain
                    else "added time within timing noise (< 1 % of plain)")
            rows.append(dict(part="b", case=f"{name} batch {batch} {size}x{size}", impl=k, ms=round(t * 1e3, 1),
                             added_ms=round(added * 1e3, 1), speedup=f"{100 * added / t_plain:+.1f} % of plain; {less}"))
    return rows


def iteration_rows(quick: bool) -> list[dict]:
    """Part (c). The variants run round-robin (one iteration of each per round, medians over the rounds), each
    on its own copy of the model, so that a drifting machine load biases no variant."""
    configs = [("cifar_resnet20", 256, 32, 10, 8), ("resnet18", 32, 224, 1000, 5)]
    if quick:
        configs = [(n, b // 8, s, c, 3) for n, b, s, c, _ in configs]
    rows = []
    for name, batch, size, classes, rounds in configs:
        torch.manual_seed(0)
        model = build(name).eval()
        case = f"{name} batch {batch} {size}x{size}"
        with contextlib.ExitStack() as stack:
            steps = {}
            for label, copies in (("official loop (host copies)", True), ("official loop (no host copies)", False)):
                loop = OfficialLoop(copy.deepcopy(model), batch, size, classes, host_copies=copies)
                stack.callback(loop.close)
                steps[label] = loop.step
            for label, kw in (("zsqfast fp32 NCHW", dict(channels_last=False)), ("zsqfast fp32", {}),
                              ("zsqfast bf16 (opt-in)", dict(precision="bf16"))):
                steps[label] = stack.enter_context(iteration_runner(copy.deepcopy(model), batch,
                                                                    input_shape=(3, size, size),
                                                                    num_classes=classes, **kw))
            med = round_robin(steps, rounds)
        base = med["official loop (host copies)"]
        for k, t in med.items():
            rows.append(dict(part="c", case=case, impl=k, ms=round(t * 1e3, 1), added_ms=float("nan"),
                             speedup=f"{base / t:.2f}x official; {batch * 3600 / (1000 * t):.0f} images/hour"))
    return rows


def kde_rows(quick: bool) -> list[dict]:
    from zsqfast.ops import kde_density as kd

    batch = 4 if quick else 32
    v = torch.rand(batch, 196 * 196) * 2 - 1
    grid = (v.amin(1, keepdim=True) + (v.amax(1, keepdim=True) - v.amin(1, keepdim=True))
            * torch.linspace(0, 1, 10)).contiguous()
    gp = torch.randn(batch, 10)

    def step(fn):
        def run():
            x = v.clone().requires_grad_(True)
            (fn(x) * gp).sum().backward()
        return run

    med = round_robin({"plain PyTorch (official formula)": step(lambda x: kd.reference(x, grid, 0.01)),
                       "zsqfast kde_density": step(lambda x: kd.kde_density(x, grid, 0.01))}, rounds=5)
    base = med["plain PyTorch (official formula)"]
    return [dict(part="d", case=f"KDE {batch}x196^2 values x 10 points", impl=k, ms=round(t * 1e3, 2),
                 added_ms=float("nan"), speedup=f"{base / t:.2f}x the plain formula") for k, t in med.items()]


def main() -> None:
    cli(__doc__, "bench_synthesis",
        lambda quick: layer_rows(quick) + model_rows(quick) + iteration_rows(quick) + kde_rows(quick),
        [("part", "4s"), ("case", "40s"), ("impl", "22s"), ("ms", "9.3f"), ("added_ms", "9.3f"), ("speedup", "")],
        "(a) added_ms = time - time of the downstream use alone; speedup = added ms of the faster reference hook "
        "/ added ms of this implementation")

if __name__ == "__main__":
    main()
