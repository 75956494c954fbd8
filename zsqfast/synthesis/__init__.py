"""Synthetic-data generation for zero-shot quantization."""
from .bns_loss import BNSLoss
from .engine import SyntheticDataset, synthesize
from .filtering import FilterResult, filter_images

__all__ = ["BNSLoss", "FilterResult", "SyntheticDataset", "filter_images", "synthesize"]
