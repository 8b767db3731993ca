"""Models: a Llama-style decoder built from swappable mixer and feed-forward factories."""

from hasten.models.attention import Attention
from hasten.models.generate import generate
from hasten.models.gpt import (Block, Decoder, build_model, ffn_hidden_dim, resolve_vocab_size,
                               round_up)
from hasten.models.layers import RMSNorm, SwiGLU, apply_rope, rope_tables

__all__ = ["Attention", "Block", "Decoder", "RMSNorm", "SwiGLU", "apply_rope", "build_model",
           "ffn_hidden_dim", "generate", "resolve_vocab_size", "rope_tables", "round_up"]
