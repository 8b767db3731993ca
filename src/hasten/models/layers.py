"""Building blocks shared by every decoder: RMSNorm, rotary position embeddings, SwiGLU.

Shape legend:
    B batch, T sequence length, D model width (dim), H heads, d head size, F ffn hidden width.
    x_BTD  activations;  x_BHTd  per-head queries or keys;  cos_Td, sin_Td  RoPE tables.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from hasten.models.ops import projections


class RMSNorm(nn.Module):
    """Root-mean-square norm with a learned gain (no bias, no mean subtraction), as in Llama."""

    def __init__(self, dim: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.dim, self.eps = dim, eps
        self.weight = nn.Parameter(torch.ones(dim))

    def reset_parameters(self) -> None:
        nn.init.ones_(self.weight)

    def forward(self, x_BTD: torch.Tensor) -> torch.Tensor:
        # Under autocast the residual stream is fp32 by default (model.fp32_residual); with a bf16
        # stream, PyTorch's rms_norm still computes the statistics in fp32 (its opmath type).
        return F.rms_norm(x_BTD, (self.dim,), self.weight, self.eps)


def rope_tables(head_dim: int, max_seq_len: int, theta: float = 10000.0,
                device: torch.device | str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """fp32 (cos_Td, sin_Td) for positions 0..max_seq_len-1, in the rotate-half (HF Llama) layout.

    Frequency i (of head_dim/2) rotates the pair (x[i], x[i + head_dim/2]); the tables repeat the
    angles twice along the last axis so that apply_rope is two elementwise products.
    """
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, device=device, dtype=torch.float32) / head_dim))
    pos_T = torch.arange(max_seq_len, device=device, dtype=torch.float32)
    angles_Td = torch.outer(pos_T, inv_freq).repeat(1, 2)  # (T, d/2) -> (T, d): [a0..a_{d/2-1}, a0..]
    return angles_Td.cos(), angles_Td.sin()


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rope(x_BHTd: torch.Tensor, cos_Td: torch.Tensor, sin_Td: torch.Tensor) -> torch.Tensor:
    """Rotate queries or keys by their position. The tables must already be cut to x's T.

    Computed in fp32 (bf16 angles lose relative-position precision at long T); the result is cast
    back to x's dtype. torch.compile fuses the whole thing into one kernel.
    """
    x = x_BHTd.float()
    return (x * cos_Td + _rotate_half(x) * sin_Td).to(x_BHTd.dtype)


def fusable(*modules: nn.Module) -> bool:
    """Whether every module is exactly an nn.Linear, whose weight a fused matmul may take: not an
    adapter (peft), a quantized, fake-quantized or fp8 layer, or anything else with its own matmul."""
    return all(type(m) is nn.Linear for m in modules)


class SwiGLU(nn.Module):
    """Gated feed-forward: w2(silu(w1 x) * w3 x). Names follow Llama (w1 gate, w3 up, w2 down).

    With `fused` on CUDA (Triton), gate and up run as one matmul over [W1; W3] and one kernel makes
    silu(gate) * up from it (and, backward, both halves of its gradient): ops/projections.py."""

    def __init__(self, dim: int, hidden_dim: int, fused: bool = False) -> None:
        super().__init__()
        self.fused = fused
        self.w1 = nn.Linear(dim, hidden_dim, bias=False)
        self.w3 = nn.Linear(dim, hidden_dim, bias=False)
        self.w2 = nn.Linear(hidden_dim, dim, bias=False)

    def forward(self, x_BTD: torch.Tensor) -> torch.Tensor:
        if self.fused and x_BTD.is_cuda and projections.available() and fusable(self.w1, self.w3):
            w13 = torch.cat([self.w1.weight, self.w3.weight])
            if fusable(self.w2):
                return projections.swiglu_mlp(x_BTD, w13, self.w2.weight)
            return self.w2(projections.swiglu(projections.linear(x_BTD, w13)))
        return self.w2(F.silu(self.w1(x_BTD)) * self.w3(x_BTD))
