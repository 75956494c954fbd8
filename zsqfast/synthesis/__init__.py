"""Synthetic-data generation for zero-shot quantization."""
from .bns_loss import BNSLoss
from .engine import SyntheticDataset, synthesize
from .filtering import FilterResult, filter_images
from .patch_entropy import PatchEntropy

__all__ = ["BNSLoss", "FilterResult", "PatchEntropy", "SyntheticDataset", "filter_images", "synthesize"]
