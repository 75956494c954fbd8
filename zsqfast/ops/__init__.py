"""zsqfast ops: each module declares one ``torch.library`` op family with its reference semantics.

The submodules keep their names (``zsqfast.ops.fake_quantize`` is the module); the public functions are
re-exported from the top-level package.
"""
from . import bn_stats, fake_quantize, lowbit_conv2d, lowbit_gemm, lsq, qparams  # noqa: F401  (declares the ops)
