"""Is the opt-in bf16 synthesis as good as fp32 for quantization? (issue 4: bf16 may only be recommended if
the fine-tuned accuracy from its images stays within noise of fp32 synthesis.)

For each precision (fp32, bf16) and seed: synthesize N images from the pretrained CIFAR ResNet-20 (method
"hast", ``--iterations`` per batch), quantize to W4A4 (ZeroQ-lineage placement), calibrate the activation
ranges on the images and KD-fine-tune (KL T=20 x 8000 + 0.5 CE, SGD nesterov lr 1e-5, ``--epochs``), then
evaluate on the 5,000 real test images of ../shared/data (FP32 ~81 % there). Prints, per run: synthesis
seconds, final BNS loss, round-to-nearest accuracy after calibration, fine-tuned accuracy; and the spread.

Every stage is resumable (``--out``): rerun the same command after an interruption to continue.
Run: python benchmarks/bf16_accuracy.py [--images 512] [--iterations 300] [--epochs 40] [--seeds 0 1]
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import time

import torch

import zsqfast
from zsqfast.data import data_dir, load_cifar10_test
from zsqfast.finetune.trainer import evaluate


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=512)
    ap.add_argument("--iterations", type=int, default=300)
    ap.add_argument("--batch-size", type=int, default=256)
    ap.add_argument("--epochs", type=int, default=40)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    ap.add_argument("--bits", type=int, default=4)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "bf16_acc"))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if not (data_dir() / "cifar10" / "resnet20_cifar10.pt").exists():
        raise SystemExit(f"needs the pretrained CIFAR ResNet-20 and test images under {data_dir()} (ZSQFAST_DATA)")
    fp = zsqfast.models.load_cifar_resnet(20).eval()
    test_x, test_y = load_cifar10_test()
    rows = []
    for seed in args.seeds:
        for precision in ("fp32", "bf16"):
            run = os.path.join(args.out, f"{precision}_seed{seed}")
            res_path = os.path.join(run, "result.json")
            if os.path.exists(res_path):
                with open(res_path) as f:
                    rows.append(json.load(f))
                continue
            t0 = time.perf_counter()
            data = zsqfast.synthesize(fp, args.images, iterations=args.iterations, seed=seed, precision=precision,
                                      batch_size=args.batch_size,
                                      out=os.path.join(run, "synth"), progress=False)
            t_path = os.path.join(run, "synth_seconds.txt")  # summed over interrupted and resumed calls
            t_synth = time.perf_counter() - t0 + (float(open(t_path).read()) if os.path.exists(t_path) else 0.0)
            with open(t_path, "w") as f:
                f.write(str(t_synth))
            fp.requires_grad_(True)  # finetune() froze the teacher's parameters; the student copy must train
            q = zsqfast.quantize_model(fp, args.bits, args.bits)
            rtn_model = zsqfast.calibrate(copy.deepcopy(q), data.images[:1024].split(256), freeze=True)
            rtn = evaluate(rtn_model, test_x, test_y)
            hist = zsqfast.finetune(fp, q, data, method="kd", epochs=args.epochs, lambda_ce=0.5, seed=seed,
                                    out=os.path.join(run, "ft"), progress=False)
            row = dict(precision=precision, seed=seed, synth_s=round(t_synth, 1),
                       final_loss=round(sum(data.meta["final_losses"]) / len(data.meta["final_losses"]), 4),
                       rtn_acc=round(rtn, 2), ft_acc=round(evaluate(q, test_x, test_y), 2))
            with open(res_path, "w") as f:
                json.dump(row, f)
            rows.append(row)
            print(row, flush=True)
    print(f"CIFAR ResNet-20 W{args.bits}A{args.bits}, {args.images} images x {args.iterations} iterations "
          f"(batch {args.batch_size}), "
          f"KD {args.epochs} epochs; accuracy on {len(test_y)} real test images "
          f"(FP32 {evaluate(fp, test_x, test_y):.2f} %)")
    print(f"{'precision':9s} {'seed':>4s} {'synth s':>8s} {'final loss':>10s} {'RTN %':>6s} {'KD %':>6s}")
    for r in rows:
        print(f"{r['precision']:9s} {r['seed']:4d} {r['synth_s']:8.1f} {r['final_loss']:10.4f} {r['rtn_acc']:6.2f} "
              f"{r['ft_acc']:6.2f}")
    for precision in ("fp32", "bf16"):
        acc = [r["ft_acc"] for r in rows if r["precision"] == precision]
        if acc:
            print(f"{precision}: KD accuracy mean {sum(acc) / len(acc):.2f} %, range {min(acc):.2f}-{max(acc):.2f}")


if __name__ == "__main__":
    main()
