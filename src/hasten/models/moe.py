"""Mixture-of-experts feed-forward: a token-choice top-k router over SwiGLU experts.

Each token is sent to its top_k experts (scores from a softmax, or sigmoids as in DeepSeek-V3) and
gets their outputs summed with the router's weights. Dispatch is dropless by default: tokens are
sorted by expert into one buffer and the experts run as grouped GEMMs (`torch._grouped_mm` on a
CUDA GPU in bf16; one matmul per expert group elsewhere). A per-expert loop is the reference path.
With a capacity factor, each expert keeps at most capacity_factor * balanced-load assignments,
first choices before second choices, and the rest are dropped (their contribution is zero; the
residual connection carries the token) and counted.

Two auxiliary losses keep the router healthy, pure functions here, recorded by each layer in
training forwards and summed into the training loss by `auxiliary_losses`:
  load balancing (Switch Transformer, Fedus et al. 2021): E * sum_e f_e * P_e, 1.0 when balanced;
  router z-loss (ST-MoE, Zoph et al. 2022): mean of logsumexp(logits)^2, keeps logits small.

Shape legend:
    N tokens (B*T flattened), D model width, F expert hidden width, E experts, K top_k, R buffer rows.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from hasten.models.layers import SwiGLU
from hasten.models.ops.grouped_gemm import (GROUP_ALIGN, expert_swiglu, expert_swiglu_ref,
                                            grouped_mm_available)


def load_balancing_loss(router_probs_NE: torch.Tensor, expert_mask_NE: torch.Tensor) -> torch.Tensor:
    """Switch load-balancing loss E * sum_e f_e * P_e: f_e the fraction of routed assignments that
    went to expert e (expert_mask_NE holds one 1 per chosen expert), P_e its mean router probability.
    Equals 1 when both are uniform; minimized by spreading tokens evenly."""
    num_experts = router_probs_NE.shape[-1]
    mask = expert_mask_NE.float()
    fraction_E = mask.sum(0) / mask.sum().clamp(min=1)
    return num_experts * (fraction_E * router_probs_NE.float().mean(0)).sum()


def router_z_loss(logits_NE: torch.Tensor) -> torch.Tensor:
    """ST-MoE router z-loss: mean over tokens of logsumexp(logits)^2."""
    return torch.logsumexp(logits_NE.float(), dim=-1).pow(2).mean()


def top_k_of(scores_NE: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(values, indices) of each row's k largest scores, largest first, as `torch.topk`. For k <= 2
    as max reductions (the second after masking the first), which torch.compile fuses with the
    softmax around them; `topk` is a separate sorting kernel per layer on the GPU."""
    if k > 2:
        return scores_NE.topk(k, dim=-1)
    first_N, first_idx_N = scores_NE.max(dim=-1)
    if k == 1:
        return first_N[:, None], first_idx_N[:, None]
    rest_NE = scores_NE.scatter(1, first_idx_N[:, None], float("-inf"))
    second_N, second_idx_N = rest_NE.max(dim=-1)
    return torch.stack([first_N, second_N], dim=1), torch.stack([first_idx_N, second_idx_N], dim=1)


