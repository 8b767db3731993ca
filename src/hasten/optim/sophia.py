"""SophiaG: a clipped, diagonal second-order optimizer (Liu et al. 2023, "Sophia: A Scalable
Stochastic Second-order Optimizer for Language Model Pre-training", Algorithm 3).

Per parameter, with gradient g, momentum m, Hessian-diagonal estimate h, batch size B:

    every k steps (the caller's job, see `update_hessian`):
        ŷ ~ softmax(model's logits)                   # labels sampled from the model itself
        ĝ = ∇ mean_b CE(logits_b, ŷ_b)                # one extra forward/backward
        h = beta2 * h + (1 - beta2) * B * ĝ ⊙ ĝ       # Gauss-Newton-Bartlett estimate, averaged
    every step:
        θ = θ - lr * wd * θ                           # decoupled weight decay
        m = beta1 * m + (1 - beta1) * g
        θ = θ - lr * clip(m / max(rho * h, eps), 1)    # clip(·, 1) to [-1, 1], per coordinate

Where the curvature is small or unknown (h = 0 before the first refresh) the clip makes the step
sign-momentum of size lr; where it is large the step is the Newton-like m / (rho * h).

The paper's h starts at 0 and is not bias-corrected: after n refreshes it holds 1 - beta2^n of its
long-run weight (a third after 40 refreshes at beta2 0.99), so early on the curvature is
underestimated and more coordinates take the clipped sign step. `bias_correction=True` divides h
by 1 - beta2^n, as Adam does its moments (not in the paper; for runs of a few thousand steps). The
official implementation keeps the EMA of ĝ⊙ĝ and multiplies by B in the step; holding B inside
the estimate, as the paper writes it, is the same update and lets `step()` take no arguments.

Use on its own:

    opt = SophiaG(model.parameters(), lr=2e-4, rho=0.04, weight_decay=0.1)
    for step, (x, y) in enumerate(batches):
        F.cross_entropy(model(x), y).backward(); opt.step(); opt.zero_grad()
        if opt.needs_hessian(step):                 # every k steps
            sampled_label_loss(model(x)).backward()  # flatten logits to (N, V) first
            opt.update_hessian(batch_size=N); opt.zero_grad()

`hasten.train` does the refresh itself through the same two calls (see `hasten.optim.hooks`).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
import torch.nn.functional as F

from hasten.optim.hooks import closure_loss


def sampled_label_loss(logits_NV: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy of `logits_NV` against labels drawn from softmax(logits_NV).

    Its gradient ĝ gives the Gauss-Newton-Bartlett estimate B·ĝ⊙ĝ of the Hessian diagonal of the
    cross-entropy loss: for labels drawn from the model, E[ĝĝᵀ]·B approximates the Gauss-Newton
    matrix, which needs no second derivative.
    """
    with torch.no_grad():
        labels_N = torch.multinomial(torch.softmax(logits_NV.float(), dim=-1), 1).squeeze(-1)
    return F.cross_entropy(logits_NV, labels_N)


def _local(t: torch.Tensor) -> torch.Tensor:
    """This process's shard of a (possibly FSDP-sharded) state tensor."""
    return t.to_local() if hasattr(t, "to_local") else t


def _rho_scale(group: dict[str, Any], state: dict[str, torch.Tensor]) -> float:
    """What h is multiplied by in the clip's denominator: rho, divided by 1 - beta2^n after n
    refreshes when the group corrects the bias (as Adam corrects its moments)."""
    if not group["bias_correction"]:
        return group["rho"]
    n = int(state["hessian_updates"])  # a CPU tensor (`_state`): no device sync
    return group["rho"] / (1.0 - group["betas"][1] ** n) if n else group["rho"]


