"""Autoregressive sampling from a Decoder: temperature, top-k, seeded, no KV cache.

Without a cache each step re-runs the (cropped) context; for the end-of-run samples this library
prints (a few hundred tokens) that costs well under a second on a GPU and keeps the model simple.

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
    try:
        with torch.no_grad():
            for _ in range(max_new_tokens):
                logits_BV = model(idx_BT[:, -max_len:])[:, -1, :]
                idx_BT = torch.cat((idx_BT, _sample(logits_BV, temperature, top_k, gen)), dim=1)
    finally:
        model.train(was_training)
    return idx_BT[0].tolist()
