"""Fused projections left to torch.compile: the recipe's step profiled with q/k/v and gate/up as one
matmul each over weights concatenated at each forward, and every element-wise op after them left to
Inductor, in several layouts (the results: benchmarks/results/profile_step_fused_probe.json).

    PYTHONPATH=src python benchmarks/fused_projections_probe.py VARIANT gpt2-124m --steps 10 --out OUT

VARIANT: base (unfused) | fused (q, k, v as views of the fused output, RoPE on the (B, H, T, d) views;
gate and up as its halves) | fused_contig (v copied out) | mlp (gate/up only) | mlp2 (gate/up rows
interleaved) | qkv2 (q/k/v only, RoPE on the (B, T, H, d) views) | rope (unfused, RoPE on (B, T, H, d)) |
fused2 (qkv2 + mlp2) | qkv2h (qkv2 + gate/up halves); a `_cc` suffix sets Inductor's
max_pointwise_cat_inputs to 0. Every variant runs with model.fuse_projections=false: the layers'
forwards are replaced here instead (what hasten keeps, with its Triton kernels, is the recipe itself:
`benchmarks/profile_step.py gpt2-124m`). The rest of the arguments go to benchmarks/profile_step.py.
"""
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

from hasten.models import attention, layers
from hasten.models.layers import apply_rope

variant = sys.argv.pop(1)
concat_kernel = variant.endswith("_cc")  # cats as ConcatKernel (producers write into slices), not masked pointwise
variant = variant.removesuffix("_cc")
if concat_kernel:
    import torch._inductor.config as ic
    for key in ("max_complex_pointwise_cat_inputs", "max_pointwise_cat_inputs"):
        if hasattr(ic, key):
            setattr(ic, key, 0)
            print("set", key, 0)
orig_attn = attention.Attention.forward


def _uncached_full_heads(forward):
    """The variant's forward for training (no cache, no mask, as many kv heads as query heads); the
    layer's own forward otherwise."""
    def wrapped(self, x_BTD, rope, cache=None, mask_B1TT=None):
        if cache is not None or mask_B1TT is not None or self.n_kv_heads != self.n_heads:
            return orig_attn(self, x_BTD, rope, cache, mask_B1TT)
        return forward(self, x_BTD, rope)
    return wrapped


def _finish(self, q, k, v, rope, B, T):
    """q, k, v: (B, T, H, d) views; RoPE applied in that layout, then the heads moved for SDPA."""
    H, d = self.n_heads, self.head_dim
    cos, sin = (t.unsqueeze(-2) for t in rope)  # (T, 1, d) or (B, T, 1, d)
    q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
    y = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True)
    return self.wo(y.transpose(1, 2).reshape(B, T, H * d))


@_uncached_full_heads
def attn_fused(self, x_BTD, rope):
    B, T, _ = x_BTD.shape
    H, d = self.n_heads, self.head_dim
    w = torch.cat([self.wq.weight, self.wk.weight, self.wv.weight])
    q, k, v = F.linear(x_BTD, w).split(H * d, dim=-1)
    if variant == "fused_contig":
        v = v.contiguous()
    q, k, v = (t.view(B, T, H, d).transpose(1, 2) for t in (q, k, v))
    cos_Td, sin_Td = rope
    q, k = apply_rope(q, cos_Td, sin_Td), apply_rope(k, cos_Td, sin_Td)
    y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    return self.wo(y.transpose(1, 2).reshape(B, T, H * d))


@_uncached_full_heads
def attn_qkv2(self, x_BTD, rope):
    B, T, _ = x_BTD.shape
    H, d = self.n_heads, self.head_dim
    w = torch.cat([self.wq.weight, self.wk.weight, self.wv.weight])
    q, k, v = F.linear(x_BTD, w).view(B, T, 3, H, d).unbind(2)
    return _finish(self, q, k, v, rope, B, T)


@_uncached_full_heads
def attn_rope(self, x_BTD, rope):
    B, T, _ = x_BTD.shape
    H, d = self.n_heads, self.head_dim
    q, k, v = (lin(x_BTD).view(B, T, H, d) for lin in (self.wq, self.wk, self.wv))
    return _finish(self, q, k, v, rope, B, T)


def mlp_halves(self, x_BTD):
    g, u = F.linear(x_BTD, torch.cat([self.w1.weight, self.w3.weight])).chunk(2, dim=-1)
    return self.w2(F.silu(g) * u)


def mlp_interleaved(self, x_BTD):
    w = torch.stack([self.w1.weight, self.w3.weight], dim=1).flatten(0, 1)  # rows g0, u0, g1, u1, ..
    g, u = F.linear(x_BTD, w).unflatten(-1, (-1, 2)).unbind(-1)
    return self.w2(F.silu(g) * u)


attn = {"fused": attn_fused, "fused_contig": attn_fused, "qkv2": attn_qkv2, "fused2": attn_qkv2, "qkv2h": attn_qkv2,
        "rope": attn_rope}
mlp = {"fused": mlp_halves, "fused_contig": mlp_halves, "mlp": mlp_halves, "mlp2": mlp_interleaved,
       "fused2": mlp_interleaved, "qkv2h": mlp_halves}
if variant in attn:
    attention.Attention.forward = attn[variant]
if variant in mlp:
    layers.SwiGLU.forward = mlp[variant]
print("variant", variant, "concat kernel" if concat_kernel else "", flush=True)
rest = sys.argv[1:]
sys.argv = ["profile_step.py", *rest[:1], "model.fuse_projections=false", *rest[1:]]  # the recipe comes first
sys.path.insert(0, str(Path(__file__).parent))
import profile_step  # noqa: E402

profile_step.main()
