"""Models: a Llama-style decoder built from swappable mixer and feed-forward factories."""

from hasten.models.attention import Attention
from hasten.models.generate import generate
from hasten.models.gpt import (Block, DecodeCache, Decoder, build_model, ffn_hidden_dim, moe_hidden_dim,
                               resolve_vocab_size, round_up)
from hasten.models.layers import RMSNorm, SwiGLU, apply_rope, rope_tables
from hasten.models.mamba2 import Mamba2, ssd_scan, ssd_scan_ref, ssd_step
from hasten.models.moe import MoE, auxiliary_losses, load_balancing_loss, route, router_z_loss

__all__ = ["Attention", "Block", "DecodeCache", "Decoder", "Mamba2", "MoE", "RMSNorm", "SwiGLU", "apply_rope",
           "auxiliary_losses", "build_model", "ffn_hidden_dim", "generate", "load_balancing_loss",
           "moe_hidden_dim", "resolve_vocab_size", "rope_tables", "round_up", "route", "router_z_loss",
           "ssd_scan", "ssd_scan_ref", "ssd_step"]
