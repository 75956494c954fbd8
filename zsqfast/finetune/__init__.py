"""Fine-tuning a quantized model on synthetic data (SynQ pieces)."""
from .gradcam import cam_alignment_loss, gradcam

__all__ = ["cam_alignment_loss", "gradcam"]
