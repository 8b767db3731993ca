"""The Llama-style decoder: token embedding -> n_layers pre-norm blocks -> RMSNorm -> vocabulary head.

A block is built from two factories, a sequence mixer and a feed-forward network. The config's
per-layer patterns (`model.mixers`, `model.ffns`) pick each layer's factories from MIXERS and FFNS:
attention or Mamba-2, dense SwiGLU or a mixture of experts.

For generation, `forward(idx, cache=decoder.new_cache())` fills a per-layer cache (attention keys
and values, Mamba-2 conv and SSM states) and later calls continue from it one token at a time.

Shape legend:
    B batch, T sequence length, D model width (dim), V vocabulary, d head size.
    idx_BT  token ids;  h_BTD  residual stream;  logits_BTV  next-token scores;  cos_Td, sin_Td  RoPE.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial

import torch
import torch.nn.functional as F
from torch import nn

from hasten.config import FFN_LETTERS, MIXER_LETTERS, ConfigError, ModelConfig
from hasten.models.attention import Attention
from hasten.models.layers import RMSNorm, SwiGLU, rope_tables
from hasten.models.mamba2 import Mamba2
from hasten.models.moe import MoE
from hasten.models.ops import add_norm
from hasten.models.ops.add_norm import add_rms_norm
from hasten.models.ops.cross_entropy import IGNORE_INDEX, linear_cross_entropy

# Linears that write into the residual stream. Their init is scaled by 1/sqrt(2*n_layers) so the
# variance of the stream does not grow with depth (GPT-2); a new mixer adds its own name here.
RESIDUAL_PROJECTIONS: tuple[str, ...] = ("wo", "w2", "out_proj")


def round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def ffn_hidden_dim(config: ModelConfig) -> int:
    """SwiGLU width: explicit, or 8/3*dim (same weights as a 4*dim GELU MLP) rounded for the GPU."""
    return config.ffn_dim or round_up(int(8 * config.dim / 3), config.ffn_multiple_of)


def moe_hidden_dim(config: ModelConfig) -> int:
    """One expert's width: explicit, or the dense width split over the experts a token uses
    (top_k, plus the shared one), rounded up to 16, so that active parameters match dense."""
    used = config.top_k + int(config.moe_shared_expert)
    return config.moe_hidden_dim or round_up(-(-ffn_hidden_dim(config) // used), 16)


def _out_std(c: ModelConfig) -> float:
    return c.init_std / math.sqrt(2 * c.n_layers)


# Layer factories by pattern letter (config.MIXER_LETTERS / FFN_LETTERS): config -> () -> module.
MIXERS: dict[str, Callable[[ModelConfig], Callable[[], nn.Module]]] = {
    "A": lambda c: partial(Attention, c.dim, c.n_heads, c.n_kv_heads or c.n_heads, c.dropout, c.qkv_bias,
                           fuse_qkv=c.fuse_projections),
    "M": lambda c: partial(Mamba2, c.dim, d_state=c.ssm_state, head_dim=c.ssm_head_dim, expand=c.ssm_expand,
                           n_groups=c.ssm_groups, chunk_size=c.ssm_chunk, d_conv=c.ssm_conv, norm_eps=c.norm_eps,
                           recompute=c.ssm_recompute),
}
FFNS: dict[str, Callable[[ModelConfig], Callable[[], nn.Module]]] = {
    "D": lambda c: partial(SwiGLU, c.dim, ffn_hidden_dim(c), fused=c.fuse_projections),
    "E": lambda c: partial(MoE, c.dim, moe_hidden_dim(c), num_experts=c.num_experts, top_k=c.top_k,
                           router=c.moe_router, shared_expert=c.moe_shared_expert,
                           capacity_factor=c.moe_capacity_factor, aux_weight=c.moe_aux_weight,
                           z_weight=c.moe_z_weight, init_std=c.init_std, out_init_std=_out_std(c),
                           routed_scale=c.moe_routed_scale),
}
assert set(MIXERS) == set(MIXER_LETTERS) and set(FFNS) == set(FFN_LETTERS)


@dataclass
class DecodeCache:
    """Per-layer generation state (each mixer owns its dict) and the position of the next token."""

    layers: list[dict] = field(default_factory=list)
    pos: int = 0


def resolve_vocab_size(config: ModelConfig, tokenizer_vocab: int) -> int:
    """Embedding rows: config.vocab_size, or the tokenizer's size rounded up to 64 (tensor-core tiles)."""
    if config.vocab_size:
        if config.vocab_size < tokenizer_vocab:
            raise ConfigError(f"model.vocab_size={config.vocab_size} is not allowed: the tokenizer has "
                              f"{tokenizer_vocab} tokens; raise it or set 0 to size it automatically.")
        return config.vocab_size
    return round_up(tokenizer_vocab, 64)


