"""Building blocks shared by every decoder: RMSNorm, rotary position embeddings, SwiGLU.

Shape legend:
    B batch, T sequence length, D model width (dim), H heads, d head size, F ffn hidden width.
    x_BTD  activations;  x_BHTd  per-head queries or keys;  cos_Td, sin_Td  RoPE tables.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


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


def _lora_adapter(module: nn.Module) -> str | None:
    """The one active adapter of a peft LoRA linear whose output is base(x) + B(A(x)) * scaling
    exactly: a plain nn.Linear base, adapters on and unmerged, no dropout, no variant (DoRA).
    None for anything else."""
    if type(module).__name__ != "Linear" or not type(module).__module__.startswith("peft.tuners.lora"):
        return None
    adapters = list(module.active_adapters)
    if (len(adapters) != 1 or module.disable_adapters or module.merged or type(module.base_layer) is not nn.Linear
            or getattr(module, "fan_in_fan_out", False)):
        return None
    name = adapters[0]
    if (name not in module.lora_A or name in getattr(module, "lora_variant", {})
            or module.use_dora.get(name, False) or not isinstance(module.lora_dropout[name], nn.Identity)):
        return None
    return name


def fused_linear(x: torch.Tensor, *linears: nn.Module) -> tuple[torch.Tensor, ...] | None:
    """The outputs of several linears of the same input as one matmul over their concatenated
    weights (one larger GEMM forward, one for the input's gradient backward), split back apart; or
    None when they cannot be fused, and each must run its own matmul. Fusable: all exactly
    nn.Linear, or all peft LoRA linears of one plain active adapter (`_lora_adapter`), whose frozen
    bases are then one matmul and A factors another (x is read once for all of them), each B its
    own small matmul as in peft. Quantized layers, DoRA and adapter dropout are not fused."""
    if all(type(m) is nn.Linear for m in linears):
        bases, name = linears, None
    else:
        names = {_lora_adapter(m) for m in linears}
        if len(names) != 1 or None in names:
            return None
        bases, name = [m.base_layer for m in linears], names.pop()
    if len({m.bias is None for m in bases}) != 1:
        return None
    result = _concat_linear(x, bases)
    if name is None:
        return result
    downs = [m.lora_A[name] for m in linears]
    x_a = x if x.dtype == downs[0].weight.dtype else x.to(downs[0].weight.dtype)  # as peft casts it
    low = _concat_linear(x_a, downs)
    return tuple((y + m.lora_B[name](a) * m.scaling[name]).to(y.dtype) for m, y, a in zip(linears, result, low))


def _concat_linear(x: torch.Tensor, linears: list[nn.Linear] | tuple[nn.Linear, ...]) -> tuple[torch.Tensor, ...]:
    weight = torch.cat([m.weight for m in linears])
    bias = torch.cat([m.bias for m in linears]) if linears[0].bias is not None else None
    return F.linear(x, weight, bias).split([m.out_features for m in linears], dim=-1)


class SwiGLU(nn.Module):
    """Gated feed-forward: w2(silu(w1 x) * w3 x). Names follow Llama (w1 gate, w3 up, w2 down).
    With `fused`, gate and up run as one matmul where `fused_linear` can fuse them."""

    def __init__(self, dim: int, hidden_dim: int, fused: bool = False) -> None:
        super().__init__()
        self.fused = fused
        self.w1 = nn.Linear(dim, hidden_dim, bias=False)
        self.w3 = nn.Linear(dim, hidden_dim, bias=False)
        self.w2 = nn.Linear(hidden_dim, dim, bias=False)

    def forward(self, x_BTD: torch.Tensor) -> torch.Tensor:
        fused = fused_linear(x_BTD, self.w1, self.w3) if self.fused else None
        gate_BTF, up_BTF = fused or (self.w1(x_BTD), self.w3(x_BTD))
        return self.w2(F.silu(gate_BTF) * up_BTF)
