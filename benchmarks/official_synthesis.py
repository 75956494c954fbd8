"""A faithful re-implementation of the official HAST / SynQ synthesis iteration (the anchor of bench_synthesis).

What the official ``DistillData.get_distil_data`` loop (SynQ src/distill_data.py, from HAST) does every
iteration, kept as is (only ``.cuda()`` dropped so that it runs on the model's device):

* forward hooks on every BatchNorm2d append ``input.mean([0, 2, 3])``, ``input.var([0, 2, 3], unbiased=False)``
  and the module's running statistics to Python lists (cleared each iteration);
* the input batch is rebuilt image by image: ``torch.stack([x_j for x_j in x])`` for CIFAR, and for
  224-px inputs with probability 0.5 ``torch.stack([RandomHorizontalFlip(RandomResizedCrop(x_j))])``
  (torchvision transforms, scale (0.4, 1));
* ``d_acc = mean(argmax(output.data.cpu().numpy()) == gt)`` (a device-to-host copy of the logits);
* ``p = softmax(output)[one_hot_mask]``; ``loss_target = beta * ((1 - p)^gamma * CE).mean()``;
* per layer ``mse_loss(mean.cpu(), running_mean.detach().cpu())`` (+ the variance): host copies of the BN
  statistics (``host_copies=False`` keeps them on the device), accumulated into ``torch.zeros(1)`` tensors,
  divided by the layer count;
* ``zero_grad``, ``backward`` — through a model whose parameters still require gradients, so every weight
  gradient is computed and accumulated although only the images are optimised —, Adam step,
  ``scheduler.step(total_loss.item())``.
"""
from __future__ import annotations

import random

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F


class OfficialLoop:
    """``step()`` = one official iteration on a fixed batch (model in eval mode, parameters left trainable)."""

    def __init__(self, model: nn.Module, batch: int, size: int, num_classes: int, *, host_copies: bool = True,
                 seed: int = 0):
        from torchvision import transforms

        self.model, self.host_copies, self.small = model.eval(), host_copies, size <= 64
        self.mean_list, self.var_list, self.rm, self.rv = [], [], [], []
        self.handles = [m.register_forward_hook(self._hook) for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
        torch.manual_seed(seed)
        random.seed(seed)
        dev = next(model.parameters()).device
        self.x = torch.randn(batch, 3, size, size, device=dev).requires_grad_(True)
        self.labels = torch.randint(0, num_classes, (batch,), device=dev)
        self.gt = self.labels.cpu().numpy()
        self.opt = torch.optim.Adam([self.x], lr=0.5)
        self.sched = torch.optim.lr_scheduler.ReduceLROnPlateau(self.opt, min_lr=1e-4, patience=50)
        self.beta, self.gamma = (10.0, 2.0) if self.small else (0.1, 0.5)
        self.rrc = transforms.RandomResizedCrop(size=size, scale=(0.4, 1.0))
        self.rhf = transforms.RandomHorizontalFlip()

    def _hook(self, module, inputs, _output):
        x = inputs[0]
        self.mean_list.append(x.mean([0, 2, 3]))
        self.var_list.append(x.var([0, 2, 3], unbiased=False))
        self.rm.append(module.running_mean)
        self.rv.append(module.running_var)

    def step(self) -> float:
        x = self.x
        if self.small or random.random() >= 0.5:
            new = torch.stack([xj for xj in x])
        else:
            new = torch.stack([self.rhf(self.rrc(xj)) for xj in x])
        for lst in (self.mean_list, self.var_list, self.rm, self.rv):
            lst.clear()
        output = self.model(new)
        self.d_acc = np.mean(np.argmax(output.data.cpu().numpy(), axis=1) == self.gt)
        a = F.softmax(output, dim=1)
        mask = torch.zeros_like(a).scatter_(1, self.labels.unsqueeze(1), 1.0)
        p = a[mask.bool()]
        loss_target = self.beta * ((1 - p).pow(self.gamma) * F.cross_entropy(output, self.labels,
                                                                            reduction="none")).mean()
        mean_loss = torch.zeros(1, device=x.device)
        var_loss = torch.zeros(1, device=x.device)
        host = (lambda t: t.cpu()) if self.host_copies else (lambda t: t)
        for n, m in enumerate(self.mean_list):
            mean_loss = mean_loss + F.mse_loss(host(m), host(self.rm[n].detach())).to(x.device)
            var_loss = var_loss + F.mse_loss(host(self.var_list[n]), host(self.rv[n].detach())).to(x.device)
        mean_loss = mean_loss / len(self.mean_list)
        var_loss = var_loss / len(self.mean_list)
        total = mean_loss + var_loss + loss_target
        self.opt.zero_grad()
        total.backward()
        self.opt.step()
        self.sched.step(total.item())
        return float(total)

    def close(self) -> None:
        for h in self.handles:
            h.remove()
        for p in self.model.parameters():
            p.grad = None
