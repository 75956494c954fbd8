"""Zero-shot accuracy on real CIFAR-10 images: ResNet-20 / ResNet-56, W4A4 / W3A3 (run by hand, not in CI).

For each model (the pretrained checkpoints of ../shared/data): synthesize ONE set from the FP32 model (HAST
recipe), shared by both bit widths and both methods; then per bit width the zero-shot round-to-nearest model
(ranges calibrated on synthetic images) and two fine-tunings on the same synthetic set, the KD baseline and
SynQ. Every model is evaluated once, at the end, on the 5,000 real images of test_dev_5k (JPEG-decoded, so
FP32 is ~10 points below the published figures: compare rows with FP32 on this data). Nothing is selected on
test data: no epoch choice, no hyperparameter search, no held-out split of it.

Budgets (synthetic images, synthesis iterations, fine-tuning epochs); batch 256 throughout:
    paper     5120, 1000, 100   (SynQ's protocol; hours on 2 CPU cores)
    reduced    512,  200, 100   (sized to finish in <= 45 min on the project's idle 2-core Zen 4 CPU)
    tiny        32,    2,   1   (a smoke test of the script, seconds)
"reduced" keeps the paper's 100 epochs but on a tenth of the images (200 SGD steps instead of 2,000) and a
fifth of the synthesis iterations. Sized from idle costs (2 threads, per batch of 256): a synthesis
iteration ~0.37 s (ResNet-20) / ~1 s (ResNet-56, estimated), a fine-tuning step 0.4-0.7 s / ~1.2-2 s (ResNet-56
estimated at 3x), an evaluation of 5,000 images ~3 / ~9 s: synthesis 2 x 200 x 1.4 s ~ 9 min, fine-tuning
4 x 200 x (0.4..0.7 + 1.2..2) s ~ 21-36 min, plus the MSE range search and evaluations: ~35-50 min. Timed
idle in one piece on 2026-12-02 (2 threads): 1,942 s = 32 min.

Everything is written under --out (resumable: rerun the same command after an interruption).
Usage: python benchmarks/accuracy_cifar10.py --budget reduced [--models 20,56] [--bits 4,3]
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _timing import machine  # noqa: E402

BUDGETS = {"paper": (5120, 1000, 100), "reduced": (512, 200, 100), "tiny": (32, 2, 1)}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--budget", choices=sorted(BUDGETS), default="reduced")
    p.add_argument("--models", default="20,56", help="CIFAR ResNet depths")
    p.add_argument("--bits", default="4,3", help="W = A bit widths")
    p.add_argument("--out", default=None, help="work directory (default benchmarks/results/accuracy_cifar10_<budget>)")
    p.add_argument("--eval-n", type=int, default=None, help="evaluate on the first N test images (default all)")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    import zsqfast
    from zsqfast.data import load_cifar10_test
    from zsqfast.models import load_cifar_resnet

    n_img, iters, epochs = BUDGETS[args.budget]
    batch = min(256, n_img)
    root = args.out or os.path.join(os.path.dirname(os.path.abspath(__file__)), "results",
                                    f"accuracy_cifar10_{args.budget}")
    try:
        x, y = load_cifar10_test(args.eval_n)
        models = {d: load_cifar_resnet(int(d)) for d in args.models.split(",")}
    except FileNotFoundError as exc:
        print(f"accuracy_cifar10: {exc}", file=sys.stderr)
        return 2
    bits = [int(b) for b in args.bits.split(",")]
    print(f"machine: {machine()}")
    print(f"budget '{args.budget}': {n_img} synthetic images x {iters} synthesis iterations (HAST), {epochs} "
          f"fine-tuning epochs, batch {batch}; evaluation: {len(y)} real images of test_dev_5k; work dir {root}")
    rows, t_all = [], time.perf_counter()
    for depth, fp in models.items():
        t0 = time.perf_counter()
        synth_dir = os.path.join(root, f"resnet{depth}", "synthetic")
        zsqfast.synthesize(fp, n_img, batch_size=batch, iterations=iters, seed=args.seed, out=synth_dir)
        t_synth = time.perf_counter() - t0
        for b in bits:
            res = {}
            for method in ("kd", "synq"):
                res[method] = zsqfast.quantize(fp, b, b, method=method, epochs=epochs, batch_size=batch,
                                               data=synth_dir, seed=args.seed, eval_data=(x, y), curve_data=None,
                                               out=os.path.join(root, f"resnet{depth}", f"w{b}a{b}_{method}"))
            m_kd = res["kd"].metrics
            row = dict(model=f"ResNet-{depth}", bits=f"W{b}A{b}", fp32=m_kd["fp32_accuracy"], rtn=m_kd["rtn_accuracy"],
                       kd=res["kd"].metrics["final_accuracy"], synq=res["synq"].metrics["final_accuracy"],
                       synth_s=t_synth, kd_s=res["kd"].metrics.get("finetune_time_s", 0.0),
                       synq_s=res["synq"].metrics.get("finetune_time_s", 0.0))
            rows.append(row)
            print(json.dumps({k: round(v, 2) if isinstance(v, float) else v for k, v in row.items()}), flush=True)
    print(f"\n| model | bits | FP32 | round-to-nearest | KD | SynQ | SynQ - FP32 | synthesis s | KD s | SynQ s |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['model']} | {r['bits']} | {r['fp32']:.2f} | {r['rtn']:.2f} | {r['kd']:.2f} | {r['synq']:.2f} | "
              f"{r['synq'] - r['fp32']:+.2f} | {r['synth_s']:.0f} | {r['kd_s']:.0f} | {r['synq_s']:.0f} |")
    print(f"\ntotal wall time {time.perf_counter() - t_all:.0f} s (stages already done in the work dir are not re-run "
          "and count their original times above)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
