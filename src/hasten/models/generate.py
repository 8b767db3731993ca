"""Autoregressive sampling from a Decoder: temperature, top-k, seeded.

A model that offers `new_cache()` (hasten's Decoder) is run once over the prompt and then one
token at a time from its per-layer cache (attention keys/values, Mamba-2 states). Any other model
re-runs the (cropped) context each step. Both give the same tokens: once the text outgrows
max_seq_len, the cached path also re-reads the last max_seq_len tokens each step.

Shape legend: B batch (1 here), T context length, V vocabulary; idx_BT ids, logits_BV last-step scores.
"""

from __future__ import annotations

import torch
from torch import nn


def _sample(logits_BV: torch.Tensor, temperature: float, top_k: int | None, gen: torch.Generator) -> torch.Tensor:
    if temperature <= 0:
        return logits_BV.argmax(dim=-1, keepdim=True)  # greedy
    logits_BV = logits_BV.float() / temperature
    if top_k:
        kth_B1 = torch.topk(logits_BV, min(top_k, logits_BV.shape[-1]), dim=-1).values[:, -1:]
        logits_BV = logits_BV.masked_fill(logits_BV < kth_B1, float("-inf"))
    return torch.multinomial(torch.softmax(logits_BV, dim=-1), 1, generator=gen)


def generate(model: nn.Module, prompt_ids: list[int], max_new_tokens: int, temperature: float = 0.8,
             top_k: int | None = 50, seed: int = 0, device: torch.device | str | None = None) -> list[int]:
    """Return prompt_ids followed by max_new_tokens sampled tokens. temperature 0 = greedy.

    The model sees at most its last config.max_seq_len tokens. The caller's RNG is untouched and
    the model's train/eval mode is restored afterwards.
    """
    if not prompt_ids:
        raise ValueError("generate needs a prompt of at least one token")
    device = torch.device(device) if device is not None else next(model.parameters()).device
    max_len = model.config.max_seq_len
    gen = torch.Generator(device=device).manual_seed(seed)
    idx_BT = torch.tensor([prompt_ids], dtype=torch.long, device=device)
    was_training = model.training
    model.eval()
    new_cache = getattr(model, "new_cache", None)
    try:
        with torch.no_grad():
            cache = new_cache() if new_cache is not None else None
            for i in range(max_new_tokens):
                if cache is not None and i > 0 and cache.pos < max_len:
                    logits_BV = model(idx_BT[:, -1:], cache=cache)[:, -1, :]  # continue from the cache
                elif cache is not None:
                    cache = new_cache()  # the prompt, or a window slid past max_seq_len: read it afresh
                    logits_BV = model(idx_BT[:, -max_len:], cache=cache)[:, -1, :]
                else:
                    logits_BV = model(idx_BT[:, -max_len:])[:, -1, :]
                idx_BT = torch.cat((idx_BT, _sample(logits_BV, temperature, top_k, gen)), dim=1)
    finally:
        model.train(was_training)
    return idx_BT[0].tolist()