def route(logits_NE: torch.Tensor, top_k: int, router: str = "softmax"
          ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(weights_NK, experts_NK, probs_NE). Softmax: top-k of the softmax, renormalized over the k
    chosen when k > 1 (Mixtral; with k = 1 the raw probability keeps the router's gradient, as in
    Switch). Sigmoid: independent scores, the chosen ones normalized to sum to 1 (DeepSeek-V3)."""
    logits_NE = logits_NE.float()
    if router == "softmax":
        probs_NE = logits_NE.softmax(dim=-1)
        weights_NK, experts_NK = top_k_of(probs_NE, top_k)
        if top_k > 1:
            weights_NK = weights_NK / weights_NK.sum(-1, keepdim=True)
    elif router == "sigmoid":
        scores_NE = logits_NE.sigmoid()
        weights_NK, experts_NK = top_k_of(scores_NE, top_k)
        weights_NK = weights_NK / weights_NK.sum(-1, keepdim=True)
        probs_NE = scores_NE / scores_NE.sum(-1, keepdim=True)
    else:
        raise ValueError(f"router={router!r} is not supported; use softmax or sigmoid")
    return weights_NK, experts_NK, probs_NE


def expert_capacity(num_tokens: int, top_k: int, num_experts: int, capacity_factor: float) -> int:
    """Assignments one expert may take: capacity_factor times the balanced load (0 = unlimited)."""
    if capacity_factor <= 0:
        return num_tokens * top_k
    return max(1, math.ceil(capacity_factor * num_tokens * top_k / num_experts))


def expert_counts(flat_A: torch.Tensor, num_experts: int) -> torch.Tensor:
    """Assignments per expert. A scatter-add into a fixed-size vector: `torch.bincount`'s output
    size depends on the data, which breaks torch.compile's graph at every MoE layer."""
    counts_E = torch.zeros(num_experts, dtype=flat_A.dtype, device=flat_A.device)
    return counts_E.scatter_add_(0, flat_A, torch.ones_like(flat_A))


def dispatch_plan(experts_NK: torch.Tensor, num_experts: int, capacity: int
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, int]:
    """Where each assignment goes in the expert-sorted buffer, without a host sync.

    Assignments are ordered choice-major (every token's first choice before any second choice) so
    that with a capacity, first choices win. Returns (dest_A, keep_A, offs_E, counts_E, rows) for
    the A = K*N assignments in that order: buffer row, kept flag, int32 group ends (each group
    padded to GROUP_ALIGN rows), all assignments per expert, and the buffer's static row count.
    Dropped assignments point at the last row, which lies past every group.
    """
    flat_A = experts_NK.t().reshape(-1)
    A = flat_A.numel()
    order_A = torch.argsort(flat_A, stable=True)
    counts_E = expert_counts(flat_A, num_experts)
    first_E = counts_E.cumsum(0) - counts_E
    pos_A = torch.empty_like(flat_A)
    pos_A[order_A] = torch.arange(A, device=flat_A.device) - first_E[flat_A[order_A]]
    keep_A = pos_A < capacity
    kept_E = counts_E.clamp(max=capacity)
    padded_E = (kept_E + GROUP_ALIGN - 1) // GROUP_ALIGN * GROUP_ALIGN
    ends_E = padded_E.cumsum(0)
    rows = min(A, capacity * num_experts) + num_experts * (GROUP_ALIGN - 1) + 1  # + 1 trash row
    dest_A = torch.where(keep_A, ends_E[flat_A] - padded_E[flat_A] + pos_A, rows - 1)
    return dest_A, keep_A, ends_E.to(torch.int32), counts_E, rows


class MoE(nn.Module):
    """Top-k routed SwiGLU experts, optionally plus one shared expert every token uses.

    impl: 'grouped' (sorted dispatch, grouped GEMM where available) or 'loop' (reference: one
    masked pass per expert). routed_scale multiplies the routed experts' weighted sum (DeepSeek-V2's
    routed scaling factor): top-k weights renormalized to 1 average k experts of 1/k the dense
    width where a dense SwiGLU adds its halves, so 2 for top-2 restores the dense output scale.
    After a forward, `tokens_per_expert` holds the routed load; after a
    training forward, `aux_losses` holds {name: (weight, value)} and `aux_metrics` the dropped
    fraction and the busiest expert's load over the mean (1.0 = balanced).
    """

    def __init__(self, dim: int, hidden_dim: int, num_experts: int = 8, top_k: int = 2, router: str = "softmax",
                 shared_expert: bool = False, capacity_factor: float = 0.0, aux_weight: float = 0.01,
                 z_weight: float = 0.001, init_std: float = 0.02, out_init_std: float | None = None,
                 impl: str = "grouped", routed_scale: float = 1.0) -> None:
        super().__init__()
        if not 0 < top_k <= num_experts:
            raise ValueError(f"top_k={top_k} must be in [1, num_experts={num_experts}]")
        if impl not in ("grouped", "loop"):
            raise ValueError(f"impl={impl!r} is not supported; use grouped or loop")
        self.num_experts, self.top_k, self.router_kind, self.impl = num_experts, top_k, router, impl
        self.capacity_factor, self.aux_weight, self.z_weight = capacity_factor, aux_weight, z_weight
        self.routed_scale = routed_scale
        self.init_std, self.out_init_std = init_std, out_init_std if out_init_std is not None else init_std
        self.router = nn.Linear(dim, num_experts, bias=False)
        self.w1 = nn.Parameter(torch.empty(num_experts, hidden_dim, dim))  # gate, Linear layout (out, in)
        self.w3 = nn.Parameter(torch.empty(num_experts, hidden_dim, dim))  # up
        self.w2 = nn.Parameter(torch.empty(num_experts, dim, hidden_dim))  # down, into the residual stream
        self.shared = SwiGLU(dim, hidden_dim) if shared_expert else None
        self.aux_losses: dict[str, tuple[float, torch.Tensor]] = {}
        self.aux_metrics: dict[str, torch.Tensor] = {}
        self.tokens_per_expert: torch.Tensor | None = None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """The expert weights (the router and shared expert are Linears, initialized as such)."""
        nn.init.normal_(self.w1, 0.0, self.init_std)
        nn.init.normal_(self.w3, 0.0, self.init_std)
        nn.init.normal_(self.w2, 0.0, self.out_init_std)

    def inactive_params(self) -> int:
        """Expert weights a token does not use: (num_experts - top_k) experts' worth."""
        return (self.num_experts - self.top_k) * (self.w1[0].numel() + self.w3[0].numel() + self.w2[0].numel())

    def forward(self, x_BTD: torch.Tensor) -> torch.Tensor:
        B, T, D = x_BTD.shape
        x_ND = x_BTD.reshape(B * T, D)
        with torch.autocast(x_ND.device.type, enabled=False):  # the router in fp32 (ST-MoE)
            logits_NE = F.linear(x_ND.float(), self.router.weight.float())
        weights_NK, experts_NK, probs_NE = route(logits_NE, self.top_k, self.router_kind)
        capacity = expert_capacity(B * T, self.top_k, self.num_experts, self.capacity_factor)
        run = self._grouped if self.impl == "grouped" else self._loop
        y_ND, counts_E, dropped = run(x_ND, weights_NK, experts_NK, capacity)
        if self.routed_scale != 1.0:
            y_ND = y_ND * self.routed_scale
        if self.shared is not None:
            y_ND = y_ND + self.shared(x_ND)
        self._record(logits_NE, probs_NE, experts_NK, counts_E, dropped)
        return y_ND.view(B, T, D).to(x_BTD.dtype)

    def _grouped(self, x_ND: torch.Tensor, weights_NK: torch.Tensor, experts_NK: torch.Tensor, capacity: int
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        N, D = x_ND.shape
        dest_A, keep_A, offs_E, counts_E, rows = dispatch_plan(experts_NK, self.num_experts, capacity)
        dtype = torch.get_autocast_dtype(x_ND.device.type) if torch.is_autocast_enabled(x_ND.device.type) else x_ND.dtype
        x_AD = x_ND.to(dtype).repeat(self.top_k, 1)  # assignment a serves token a % N (choice-major)
        x_RD = x_AD.new_zeros(rows, D).index_copy(0, dest_A, x_AD)
        ffn = expert_swiglu if grouped_mm_available(x_RD) else expert_swiglu_ref
        y_RD = ffn(x_RD, offs_E, self.w1, self.w3, self.w2)
        # Mask before weighting: rows past the groups are uninitialized, and 0 * NaN would leak.
        y_AD = torch.where(keep_A[:, None], y_RD[dest_A], 0)
        y_AD = y_AD * weights_NK.t().reshape(-1, 1)
        return y_AD.view(self.top_k, N, D).sum(0), counts_E, (~keep_A).sum()

    def _loop(self, x_ND: torch.Tensor, weights_NK: torch.Tensor, experts_NK: torch.Tensor, capacity: int
              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        N, D = x_ND.shape
        flat_A, weight_A = experts_NK.t().reshape(-1), weights_NK.t().reshape(-1)
        token_A = torch.arange(N, device=x_ND.device).repeat(self.top_k)
        y_ND = torch.zeros(N, D, device=x_ND.device, dtype=torch.float32)
        kept = 0
        for e in range(self.num_experts):
            idx = (flat_A == e).nonzero().squeeze(1)[:capacity]  # choice-major order: first choices first
            kept += idx.numel()
            x = x_ND[token_A[idx]]
            h = F.silu(F.linear(x, self.w1[e])) * F.linear(x, self.w3[e])
            y_ND = y_ND.index_add(0, token_A[idx], F.linear(h, self.w2[e]) * weight_A[idx, None])
        counts_E = expert_counts(flat_A, self.num_experts)
        return y_ND, counts_E, torch.tensor(flat_A.numel() - kept, device=x_ND.device)

    def _record(self, logits_NE: torch.Tensor, probs_NE: torch.Tensor, experts_NK: torch.Tensor,
                counts_E: torch.Tensor, dropped: torch.Tensor) -> None:
        self.tokens_per_expert = counts_E.detach()
        if not self.training:
            self.aux_losses, self.aux_metrics = {}, {}
            return
        mask_NE = torch.zeros_like(probs_NE).scatter_(1, experts_NK, 1.0)
        self.aux_losses = {"moe_balance": (self.aux_weight, load_balancing_loss(probs_NE, mask_NE)),
                           "moe_z": (self.z_weight, router_z_loss(logits_NE))}
        counts = counts_E.detach().float()
        self.aux_metrics = {"moe_dropped": dropped.float() / counts.sum(),
                            "moe_max_load": counts.max() / counts.mean()}


def auxiliary_losses(model: nn.Module) -> tuple[torch.Tensor | None, dict[str, torch.Tensor]]:
    """The weighted sum of the auxiliary losses that layers recorded in their last training forward
    (None when there are none), and each term and metric averaged over those layers, detached, for
    logging. Layers opt in by holding `aux_losses` {name: (weight, value)} and `aux_metrics`."""
    total: torch.Tensor | None = None
    sums: dict[str, torch.Tensor] = {}
    counts: dict[str, int] = {}
    for module in model.modules():
        for name, (weight, value) in getattr(module, "aux_losses", {}).items():
            total = weight * value if total is None else total + weight * value
            sums[name] = sums.get(name, 0) + value.detach()
            counts[name] = counts.get(name, 0) + 1
        for name, value in getattr(module, "aux_metrics", {}).items():
            sums[name] = sums.get(name, 0) + value.detach()
            counts[name] = counts.get(name, 0) + 1
    return total, {name: value / counts[name] for name, value in sums.items()}
