"""Causal multi-head attention with grouped-query heads and RoPE, on top of PyTorch's SDPA.

Shape legend:
    B batch, T sequence length, D model width, H query heads, K key/value heads, d head size.
    x_BTD  activations;  q_BHTd  queries;  k_BKTd, v_BKTd  keys and values;  y_BHTd  attention out.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from hasten.models.layers import apply_rope, fusable
from hasten.models.ops import projections

# SDPA broadcasts K kv heads over H query heads itself since torch 2.5 (no copy of k and v, and
# the flash kernel handles it natively). Checked once so that older builds fall back cleanly.
SDPA_HAS_GQA: bool = "enable_gqa" in (F.scaled_dot_product_attention.__doc__ or "")


class Attention(nn.Module):
    def __init__(self, dim: int, n_heads: int, n_kv_heads: int = 0, dropout: float = 0.0,
                 qkv_bias: bool = False, fuse_qkv: bool = False) -> None:
        super().__init__()
        n_kv_heads = n_kv_heads or n_heads
        if dim % n_heads or n_heads % n_kv_heads:
            raise ValueError(f"dim={dim} must divide by n_heads={n_heads}, which must divide by n_kv_heads={n_kv_heads}")
        self.n_heads, self.n_kv_heads, self.head_dim = n_heads, n_kv_heads, dim // n_heads
        self.dropout, self.fuse_qkv = dropout, fuse_qkv
        self.wq = nn.Linear(dim, n_heads * self.head_dim, bias=qkv_bias)  # biases: Qwen2 checkpoints
        self.wk = nn.Linear(dim, n_kv_heads * self.head_dim, bias=qkv_bias)
        self.wv = nn.Linear(dim, n_kv_heads * self.head_dim, bias=qkv_bias)
        self.wo = nn.Linear(n_heads * self.head_dim, dim, bias=False)

    def forward(self, x_BTD: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor],
                cache: dict | None = None, mask_B1TT: torch.Tensor | None = None) -> torch.Tensor:
        """`rope` holds the tables of these T positions (per row for packed sequences). With a
        `cache` dict (generation), keys and values of earlier calls are reused and this call's are
        appended. `mask_B1TT` (True = may attend) replaces the causal mask: packed sequences."""
        B, T, _ = x_BTD.shape
        H, K, d = self.n_heads, self.n_kv_heads, self.head_dim
        cos_Td, sin_Td = rope
        if (self.fuse_qkv and cache is None and cos_Td.dim() == 2 and x_BTD.is_cuda and projections.available()
                and fusable(self.wq, self.wk, self.wv)):
            # One matmul over [Wq; Wk; Wv], then one kernel that rotates q and k and copies v out of
            # it (and, backward, writes the fused output's gradient in one pass): ops/projections.py.
            weight = torch.cat([self.wq.weight, self.wk.weight, self.wv.weight])
            bias = torch.cat([self.wq.bias, self.wk.bias, self.wv.bias]) if self.wq.bias is not None else None
            q_BTHd, k_BTKd, v_BTKd = projections.qkv_rope(projections.linear(x_BTD, weight, bias),
                                                          cos_Td.float().contiguous(), sin_Td.float().contiguous(), H, K)
            fused = True
            q_BHTd, k_BKTd, v_BKTd = q_BTHd.transpose(1, 2), k_BTKd.transpose(1, 2), v_BTKd.transpose(1, 2)
        else:
            fused = False
            q_BHTd = self.wq(x_BTD).view(B, T, H, d).transpose(1, 2)
            k_BKTd = self.wk(x_BTD).view(B, T, K, d).transpose(1, 2)
            v_BKTd = self.wv(x_BTD).view(B, T, K, d).transpose(1, 2)
            q_BHTd, k_BKTd = apply_rope(q_BHTd, cos_Td, sin_Td), apply_rope(k_BKTd, cos_Td, sin_Td)
        mask = mask_B1TT
        if cache is not None:
            if "k" in cache:
                k_BKTd, v_BKTd = torch.cat([cache["k"], k_BKTd], dim=2), torch.cat([cache["v"], v_BKTd], dim=2)
            cache["k"], cache["v"] = k_BKTd, v_BKTd
            past = k_BKTd.shape[2] - T
            if past:  # query i sees keys up to past + i
                mask = torch.ones(T, past + T, dtype=torch.bool, device=x_BTD.device).tril(past)

        # Shared kv heads: SDPA's flash kernel takes them as they are (enable_gqa), but with an explicit
        # mask (packed sequences, cached generation) only the math kernel would, materializing the
        # whole score matrix; repeating k and v lets the memory-efficient kernel run instead.
        gqa = K < H
        native = gqa and SDPA_HAS_GQA and mask is None
        if gqa and not native:  # materialize the shared heads: kv head j serves queries j*H/K ..
            k_BKTd = k_BKTd.repeat_interleave(H // K, dim=1)
            v_BKTd = v_BKTd.repeat_interleave(H // K, dim=1)
        extra = {"enable_gqa": True} if native else {}
        y_BHTd = F.scaled_dot_product_attention(
            q_BHTd, k_BKTd, v_BKTd, attn_mask=mask, is_causal=mask is None,
            dropout_p=self.dropout if self.training else 0.0, **extra)
        y_BTD = y_BHTd.transpose(1, 2).reshape(B, T, H * d)
        if fused and fusable(self.wo):
            return projections.linear(y_BTD, self.wo.weight)
        return self.wo(y_BTD)
