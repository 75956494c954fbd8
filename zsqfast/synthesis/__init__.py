"""Synthetic-data generation for zero-shot quantization."""
from .bns_loss import BNSLoss
from .engine import SyntheticDataset, synthesize

__all__ = ["BNSLoss", "SyntheticDataset", "synthesize"]