class SophiaG(torch.optim.Optimizer):
    """SophiaG with decoupled weight decay. Defaults are the paper's GPT-2 settings."""

    def __init__(self, params: Iterable[Any], lr: float = 1e-4, betas: tuple[float, float] = (0.965, 0.99),
                 rho: float = 0.04, weight_decay: float = 0.1, eps: float = 1e-15,
                 hessian_every: int = 10, bias_correction: bool = False) -> None:
        if lr < 0 or weight_decay < 0 or rho <= 0 or eps <= 0 or hessian_every < 1 \
                or not all(0.0 <= b < 1.0 for b in betas):
            raise ValueError(f"SophiaG needs lr >= 0, weight_decay >= 0, rho > 0, eps > 0, hessian_every >= 1 and "
                             f"betas in [0, 1); got {lr}, {weight_decay}, {rho}, {eps}, {hessian_every}, {betas}")
        super().__init__(params, dict(lr=lr, betas=betas, rho=rho, weight_decay=weight_decay, eps=eps,
                                      bias_correction=bias_correction))
        self.hessian_every = hessian_every

    def _state(self, p: torch.Tensor) -> dict[str, torch.Tensor]:
        state = self.state[p]
        if "exp_avg" not in state:
            state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            state["hessian"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        if "hessian_updates" not in state:  # also for states saved before it was counted
            state["hessian_updates"] = torch.tensor(0.0)  # on the CPU, like Adam's step count
        elif state["hessian_updates"].device.type != "cpu":  # load_state_dict moves it to the parameter's device
            state["hessian_updates"] = state["hessian_updates"].cpu()
        return state

    @torch.no_grad()
    def metrics(self) -> dict[str, torch.Tensor]:
        """`sophia_unclipped`: the fraction of coordinates whose step is not clipped, |m| < rho * h
        (h bias-corrected when the step corrects it), the Newton-like part; the rest take the sign
        step of size lr. The authors' GPT-2 training script logs the same fraction as
        `train/win_rate`. A larger rho raises it. Over this process's shard when the state is sharded."""
        unclipped, total = None, 0  # a device-side count: one host sync at the end, not one per tensor
        for group in self.param_groups:
            for p in group["params"]:
                state = self.state.get(p, {})
                if "exp_avg" not in state:
                    continue
                moment, hessian = (_local(state[k]) for k in ("exp_avg", "hessian"))
                count = (moment.abs() < (hessian * _rho_scale(group, state)).clamp_min(group["eps"])).sum()
                unclipped = count if unclipped is None else unclipped + count
                total += moment.numel()
        return {"sophia_unclipped": unclipped.double().cpu() / total} if total else {}

    def needs_hessian(self, step: int) -> bool:
        """Whether the Hessian estimate is due after optimizer step `step` (0-based): every k-th."""
        return step % self.hessian_every == self.hessian_every - 1

    @torch.no_grad()
    def update_hessian(self, batch_size: int, grad_scale: float = 1.0) -> None:
        """Fold the gradients now in `.grad` into the Hessian estimate: h ← β2·h + (1-β2)·B·ĝ⊙ĝ.

        Call it after backpropagating `sampled_label_loss` (a mean over `batch_size` sampled labels),
        with `grad_scale` the loss scale if that loss was scaled (fp16). Coordinates whose gradient
        is not finite keep their old estimate, so one overflow does not poison the average.
        """
        for group in self.param_groups:
            beta2 = group["betas"][1]
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self._state(p)
                hessian = state["hessian"]
                grad = p.grad if grad_scale == 1.0 else p.grad / grad_scale
                new = hessian * beta2 + (grad * grad) * ((1.0 - beta2) * batch_size)
                hessian.copy_(torch.where(torch.isfinite(new), new, hessian))
                state["hessian_updates"] += 1

    @torch.no_grad()
    def step(self, closure: Any = None) -> Any:
        loss = closure_loss(closure)
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if not params:
                continue
            states = [self._state(p) for p in params]
            moments, hessians = [s["exp_avg"] for s in states], [s["hessian"] for s in states]
            lr, wd, eps, beta1 = group["lr"], group["weight_decay"], group["eps"], group["betas"][0]
            if wd:
                torch._foreach_mul_(params, 1.0 - lr * wd)
            torch._foreach_lerp_(moments, [p.grad for p in params], 1.0 - beta1)
            denominators = torch._foreach_mul(hessians, [_rho_scale(group, s) for s in states])
            torch._foreach_clamp_min_(denominators, eps)
            ratios = torch._foreach_div(moments, denominators)
            torch._foreach_clamp_min_(ratios, -1.0)
            torch._foreach_clamp_max_(ratios, 1.0)
            torch._foreach_add_(params, ratios, alpha=-lr)
        return loss