def split_stream(h_BTD: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """An fp32 tensor as two bf16 ones, its rounding `hi` and the remainder `lo` (hi + lo carries
    ~16 bits of mantissa; fp32's 24, bf16's 8). Gradients flow through `hi` alone, as through the
    identity: `lo` is a constant correction."""
    hi_BTD = h_BTD.to(torch.bfloat16)
    lo_BTD = (h_BTD.detach() - bf16_bits_to_float(hi_BTD.detach())).to(torch.bfloat16)
    return hi_BTD, lo_BTD


def bf16_bits_to_float(x: torch.Tensor) -> torch.Tensor:
    """x.float() for bf16 x, made from its bits. Inside one generated kernel, torch.compile keeps a
    value cast to bf16 and back in fp32 without rounding it (unless emulate_precision_casts is on),
    so `h - h.to(bf16).float()` compiled to 0 and the pair to a bf16 stream; from the bits, the
    rounding must happen (tests/unit/test_models.py checks the compiled pair)."""
    return (x.view(torch.int16).to(torch.int32) << 16).view(torch.float32)


def join_stream(hi_BTD: torch.Tensor, lo_BTD: torch.Tensor) -> torch.Tensor:
    return hi_BTD.float() + lo_BTD.float()


class Block(nn.Module):
    """Pre-norm residual block: h + mixer(norm(h)), then h + ffn(norm(h))."""

    def __init__(self, dim: int, mixer: Callable[[], nn.Module], ffn: Callable[[], nn.Module],
                 norm_eps: float = 1e-5, dropout: float = 0.0) -> None:
        super().__init__()
        self.mixer_norm = RMSNorm(dim, norm_eps)
        self.mixer = mixer()
        self.ffn_norm = RMSNorm(dim, norm_eps)
        self.ffn = ffn()
        self.dropout = nn.Dropout(dropout)  # on each residual branch (identity in eval or at p=0)

    def forward(self, h_BTD: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor],
                cache: dict | None = None, mask_B1TT: torch.Tensor | None = None,
                lo_BTD: torch.Tensor | None = None, fused: bool = False, pending_BTD: torch.Tensor | None = None
                ) -> torch.Tensor | tuple[torch.Tensor, ...]:
        """h + mixer(norm(h)), then h + ffn(norm(h)). With `lo_BTD` the stream is the split pair
        (h_BTD, lo_BTD) of `split_stream`, and so is the result. With `fused` too (model.fuse_norms),
        each sum, its split and the norm after it are one kernel (hasten.models.ops.add_norm): the
        block takes the previous block's FFN output not yet added (`pending_BTD`, None for the first
        block) and returns (hi, lo, its own FFN output), which the next block or the final norm adds."""
        extra = {} if cache is None else {"cache": cache}  # mixers without a cache never see the argument
        if mask_B1TT is not None:  # packed sequences (attention mixers only: Decoder.forward checks)
            extra["mask_B1TT"] = mask_B1TT
        if fused:
            return self._forward_fused(h_BTD, lo_BTD, pending_BTD, rope, extra)
        if lo_BTD is not None:
            return self._forward_split(h_BTD, lo_BTD, rope, extra)
        h_BTD = h_BTD + self.dropout(self.mixer(self.mixer_norm(h_BTD), rope=rope, **extra))
        return h_BTD + self.dropout(self.ffn(self.ffn_norm(h_BTD)))

    def _forward_fused(self, hi_BTD: torch.Tensor, lo_BTD: torch.Tensor, pending_BTD: torch.Tensor | None,
                       rope: tuple[torch.Tensor, torch.Tensor], extra: dict) -> tuple[torch.Tensor, ...]:
        if pending_BTD is None:
            x_BTD = self.mixer_norm(join_stream(hi_BTD, lo_BTD))
        else:
            hi_BTD, lo_BTD, x_BTD, _ = add_rms_norm(hi_BTD, lo_BTD, pending_BTD, self.mixer_norm.weight,
                                                    self.mixer_norm.eps)
        branch = self.mixer(x_BTD, rope=rope, **extra)
        hi_BTD, lo_BTD, x_BTD, _ = add_rms_norm(hi_BTD, lo_BTD, branch, self.ffn_norm.weight, self.ffn_norm.eps)
        return hi_BTD, lo_BTD, self.ffn(x_BTD)

    def _forward_split(self, hi_BTD: torch.Tensor, lo_BTD: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor],
                       extra: dict) -> tuple[torch.Tensor, torch.Tensor]:
        # The fp32 stream is rebuilt from the pair for each of its two uses, the norm and the sum:
        # backward then adds the two uses' gradients as bf16 tensors, the gradient of the bf16 `hi`,
        # and never holds an fp32 gradient of the stream in memory.
        branch = self.mixer(self.mixer_norm(join_stream(hi_BTD, lo_BTD)), rope=rope, **extra)
        hi_BTD, lo_BTD = split_stream(join_stream(hi_BTD, lo_BTD) + self.dropout(branch).float())
        branch = self.ffn(self.ffn_norm(join_stream(hi_BTD, lo_BTD)))
        return split_stream(join_stream(hi_BTD, lo_BTD) + self.dropout(branch).float())


