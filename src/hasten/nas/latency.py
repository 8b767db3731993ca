"""The latency table: each candidate's inference time, measured on the device the model will run on.

A FLOP count is a poor proxy for latency (attention's cost grows with the sequence, Mamba-2's scan
is memory-bound, kernels differ by device), so, as in FBNet and ProxylessNAS, each candidate is
timed directly: one layer's mixer (or FFN), eval mode, no gradients, at the inference batch and sequence
length, the median of repeated forwards after warm-up passes.
"""

from __future__ import annotations

import dataclasses

import torch

from hasten.config import FFN_LETTERS, ModelConfig
from hasten.train.metrics import median_ms


def measure_ms(config: ModelConfig, letter: str, batch: int, seq_len: int, device: torch.device,
               dtype: torch.dtype = torch.float32, repeats: int = 20, warmup: int = 3) -> float:
    """Median forward time (ms) of one layer's `letter` module of a decoder shaped by `config`: its
    mixer for a mixer letter (A, M), its FFN for an FFN letter (D, E)."""
    from hasten.models import build_model

    is_ffn = letter in FFN_LETTERS
    # One layer: the measured letter in its slot, the plain kind in the other (it is not timed).
    shape = dataclasses.replace(config, n_layers=1, mixers="A" if is_ffn else letter, ffns=letter if is_ffn else "D")
    model = build_model(shape, vocab_size=64, device=device)
    module = (model.layers[0].ffn if is_ffn else model.layers[0].mixer).to(dtype).eval()
    x_BTD = torch.randn(batch, seq_len, config.dim, device=device, dtype=dtype,
                        generator=torch.Generator(device).manual_seed(0))
    kwargs = {} if is_ffn else {"rope": (model.rope_cos[:seq_len].to(dtype), model.rope_sin[:seq_len].to(dtype))}
    return median_ms(lambda: module(x_BTD, **kwargs), device, repeats, warmup)


def latency_table(config: ModelConfig, letters: str, batch: int, seq_len: int, device: torch.device,
                  dtype: torch.dtype = torch.float32, repeats: int = 20) -> dict[str, float]:
    """{letter: ms} for every candidate (mixer and FFN letters alike)."""
    return {letter: measure_ms(config, letter, batch, seq_len, device, dtype, repeats) for letter in letters}
