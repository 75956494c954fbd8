"""The fine-tuning losses of the GDFQ / HAST / SynQ lineage (official semantics, see zsq-semantics.md)."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float = 20.0,
            alpha: float = 20.0) -> torch.Tensor:
    """``KLDivLoss(batchmean)(log_softmax(s / T), softmax(t / T)) * alpha * T^2`` (official: T = alpha = 20,
    i.e. x8000; teacher detached)."""
    log_p = F.log_softmax(student_logits / temperature, dim=1)
    q = F.softmax(teacher_logits.detach() / temperature, dim=1)
    return F.kl_div(log_p, q, reduction="batchmean") * alpha * temperature * temperature


def selective_ce(student_logits: torch.Tensor, teacher_logits: torch.Tensor, labels: torch.Tensor,
                 tau: float = 0.5) -> tuple[torch.Tensor, torch.Tensor]:
    """SynQ's cross-entropy on easy samples only: sample i counts when ``(1 - p_y(teacher)) < tau`` (strict).

    As the official code, excluded samples get logits 0 and label 0 and the mean runs over the WHOLE batch:
    ``CE = (1/B) [sum_selected CE_i + (B - n_selected) log C]``, whose gradient is ``(1/B) sum_selected``.
    Returns ``(loss, selected mask)``.
    """
    with torch.no_grad():
        p_y = F.softmax(teacher_logits, dim=1).gather(1, labels[:, None]).squeeze(1)
        sel = (1.0 - p_y) < tau
    b, c = student_logits.shape
    ce = F.cross_entropy(student_logits, labels, reduction="none")
    loss = (torch.where(sel, ce, torch.zeros_like(ce)).sum() + (b - sel.sum()) * math.log(c)) / b
    return loss, sel


def channel_energy(feature: torch.Tensor) -> torch.Tensor:
    """HAST's per-sample channel descriptor: ``F.normalize(mean_hw(x^2))`` of a (B, C, H, W) feature, (B, C)."""
    return F.normalize(feature.pow(2).mean(dim=(2, 3)), dim=1)


def feature_alignment(student_feats, teacher_feats, weight: float = 1000.0) -> torch.Tensor:
    """HAST feature alignment ``weight * sum_l mean((c_s - c_t)^2)`` over paired (B, C, H, W) features,
    c = :func:`channel_energy` (teacher detached); official weight 1000."""
    if len(student_feats) != len(teacher_feats) or not student_feats:
        raise ValueError(f"feature alignment needs paired features, got {len(student_feats)} and {len(teacher_feats)}")
    total = sum(F.mse_loss(channel_energy(s), channel_energy(t.detach())) for s, t in zip(student_feats, teacher_feats))
    return total * weight


#: module classes whose outputs HAST aligns (residual units of the CIFAR ResNets, timm ResNets / MobileNets)
FEATURE_BLOCKS = ("BasicBlock", "Bottleneck", "InvertedResidual", "ResUnit")


def feature_layers(model: torch.nn.Module) -> list[str]:
    """Qualified names of the residual units of ``model`` (their outputs are the aligned features)."""
    names = [n for n, m in model.named_modules() if type(m).__name__ in FEATURE_BLOCKS]
    if not names:
        raise ValueError(f"{type(model).__name__} has no residual unit ({', '.join(FEATURE_BLOCKS)}); pass fa_layers")
    return names


class FeatureTap:
    """Forward hooks (registered once, removed by :meth:`close`) collecting the outputs of the named modules
    of a model during each forward: ``tap.take()`` returns them in order and clears the list."""

    def __init__(self, model: torch.nn.Module, names):
        self.feats: list[torch.Tensor] = []
        self.handles = [model.get_submodule(n).register_forward_hook(lambda m, i, o: self.feats.append(o))
                        for n in names]

    def take(self) -> list[torch.Tensor]:
        out, self.feats = self.feats, []
        return out

    def close(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles = []
