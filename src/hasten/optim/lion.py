"""Lion: EvoLved Sign Momentum (Chen et al. 2023, "Symbolic Discovery of Optimization Algorithms").

Per parameter, with gradient g, momentum m, learning rate lr and decoupled weight decay wd:

    c = beta1 * m + (1 - beta1) * g          # interpolate, then take the sign
    θ = θ - lr * (sign(c) + wd * θ)
    m = beta2 * m + (1 - beta2) * g          # momentum tracks the gradient more slowly

Every coordinate moves by exactly ±lr (plus decay), so the update has a larger norm than AdamW's:
the paper uses a learning rate 3-10x smaller and a weight decay 3-10x larger than AdamW's. One
state tensor per parameter (AdamW keeps two).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch

from hasten.optim.hooks import closure_loss


class Lion(torch.optim.Optimizer):
    """Lion with decoupled weight decay; `step` updates all parameters of a group with foreach ops."""

    def __init__(self, params: Iterable[Any], lr: float = 1e-4, betas: tuple[float, float] = (0.9, 0.99),
                 weight_decay: float = 0.0) -> None:
        if lr < 0 or weight_decay < 0 or not all(0.0 <= b < 1.0 for b in betas):
            raise ValueError(f"Lion needs lr >= 0, weight_decay >= 0, betas in [0, 1); got {lr}, {weight_decay}, {betas}")
        super().__init__(params, dict(lr=lr, betas=betas, weight_decay=weight_decay))

    @torch.no_grad()
    def step(self, closure: Any = None) -> Any:
        loss = closure_loss(closure)
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if not params:
                continue
            grads = [p.grad for p in params]
            for p in params:
                if "exp_avg" not in self.state[p]:
                    self.state[p]["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            moments = [self.state[p]["exp_avg"] for p in params]
            lr, wd = group["lr"], group["weight_decay"]
            beta1, beta2 = group["betas"]
            if wd:
                torch._foreach_mul_(params, 1.0 - lr * wd)
            signs = torch._foreach_lerp(moments, grads, 1.0 - beta1)  # beta1*m + (1-beta1)*g
            torch._foreach_sign_(signs)
            torch._foreach_add_(params, signs, alpha=-lr)
            torch._foreach_lerp_(moments, grads, 1.0 - beta2)
        return loss
