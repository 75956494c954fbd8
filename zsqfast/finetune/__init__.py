"""Fine-tuning a quantized model on synthetic data: KD baseline and SynQ (low-pass, CAM, selective CE)."""
from .gradcam import cam_alignment_loss, gradcam
from .losses import kd_loss, selective_ce
from .trainer import evaluate, finetune

__all__ = ["cam_alignment_loss", "evaluate", "finetune", "gradcam", "kd_loss", "selective_ce"]
