"""Synthetic-data generation for zero-shot quantization."""
from .bns_loss import BNSLoss

__all__ = ["BNSLoss"]
