"""Awkward tensors shared by the op tests: odd sizes, non-contiguous views, channels-last, transposes."""
import torch


def awkward_inputs(dtype=torch.float32, seed=0):
    """``(name, tensor, axis)`` triples covering layouts and per-tensor / per-channel axes."""
    g = torch.Generator().manual_seed(seed)

    def r(*shape):
        return (torch.randn(*shape, generator=g) * 3).to(dtype)

    cl = r(6, 5, 7, 3).contiguous(memory_format=torch.channels_last)
    return [
        ("7x13x5x3/tensor", r(7, 13, 5, 3), None),
        ("7x13x5x3/axis1", r(7, 13, 5, 3), 1),
        ("7x13x5x3/axis0", r(7, 13, 5, 3), 0),
        ("7x13x5x3/axis-1", r(7, 13, 5, 3), -1),
        ("channels_last/axis1", cl, 1),
        ("channels_last/tensor", cl, None),
        ("transposed/axis0", r(33, 17).t(), 0),
        ("sliced/axis1", r(9, 12, 11)[:, ::2, 1:], 1),
        ("vector/tensor", r(1001), None),
        ("one/tensor", r(1), None),
        ("weight-like/axis0", r(40, 3, 3, 3), 0),
    ]


def with_ties(x: torch.Tensor, scale: torch.Tensor, axis) -> torch.Tensor:
    """Overwrite every third element with an exact rounding tie (k + 0.5) * scale."""
    shape = [1] * x.dim()
    if axis is not None:
        shape[axis] = -1
    s = scale.reshape(shape).to(torch.float64)
    k = torch.randint(-6, 6, x.shape).to(torch.float64)
    ties = ((k + 0.5) * s).to(x.dtype)
    keep = (torch.arange(x.numel()).reshape(x.shape) % 3) != 0
    return torch.where(keep, x, ties)


def tiny_bn_model(num_classes: int = 4, seed: int = 0):
    """A small eval-mode CNN with two BatchNorm2d layers whose running statistics are non-trivial."""
    import torch.nn as nn

    torch.manual_seed(seed)
    m = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 8, 3, stride=2),
                      nn.BatchNorm2d(8), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, num_classes))
    with torch.no_grad():
        for bn in (m[1], m[4]):
            bn.running_mean.uniform_(-0.3, 0.3)
            bn.running_var.uniform_(0.5, 1.5)
    return m.eval()


def tiny_vit(num_classes: int = 5, seed: int = 0, fused_attn: bool = True):
    """A 2-block timm ViT on 16x16 images (patch 4: 16 patches + the class token), random weights, eval mode."""
    import timm

    torch.manual_seed(seed)
    m = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=16, patch_size=4, depth=2,
                          embed_dim=24, num_heads=3, num_classes=num_classes)
    for blk in m.blocks:
        blk.attn.fused_attn = fused_attn
    return m.eval()
