"""A tiny BatchNorm CNN and a tiny fixed image set for the pipeline tests (also imported by _ddp_worker.py)."""
import torch
import torch.nn as nn


def tiny_model() -> nn.Module:
    """conv-BN-ReLU x2, global average pool, Linear(8 -> 4); deterministic weights and BN statistics."""
    torch.manual_seed(0)
    m = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1),
                      nn.BatchNorm2d(8), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 4))
    for bn in (m[1], m[4]):
        bn.running_mean.uniform_(-0.5, 0.5)
        bn.running_var.uniform_(0.5, 2.0)
    return m.eval()


def tiny_images(n: int = 32, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, 12, 12, generator=g), torch.randint(0, 4, (n,), generator=g)


# a quantize() synthesis budget for the multi-process tests: 4 batches, 2 per rank of 2
SYNTH_BUDGET = dict(num_images=32, synth_iterations=2, synth_batch_size=8)
