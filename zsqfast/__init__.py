"""zsqfast: fast kernels and algorithms for zero-shot quantization (ZSQ) of vision models.

Public API (see README.md):
    fake_quantize, minmax_qparams, lsq_fake_quantize      fused fake-quant ops (torch.library)
    zsqfast.nn: QuantConv2d, QuantLinear, QuantAct         drop-in quantized layers
    quantize_model                                         swap a model's layers (deep copy)
    zsqfast.models: cifar_resnet, ...                      model builders and data helpers
    get_backend / set_backend / use_backend / available_backends   backend control
"""
from . import _ext
from ._backend import active_backend, available_backends, get_backend, set_backend, use_backend
from .ops.fake_quantize import fake_quantize
from .ops.lowbit_conv2d import lowbit_conv2d
from .ops.lowbit_gemm import lowbit_linear
from .ops.lowbit_pack import LowbitWeight, pack_lowbit, unpack_lowbit
from .ops.lowpass import amplitude_spectrum, gaussian_lowpass
from .ops.lsq import lsq_fake_quantize
from .ops.qparams import minmax_qparams

_ext.load_error()  # load the compiled kernels now (warns once, never raises)
from . import _register_backends  # noqa: E402,F401  (cpp / triton / cuda implementations)
from . import models, nn  # noqa: E402
from .quantize_model import calibrate, quantization_report, quantize_model  # noqa: E402
from .convert import convert_to_integer, integer_report  # noqa: E402
from .integer_io import load_integer_model, save_integer_model  # noqa: E402
from .finetune import cam_alignment_loss, finetune, gradcam  # noqa: E402
from .synthesis import BNSLoss, SyntheticDataset, filter_images, synthesize  # noqa: E402
from .pipeline import QuantizeResult, load_quantized, quantize  # noqa: E402

__version__ = "0.1.0"
__all__ = ["pack_lowbit", "unpack_lowbit", "LowbitWeight", "lowbit_linear", "lowbit_conv2d", "cam_alignment_loss", "finetune", "gradcam", "amplitude_spectrum", "gaussian_lowpass", "BNSLoss", "SyntheticDataset", "filter_images", "synthesize", "fake_quantize", "lsq_fake_quantize", "minmax_qparams", "quantize_model", "calibrate",
           "quantization_report", "models", "nn", "active_backend", "available_backends", "get_backend", "set_backend",
           "use_backend", "cpu_isa"]
__all__ += ["QuantizeResult", "load_quantized", "quantize"]
__all__ += ["convert_to_integer", "integer_report", "save_integer_model", "load_integer_model"]


def cpu_isa() -> str:
    """The instruction set the C++ CPU kernels use on this machine (``avx512_vnni``, ``avx2``, ``scalar``)."""
    return _ext.cpu_isa()
