"""The pipeline subcommands of the ``zsqfast`` command line: quantize, synthesize, finetune, eval, export.

Models (``--model``): ``cifar_resnet20`` / ``cifar_resnet56`` (pretrained, from the data directory),
any timm classifier name (CNNs, ViT / DeiT / Swin), a torchvision classification model name or
``torchvision:<name>`` with ``--checkpoint PATH`` (a state_dict; nothing is downloaded; ``--model-kwargs``
for a checkpoint of a non-default architecture, e.g. ``'{"img_size": 384}'``), ``digits_cnn`` (the demo's
model) with ``--checkpoint``. Synthesis (``--synth-method auto``): HAST (BatchNorm statistics) for a model with
BatchNorm, PSAQ-ViT (patch-similarity entropy) for a vision transformer. Evaluation data (``--eval-data``): an .npz
with ``images`` uint8 (N, H, W, C) and ``labels`` (the layout of test_dev_5k.npz) or an image folder
``root/<class>/<image>``. Examples::

    zsqfast quantize --model cifar_resnet20 --w-bits 4 --a-bits 4 --out runs/r20_w4a4 \\
        --eval-data ../shared/data/cifar10/test_dev_5k.npz          # rerun the same line to resume
    zsqfast eval --quantized runs/r20_w4a4 --eval-data ../shared/data/cifar10/test_dev_5k.npz
    zsqfast quantize --model deit_tiny_patch16_224 --checkpoint deit_t.pth --w-bits 4 --a-bits 8 --out runs/deit
    torchrun --nproc_per_node 2 -m zsqfast.cli quantize ...          # data-parallel fine-tuning
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path


def _json_dict(text: str) -> dict:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise argparse.ArgumentTypeError(f"not valid JSON ({exc.msg}): {text!r}") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"expected a JSON object such as '{{\"img_size\": 32}}', got {text!r}")
    return value


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def _model_args(p: argparse.ArgumentParser, required: bool = True) -> None:
    p.add_argument("--model", required=required,
                   help="cifar_resnet20 | cifar_resnet56 | digits_cnn | a timm name | torchvision:<name>")
    p.add_argument("--checkpoint", default=None, help="state_dict file for --model (required except cifar_resnet*)")
    p.add_argument("--num-classes", type=int, default=None, help="classifier size when it differs from the default")
    p.add_argument("--model-kwargs", type=_json_dict, default=None, metavar="JSON",
                   help="builder arguments of a timm / torchvision model, e.g. '{\"img_size\": 384}'")
    p.add_argument("--data-dir", default=None, help="data directory (default $ZSQFAST_DATA or ../shared/data)")


def _bits_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--w-bits", type=int, required=True, help="weight bits, 2..8")
    p.add_argument("--a-bits", type=int, required=True, help="activation bits, 2..8")
    p.add_argument("--first-last-bits", type=int, default=None, help="weight bits of the first and last layer")


def _train_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--method", choices=("synq", "kd"), default="synq", help="fine-tuning method (default synq)")
    p.add_argument("--epochs", type=int, default=100, help="fine-tuning epochs (0: round-to-nearest only)")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--lr", type=float, default=None, help="fine-tuning learning rate (default 1e-5)")
    p.add_argument("--calib-batches", type=int, default=None, help="synthetic batches that set the ranges (4)")
    p.add_argument("--calib-method", choices=("mse", "minmax"), default=None,
                   help="activation ranges: least-error clipping (mse, default) or the official min/max EMA")
    p.add_argument("--act-ste", choices=("clipped", "identity"), default=None,
                   help="activation gradient while training: zero outside the range (clipped, default) or the "
                        "official codes' identity")


def _eval_args(p: argparse.ArgumentParser, required: bool = False) -> None:
    p.add_argument("--eval-data", required=required, default=None, help=".npz (images, labels) or image folder")
    p.add_argument("--eval-n", type=_positive_int, default=None, help="use the first N evaluation images")


def _out_arg(p: argparse.ArgumentParser, what: str) -> None:
    p.add_argument("--out", required=True, help=what)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quiet", action="store_true", help="no progress output")


def _check_bits(args) -> None:
    from .nn.quant_layers import resolve_bits

    resolve_bits(args.w_bits, "--w-bits", allow_float=False)
    resolve_bits(args.a_bits, "--a-bits", allow_float=False)
    if args.first_last_bits is not None:
        resolve_bits(args.first_last_bits, "--first-last-bits", allow_float=False)


def _model(args):
    from .models.loading import load_model

    return load_model(args.model, args.checkpoint, num_classes=args.num_classes, root=args.data_dir,
                      model_kwargs=args.model_kwargs)


def _spec(args) -> dict:
    ckpt = os.path.abspath(args.checkpoint) if args.checkpoint else None
    spec = {"name": args.model, "checkpoint": ckpt, "num_classes": args.num_classes}
    if args.model_kwargs:  # only when given: the configs of earlier runs stay valid
        spec["model_kwargs"] = args.model_kwargs
    return {"model_spec": spec}


def _eval_data(args, model):
    if not args.eval_data:
        return None
    from .evaldata import load_eval_data
    from .models.loading import input_config

    cfg = input_config(model)
    return load_eval_data(args.eval_data, cfg["input_size"], cfg["mean"], cfg["std"], args.eval_n)


def _ft_options(args) -> dict:
    return {k: v for k, v in (("lr", args.lr), ("calib_batches", args.calib_batches),
                              ("calib_method", args.calib_method), ("act_ste", args.act_ste)) if v is not None}


def _print_result(res, out: str) -> None:
    from . import distributed as zdist

    if zdist.rank() == 0:
        print(json.dumps({k: round(v, 3) if isinstance(v, float) else v for k, v in res.metrics.items()}, indent=1))
        print(f"artifacts in {out}/ (model.pt, rtn.pt, manifest.json, ...)")


def cmd_quantize(args) -> int:
    from . import distributed as zdist
    from .pipeline import quantize

    _check_bits(args)
    zdist.init_from_env()
    model = _model(args)
    res = quantize(model, args.w_bits, args.a_bits, method=args.method, num_images=args.num_images,
                   synth_iterations=args.synth_iterations, epochs=args.epochs, out=args.out, export=args.export,
                   seed=args.seed, synth_method=args.synth_method, batch_size=args.batch_size,
                   synth_batch_size=args.synth_batch_size, first_last_bits=args.first_last_bits,
                   data=args.data, eval_data=_eval_data(args, model), progress=not args.quiet,
                   finetune_options=_ft_options(args), extra_config=_spec(args))
    _print_result(res, args.out)
    return 0


def cmd_finetune(args) -> int:
    args.num_images = args.synth_iterations = args.synth_batch_size = 1
    args.synth_method, args.export = "hast", False
    if not Path(args.data, "index.json").exists():
        raise FileNotFoundError(f"--data {args.data}: no synthetic set there (no index.json); create one with "
                                "'zsqfast synthesize --out DIR'")
    return cmd_quantize(args)


def cmd_synthesize(args) -> int:
    from . import distributed as zdist
    from . import synthesize
    from .models.loading import input_config

    zdist.init_from_env()  # under torchrun the ranks split the batches (synthesize() does it)
    model = _model(args)
    ds = synthesize(model, args.num_images, method=args.method, batch_size=args.batch_size,
                    iterations=args.iterations, seed=args.seed, out=args.out, progress=not args.quiet,
                    input_shape=input_config(model)["input_size"])
    if zdist.rank() == 0:
        print(f"{len(ds)} synthetic images in {args.out}/ (final losses {min(ds.meta['final_losses']):.4g}.."
              f"{max(ds.meta['final_losses']):.4g})")
    return 0


def _quantized_path(arg: str | None) -> Path | None:
    """The model file of ``--quantized``: the file itself, or a quantize directory's model.pt (fine-tuned), else
    its rtn.pt (round-to-nearest: fine-tuning unfinished or ``--epochs 0``), said on stderr."""
    if arg is None:
        return None
    path = Path(arg)
    if path.is_dir():
        if (path / "model.pt").exists():
            return path / "model.pt"
        path = path / "rtn.pt"
        if path.exists():
            print(f"note: {arg} has no model.pt (fine-tuning unfinished, or --epochs 0): using rtn.pt, the "
                  "round-to-nearest model; rerun its quantize command to finish fine-tuning", file=sys.stderr)
    if not path.exists():
        raise FileNotFoundError(f"--quantized {arg}: no model.pt / rtn.pt there; pass the --out "
                                "directory of 'zsqfast quantize' or its model.pt")
    return path


def _label(path: Path, config: dict) -> str:
    """``W4A4 (synq)``, or ``W4A4 (round-to-nearest)`` for an rtn.pt."""
    what = "round-to-nearest" if path.name == "rtn.pt" else config["method"]
    return f"W{config['w_bits']}A{config['a_bits']} ({what})"


def _quantized(args):
    """(float model, quantized model or None, config, model file) from --model/--checkpoint and/or --quantized."""
    from .pipeline import load_quantized, read_payload

    path = _quantized_path(args.quantized)
    payload = None
    if args.model is None:
        if path is None:
            raise ValueError("pass --model (and --checkpoint), or --quantized DIR of a quantize run")
        payload = read_payload(path)
        spec = payload.get("config", {}).get("model_spec") if isinstance(payload, dict) else None
        if not spec:
            raise ValueError(f"{path} does not record its float model; pass --model (and --checkpoint)")
        args.model, args.checkpoint, args.num_classes = spec["name"], spec["checkpoint"], spec["num_classes"]
        args.model_kwargs = spec.get("model_kwargs")
    fp = _model(args)
    if path is None:
        return fp, None, None, None
    q, config = load_quantized(path, fp, payload=payload)  # the file is read once
    return fp, q, config, path


def cmd_eval(args) -> int:
    from .finetune.trainer import evaluate

    fp, q, config, path = _quantized(args)
    data = _eval_data(args, fp)
    if q is None:
        model, name = fp, f"{args.model} FP32"
    else:
        model, name = q, f"{args.model} {_label(path, config)}"
    acc = evaluate(model, *data, batch_size=args.batch_size)
    print(f"{name}: top-1 {acc:.2f} % on {len(data[1])} images of {args.eval_data}")
    return 0


def cmd_export(args) -> int:
    from .convert import convert_to_integer
    from .integer_io import save_integer_model

    _, q, config, path = _quantized(args)
    if q is None:
        raise ValueError("export needs --quantized DIR (the output of 'zsqfast quantize')")
    save_integer_model(convert_to_integer(q), Path(args.out))
    print(f"integer model of {path} ({_label(path, config)}) written to {args.out} (load it with "
          "zsqfast.load_integer_model(path, <fp model builder>))")
    return 0


def _synth_methods() -> list[str]:
    from .synthesis.recipes import METHODS

    return ["auto"] + sorted(METHODS)


def add_commands(sub) -> None:
    """Register the pipeline subcommands on the ``zsqfast`` parser's subparsers."""
    fmt = argparse.RawDescriptionHelpFormatter
    s = sub.add_parser("quantize", help="zero-shot quantization end to end (synthesize, calibrate, fine-tune)",
                       description="Synthesize images from the model, quantize + calibrate, fine-tune (KD or SynQ); "
                       "every stage resumable: rerun the same command after an interruption.", formatter_class=fmt)
    _model_args(s)
    _bits_args(s)
    _train_args(s)
    s.add_argument("--num-images", type=int, default=5120, help="synthetic images (default 5120)")
    s.add_argument("--synth-iterations", type=int, default=1000, help="synthesis iterations per batch (1000)")
    s.add_argument("--synth-batch-size", type=int, default=None, help="default 256; 32 for psaq-vit")
    s.add_argument("--synth-method", choices=_synth_methods(), default="auto",
                   help="auto (default): hast for a model with BatchNorm, psaq-vit for a vision transformer")
    s.add_argument("--data", default=None, help="reuse this synthetic set (a 'zsqfast synthesize' --out directory)")
    s.add_argument("--export", action="store_true", help="also write the integer model (integer_model.safetensors)")
    _eval_args(s)
    _out_arg(s, "output directory (artifacts, manifest; an existing run there is resumed)")
    s.set_defaults(fn=cmd_quantize)

    s = sub.add_parser("synthesize", help="synthesize a calibration / fine-tuning set from a model")
    _model_args(s)
    s.add_argument("--num-images", type=int, default=5120)
    s.add_argument("--iterations", type=int, default=1000)
    s.add_argument("--batch-size", type=int, default=None, help="default 256; 32 for psaq-vit")
    s.add_argument("--method", choices=_synth_methods(), default="auto",
                   help="auto (default): hast for a model with BatchNorm, psaq-vit for a vision transformer")
    _out_arg(s, "output directory of the shards (an existing run there is resumed)")
    s.set_defaults(fn=cmd_synthesize)

    s = sub.add_parser("finetune", help="quantize + fine-tune on an existing synthetic set")
    _model_args(s)
    _bits_args(s)
    _train_args(s)
    s.add_argument("--data", required=True, help="the synthetic set ('zsqfast synthesize' --out directory)")
    _eval_args(s)
    _out_arg(s, "output directory (an existing run there is resumed)")
    s.set_defaults(fn=cmd_finetune)

    s = sub.add_parser("eval", help="top-1 accuracy of a float or quantized model on real images")
    _model_args(s, required=False)
    s.add_argument("--quantized", default=None, help="a 'zsqfast quantize' --out directory or its model.pt")
    s.add_argument("--batch-size", type=int, default=500)
    _eval_args(s, required=True)
    s.set_defaults(fn=cmd_eval)

    s = sub.add_parser("export", help="convert a quantized model to integer inference and save it")
    _model_args(s, required=False)
    s.add_argument("--quantized", required=True, help="a 'zsqfast quantize' --out directory or its model.pt")
    s.add_argument("--out", required=True, help="output file for the integer model")
    s.set_defaults(fn=cmd_export)