class Decoder(nn.Module):
    def __init__(self, config: ModelConfig, vocab_size: int) -> None:
        super().__init__()
        self.config, self.vocab_size = config, vocab_size
        c = config
        self.tok_embeddings = nn.Embedding(vocab_size, c.dim)
        self.layers = nn.ModuleList(Block(c.dim, MIXERS[m](c), FFNS[f](c), c.norm_eps, c.dropout)
                                    for m, f in zip(c.layer_mixers(), c.layer_ffns()))
        self.norm = RMSNorm(c.dim, c.norm_eps)
        self.output = nn.Linear(c.dim, vocab_size, bias=False)
        # Derived from the config, so not saved in checkpoints; init_weights recomputes them.
        cos_Td, sin_Td = self._rope_tables()
        self.register_buffer("rope_cos", cos_Td, persistent=False)
        self.register_buffer("rope_sin", sin_Td, persistent=False)
        self.init_weights()  # a no-op on the meta device; build_model calls it again after to_empty

    def _rope_tables(self) -> tuple[torch.Tensor, torch.Tensor]:
        c = self.config
        return rope_tables(c.dim // c.n_heads, c.max_seq_len, c.rope_theta, self.tok_embeddings.weight.device)

    @torch.no_grad()
    def init_weights(self) -> None:
        """Normal(0, init_std) everywhere, residual projections scaled down, norms to 1, RoPE recomputed."""
        c = self.config
        # to_empty() gives each module its own fresh tensor, so a tie made before it is broken: redo it.
        if c.tie_embeddings:
            self.output.weight = self.tok_embeddings.weight
        for name, module in self.named_modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                scaled = name.rsplit(".", 1)[-1] in RESIDUAL_PROJECTIONS
                nn.init.normal_(module.weight, 0.0, c.init_std / math.sqrt(2 * c.n_layers) if scaled else c.init_std)
                if getattr(module, "bias", None) is not None:
                    nn.init.zeros_(module.bias)
            elif module is not self and hasattr(module, "reset_parameters"):
                module.reset_parameters()  # RMSNorm, and whatever a future mixer needs
        cos_Td, sin_Td = self._rope_tables()
        self.rope_cos.copy_(cos_Td)
        self.rope_sin.copy_(sin_Td)

    def forward(self, idx_BT: torch.Tensor, cache: DecodeCache | None = None,
                positions_BT: torch.Tensor | None = None, targets_BT: torch.Tensor | None = None,
                loss_chunk: int = 4096) -> torch.Tensor:
        """logits_BTV of the ids. `positions_BT` marks packed sequences: each row holds several
        sequences, each starting at position 0; rotary positions follow them, and attention stays
        inside each sequence (causal within it), so every sequence is computed as if alone.

        With `targets_BT` (-100 where not counted), the mean next-token cross-entropy instead, fp32:
        head and loss run `loss_chunk` tokens at a time, never the whole logits
        (hasten.models.ops.cross_entropy), unless the head is no plain linear (an adapter on it)."""
        start = cache.pos if cache is not None else 0
        end = start + idx_BT.shape[1]
        if end > self.config.max_seq_len:
            raise ValueError(f"sequence of {end} tokens is longer than model.max_seq_len={self.config.max_seq_len}")
        rope, mask_B1TT = (self.rope_cos[start:end], self.rope_sin[start:end]), None
        if positions_BT is not None:
            if cache is not None or not self.supports_packing():
                raise ValueError("packed sequences need attention in every layer and no generation cache")
            rope = (self.rope_cos[positions_BT][:, None], self.rope_sin[positions_BT][:, None])  # B,1,T,d
            segment_BT = (positions_BT == 0).cumsum(dim=1)
            T = idx_BT.shape[1]
            causal_TT = torch.ones(T, T, dtype=torch.bool, device=idx_BT.device).tril()
            mask_B1TT = ((segment_BT[:, :, None] == segment_BT[:, None, :]) & causal_TT)[:, None]
        h_BTD = self.tok_embeddings(idx_BT)
        device = h_BTD.device.type
        if not self.config.fp32_residual and torch.is_autocast_enabled(device):
            h_BTD = h_BTD.to(torch.get_autocast_dtype(device))  # the blocks' sums then stay in it
        split = (self.config.fp32_residual and self.config.split_residual and torch.is_autocast_enabled(device)
                 and torch.get_autocast_dtype(device) == torch.bfloat16)
        # model.fuse_norms: the split stream's sums and norms as one kernel each way (the fused blocks have no dropout)
        fused = (split and self.config.fuse_norms and h_BTD.is_cuda and add_norm.available()
                 and not (self.training and self.config.dropout))
        if split:
            h_BTD, lo_BTD = split_stream(h_BTD)
        pending_BTD = None
        for i, block in enumerate(self.layers):
            layer_cache = cache.layers[i] if cache is not None else None
            if fused:
                h_BTD, lo_BTD, pending_BTD = block(h_BTD, rope, layer_cache, mask_B1TT, lo_BTD=lo_BTD, fused=True,
                                                   pending_BTD=pending_BTD)
            elif split:
                h_BTD, lo_BTD = block(h_BTD, rope, layer_cache, mask_B1TT, lo_BTD=lo_BTD)
            else:
                h_BTD = block(h_BTD, rope, layer_cache, mask_B1TT)
        if cache is not None:
            cache.pos = end
        if fused and pending_BTD is not None:
            h_BTD = add_rms_norm(h_BTD, lo_BTD, pending_BTD, self.norm.weight, self.norm.eps)[2]
        else:
            h_BTD = self.norm(join_stream(h_BTD, lo_BTD) if split else h_BTD)
        if targets_BT is None:
            return self.output(h_BTD)  # logits_BTV, in autocast's dtype
        if type(self.output) is nn.Linear:  # not a peft or quantized wrapper
            return linear_cross_entropy(h_BTD.flatten(0, 1), self.output.weight, targets_BT.flatten(), loss_chunk)
        logits_NV = self.output(h_BTD).flatten(0, 1)
        return F.cross_entropy(logits_NV.float(), targets_BT.flatten(), ignore_index=IGNORE_INDEX)

    def supports_packing(self) -> bool:
        """Whether packed sequences can be separated: attention takes a mask; a Mamba-2 scan would
        carry its state from one sequence into the next."""
        return all(isinstance(block.mixer, Attention) for block in self.layers)

    def new_cache(self) -> DecodeCache:
        """An empty generation cache; `generate` uses one when the model offers this method."""
        return DecodeCache(layers=[{} for _ in self.layers])

    def num_params(self, exclude_embedding: bool = False) -> int:
        """Parameter count, tied weights once. exclude_embedding drops the token-embedding table
        (with tied embeddings that is also the head), the convention of the scaling-law papers."""
        n = sum(p.numel() for p in self.parameters())  # parameters() already yields a tied one once
        return n - self.tok_embeddings.weight.numel() if exclude_embedding else n

    def num_active_params(self) -> int:
        """Parameters one token uses: all, less the experts its router does not pick."""
        return self.num_params() - sum(m.inactive_params() for m in self.modules() if isinstance(m, MoE))

    def flops_per_token(self, seq_len: int) -> int:
        """Training FLOPs per token: 6N over the active parameters N for the matmuls forward+backward,
        plus 12 * dim * seq_len per attention layer for scores and values (PaLM appendix B / nanoGPT),
        plus each Mamba-2 layer's chunked scan."""
        c = self.config
        attention = 12 * c.layer_mixers().count("A") * c.dim * seq_len
        scans = sum(m.scan_flops_per_token() for m in self.modules() if isinstance(m, Mamba2))
        return 6 * self.num_active_params() + attention + scans


def build_model(config: ModelConfig, vocab_size: int, device: torch.device | str = "cpu") -> Decoder:
    """The one entry point: build on meta (no memory, no wasted init), allocate on `device`, init once.

    Deterministic under the caller's torch.manual_seed.
    """
    with torch.device("meta"):
        model = Decoder(config, vocab_size)
    model.to_empty(device=device)
    model.init_weights()
    return model
