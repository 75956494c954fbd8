"""``zsqfast demo``: the whole zero-shot pipeline at W4A4 on a small pretrained model, with a picture report.

Model and real held-out images (:func:`zsqfast.demo._load`): the pretrained CIFAR-10 ResNet-20 and
test_dev_5k when the data directory has them, else a BatchNorm CNN trained here in seconds on scikit-learn's
bundled digits. Nothing is downloaded. Then, without touching a real image:

1. synthesize a small set from the FP32 model's BatchNorm statistics (HAST recipe, reduced budget);
2. round-to-nearest: quantize_model + calibrate the activation ranges on the synthetic images;
3. fine-tune twice on the same synthetic set: the KD baseline and SynQ;

and print FP32 / round-to-nearest / KD / SynQ top-1 on the real held-out images (never used for any choice),
plus kernel speed ratios. ``out/report.md`` embeds the PNG pictures of :mod:`zsqfast.report`.
"""
from __future__ import annotations

import time
from pathlib import Path

import torch

BUDGETS = {  # (synthetic images, synthesis iterations, fine-tuning epochs); batch 256 (quick: 64)
    "cifar": {"full": (256, 150, 20), "quick": (64, 8, 2)},
    "digits": {"full": (512, 300, 30), "quick": (128, 30, 3)},
}


def _speed_lines(batch_shape) -> list[str]:
    import zsqfast
    from zsqfast.demo import _kernel_speed
    from zsqfast.ops import lowpass

    lines = [_kernel_speed()]
    x = torch.randn(batch_shape)
    reps = []
    for fn in (lambda t: zsqfast.gaussian_lowpass(t, 80.0), lambda t: lowpass.reference(t, 80.0)):
        fn(x)
        t0 = time.perf_counter()
        for _ in range(10):
            fn(x)
        reps.append((time.perf_counter() - t0) / 10)
    shape = "x".join(map(str, batch_shape))
    lines.append(f"low-pass filter {shape} (d0 80): zsqfast {reps[0] * 1e3:.2f} ms vs the official FFT code "
                 f"{reps[1] * 1e3:.2f} ms ({reps[1] / reps[0]:.2g}x)")
    return lines


def _synthesis_time(seconds: float, synth, where: Path) -> str:
    """This invocation's synthesis time, marked when an earlier run in ``where`` had made (some of) the batches."""
    n, k = len(synth.meta["batches"]), len(synth.meta["computed"])
    if k == n:
        return f"synthesis {seconds:.1f} s"
    if k == 0:
        return f"synthesis {seconds:.1f} s (reused from an earlier run in {where})"
    return f"synthesis {seconds:.1f} s ({n - k} of {n} batches reused from an earlier run in {where})"


def _quantize_time(label: str, seconds: float, res) -> str:
    """This invocation's wall time of one quantize() call; a stage an earlier run left in ``res.out`` is marked
    as reused (with the fine-tuning time that earlier run measured)."""
    ft = res.metrics.get("finetune_time_s")
    if "finetune" in res.reused:
        then = f"; its fine-tuning took {ft:.1f} s then" if ft is not None else ""
        return f"{label} {seconds:.1f} s (reused from an earlier run in {res.out}{then})"
    notes = [f"fine-tuning {ft:.1f} s"] if ft is not None else []
    if "quantize" in res.reused:
        notes.append("round-to-nearest model reused from an earlier run")
    return f"{label} {seconds:.1f} s" + (f" ({'; '.join(notes)})" if notes else "")


