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