def run_pipeline_demo(quick: bool = False, data: str | None = None, seed: int = 0, out: str = "zsqfast_demo",
                      w_bits: int = 4, a_bits: int = 4, progress: bool = True) -> dict:
    """Run the demo; returns ``{"rows": [(name, accuracy)], "report": path, "figures": [paths]}``."""
    import zsqfast
    from zsqfast import report
    from zsqfast.demo import _load
    from zsqfast.models.loading import input_config
    from zsqfast.pipeline import quantize

    torch.manual_seed(seed)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    name, model, _, x_test, y_test = _load(data, quick, seed)
    kind = "cifar" if "CIFAR" in name else "digits"
    n_img, iters, epochs = BUDGETS[kind]["quick" if quick else "full"]
    batch = 64 if quick else 256
    cfg = input_config(model)
    print(f"model: {name}; real held-out images: {len(y_test)}; zsqfast backend {zsqfast.active_backend()} "
          f"({zsqfast.cpu_isa()}), {torch.get_num_threads()} threads")
    print(f"zero-shot budget: {n_img} synthetic images x {iters} iterations, {epochs} fine-tuning epochs, "
          f"W{w_bits}A{a_bits}; output in {out}/")
    t0 = time.perf_counter()
    synth = zsqfast.synthesize(model, n_img, batch_size=min(batch, n_img), iterations=iters, seed=seed,
                               out=out / "synthetic", input_shape=cfg["input_size"], progress=progress)
    t_synth = time.perf_counter() - t0
    curve = (x_test[:500], y_test[:500])  # the per-epoch curve; the table uses every held-out image
    results, times = {}, [_synthesis_time(t_synth, synth, out / "synthetic")]
    for method, label in (("kd", "KD"), ("synq", "SynQ")):
        t1 = time.perf_counter()
        results[method] = quantize(model, w_bits, a_bits, method=method, epochs=epochs, batch_size=batch,
                                   data=out / "synthetic", out=out / method, seed=seed, eval_data=(x_test, y_test),
                                   curve_data=curve, progress=progress)
        times.append(_quantize_time(label, time.perf_counter() - t1, results[method]))
    m_kd, m_sq = results["kd"].metrics, results["synq"].metrics
    rows = [("FP32", m_kd["fp32_accuracy"]), (f"W{w_bits}A{a_bits} round-to-nearest", m_kd["rtn_accuracy"]),
            (f"W{w_bits}A{a_bits} KD", m_kd["final_accuracy"]), (f"W{w_bits}A{a_bits} SynQ", m_sq["final_accuracy"])]
    t_total = time.perf_counter() - t0
    print(f"\n{'model':28s} {'top-1 %':>8s}   (real held-out images; calibration and training on synthetic only)")
    for r in rows:
        print(f"{r[0]:28s} {r[1]:8.2f}")
    print(f"\nwall time of this run: {', '.join(times)}, total {t_total:.1f} s")
    speed = _speed_lines((batch,) + tuple(cfg["input_size"]))
    print("\n".join(speed))

    # pictures
    d0 = 80.0
    figs = []
    filtered = zsqfast.gaussian_lowpass(synth.images, d0)
    figs.append(("samples.png", report.samples_figure(out / "samples.png", synth.images, filtered, cfg["mean"],
                                                      cfg["std"], d0)))
    real = x_test[: len(synth.images)]
    spectra = {"real held-out images": zsqfast.amplitude_spectrum(real),
               "synthetic": zsqfast.amplitude_spectrum(synth.images),
               f"synthetic, low-pass d0={d0:g}": zsqfast.amplitude_spectrum(filtered),
               "synthetic, low-pass d0=20 (for comparison)":
                   zsqfast.amplitude_spectrum(zsqfast.gaussian_lowpass(synth.images, 20.0))}
    figs.append(("spectrum.png", report.spectrum_figure(out / "spectrum.png", spectra)))
    shown = x_test[:8]
    q = results["synq"].model
    figs.append(("gradcam.png", report.gradcam_figure(out / "gradcam.png", shown, zsqfast.gradcam(model, shown),
                                                      zsqfast.gradcam(q, shown), cfg["mean"], cfg["std"],
                                                      f"the W{w_bits}A{a_bits} SynQ model")))
    figs.append(("curves.png", report.curves_figure(out / "curves.png", {"KD": results["kd"].history,
                                                                         "SynQ": results["synq"].history})))
    lines = [f"Model: {name}. Machine: {torch.get_num_threads()} threads, zsqfast backend "
             f"{zsqfast.active_backend()} ({zsqfast.cpu_isa()}).", "",
             f"Zero-shot budget: {n_img} synthetic images x {iters} synthesis iterations (HAST recipe), "
             f"{epochs} fine-tuning epochs, batch {batch}. No real image is used for calibration or training; "
             f"accuracy is measured on {len(y_test)} real held-out images.", "",
             "| model | top-1 % |", "|---|---|"] + [f"| {n} | {a:.2f} |" for n, a in rows] + [
             "", f"Wall time of this run: {', '.join(times)} (total {t_total:.1f} s); KD and SynQ each: "
             "calibration, fine-tuning and evaluation.", "",
             "Kernel speed (single runs on a possibly shared machine):", ""] + [f"- {s}" for s in speed]
    path = report.write_markdown(out / "report.md", "zsqfast demo: zero-shot W%dA%d" % (w_bits, a_bits), lines, figs)
    print(f"\nreport: {path} ({len(figs)} pictures)")
    return {"rows": rows, "report": path, "figures": [out / f for f, _ in figs]}
